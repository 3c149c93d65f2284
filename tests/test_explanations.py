"""sia_cli.measures.explanations: how far an attribution map moved, against hand-made maps."""

from __future__ import annotations

import math

import pytest
import torch

from sia_cli.measures.explanations import kendall_tau, pixel_importance, top_k, top_k_intersection


def maps(*pixel_rows: list[float]) -> torch.Tensor:
    """(B, 3, 1, N) maps whose pixel importances are the rows (split over the channels, signs mixed)."""
    rows = torch.tensor(pixel_rows, dtype=torch.float32)
    return torch.stack([rows / 2, -rows / 4, rows / 4], dim=1).unsqueeze(2)


def test_pixel_importance_sums_absolute_values_over_channels():
    assert torch.allclose(pixel_importance(maps([1.0, 2.0, 3.0])), torch.tensor([[1.0, 2.0, 3.0]]))
    with pytest.raises(ValueError, match="B, C, H, W"):
        pixel_importance(torch.zeros(3, 4))


def test_top_k_intersection_counts_the_shared_top_pixels():
    a = maps([5, 4, 3, 2, 1, 0], [5, 4, 3, 2, 1, 0])
    b = maps([5, 0, 4, 3, 2, 1], [0, 1, 2, 3, 4, 5])
    # top 2 of a: pixels 0, 1. Of b: pixels 0, 2 (half shared) and pixels 5, 4 (none).
    assert top_k_intersection(a, b, 2).tolist() == [0.5, 0.0]
    assert top_k_intersection(a, a, 3).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="k must lie"):
        top_k_intersection(a, b, 7)


def test_kendall_tau_is_one_for_the_same_order_and_minus_one_for_the_reverse():
    a = maps([1, 2, 3, 4], [1, 2, 3, 4], [1, 1, 1, 1])
    b = maps([10, 20, 30, 40], [4, 3, 2, 1], [1, 2, 3, 4])
    tau = kendall_tau(a, b)
    assert tau[0] == pytest.approx(1.0) and tau[1] == pytest.approx(-1.0)
    assert math.isnan(tau[2])  # a constant map has no order


def test_one_swap_of_four_gives_the_textbook_tau():
    # 6 pairs, one discordant: (5 - 1) / 6
    assert kendall_tau(maps([1, 2, 3, 4]), maps([1, 2, 4, 3]))[0] == pytest.approx(4 / 6)


def test_k_keeps_the_authors_share_of_the_pixels():
    assert top_k(32 * 32) == 100  # the ART paper's CIFAR evaluation: 100 of 1,024
    assert top_k(64 * 64) == 400 and top_k(4) == 1
