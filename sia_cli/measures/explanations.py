"""How far an explanation moves: pure functions on attribution maps (ART paper, section 4).

An attribution map (B, C, H, W) becomes one importance per pixel, the sum of its absolute
values over the channels; two maps of the same images are then compared by the share of their
top-k pixels they have in common (top-k intersection) and by Kendall's rank correlation of all
their pixels. Both are 1 for an explanation that did not move.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import kendalltau

# The authors' evaluation of 32x32 images keeps the top 100 of 1,024 pixels; other input sizes
# keep the same share of their pixels.
TOP_K_SHARE = 100 / 1024


def pixel_importance(attribution: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) attributions -> (B, H*W): each pixel's summed absolute attribution."""
    if attribution.dim() != 4:
        raise ValueError(f"attributions must be (B, C, H, W), got {tuple(attribution.shape)}")
    return attribution.detach().abs().sum(dim=1).flatten(1).float()


def top_k(pixels: int, share: float = TOP_K_SHARE) -> int:
    """The k of top-k intersection for an image of `pixels` pixels (at least 1)."""
    return max(1, round(pixels * share))


def top_k_mask(importance: torch.Tensor, k: int) -> torch.Tensor:
    """(B, P) bool: the k most important of each row of pixel importances (`pixel_importance`)."""
    return torch.zeros_like(importance, dtype=torch.bool).scatter_(1, importance.topk(k, dim=1).indices, True)


def top_k_intersection(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) share of the k most important pixels of `a` that are among the k of `b`; both
    (B, C, H, W) attribution maps of the same images."""
    first, second = pixel_importance(a), pixel_importance(b)
    if first.shape != second.shape:
        raise ValueError(f"maps differ in shape: {tuple(a.shape)} and {tuple(b.shape)}")
    if not 1 <= k <= first.shape[1]:
        raise ValueError(f"k must lie in 1..{first.shape[1]}, got {k}")
    return (top_k_mask(first, k) & top_k_mask(second, k)).sum(dim=1).float() / k


def kendall_tau(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) Kendall's tau-b between the pixel importances of two maps of the same images; NaN
    where a map is constant (no order to compare)."""
    first, second = pixel_importance(a).numpy(), pixel_importance(b).numpy()
    if first.shape != second.shape:
        raise ValueError(f"maps differ in shape: {tuple(a.shape)} and {tuple(b.shape)}")
    values = []
    for x, y in zip(first, second):
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            values.append(float("nan"))
        else:
            values.append(float(kendalltau(x, y).statistic))
    return torch.tensor(values)
