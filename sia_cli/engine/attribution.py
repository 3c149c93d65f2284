"""Attribution maps of the model under test, made by captum (PyTorch's attribution library).

A map explains one score per image: the logit of the reference class (`Target.explained_score`;
task kinds without a class score refuse). Images are generator images in [-1, 1], as everywhere
in the engine, so the maps are of those pixels. TorchScript modules and `torch.export`
programs are plain callables to captum: the methods here need only input gradients, which both
give. (Attacking a map needs its gradient in turn; a ReLU network's is zero almost everywhere.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import GradientShap, IntegratedGradients, Saliency

from sia_cli.backbone.attgan import edited
from sia_cli.measures.explanations import kendall_tau, pixel_importance, top_k, top_k_intersection, top_k_mask

METHODS = ("saliency", "integrated_gradients", "gradient_shap")


@dataclass(frozen=True)
class ExplanationSettings:
    """How explanations are attacked and compared: the ART paper's evaluation (its public code's
    CIFAR settings: epsilon 8/255, 50 steps of 1/255, integrated gradients of 100 steps, k = 100
    of 1,024 pixels). Field names carry `explain_` so they never fill from the attack's options."""

    explain_k: int | None = None  # top-k pixels; None: 100/1024 of the image's pixels (measures.explanations.top_k)
    explain_epsilon: float = 8 / 255  # L-inf radius of the feature-importance attack, [0, 1] units
    explain_steps: int = 50
    explain_step_size: float = 1 / 255
    explain_ig_steps: int = 100  # integrated-gradient points of every measured map

    def k_for(self, pixels: int) -> int:
        return self.explain_k if self.explain_k is not None else top_k(pixels)

    def check(self, pixels: int) -> None:
        """One clear line for settings that cannot run (raised as ValueError; callers map it)."""
        if not 1 <= self.k_for(pixels) <= pixels:
            raise ValueError(f"--explain-k must lie in 1..{pixels} (the image's pixels), got {self.explain_k}")
        if self.explain_steps < 1 or self.explain_ig_steps < 1:
            raise ValueError("--explain-steps and --explain-ig-steps must be at least 1")
        if not (self.explain_epsilon > 0 and self.explain_step_size > 0):
            raise ValueError("--explain-epsilon and --explain-step-size must be positive")


def attribution_maps(target, images: torch.Tensor, reference: torch.Tensor, method: str = "integrated_gradients",
                     steps: int = 100, samples: int = 20, seed: int = 0) -> torch.Tensor:
    """(B, C, H, W) attributions of `images` (in [-1, 1]) for the reference class.

    saliency: the absolute input gradient; integrated_gradients: `steps` points on the straight
    path from a mid-grey image (0 in [-1, 1]); gradient_shap: `samples` noisy points between
    the image and baselines of black, grey and white."""
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; known: {', '.join(METHODS)}")

    def score(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return target.explained_score(target(x), ref)

    x, extra = images.detach().clone().requires_grad_(True), (reference,)  # captum repeats `extra` with x
    if method == "saliency":
        return Saliency(score).attribute(x, abs=True, additional_forward_args=extra).detach()
    if method == "integrated_gradients":
        return IntegratedGradients(score).attribute(x, baselines=torch.zeros_like(x), n_steps=steps,
                                                    additional_forward_args=extra).detach()
    baselines = torch.stack([torch.full_like(x[0], v) for v in (-1.0, 0.0, 1.0)])
    # captum draws the noise with torch and picks the baselines with NumPy: both seeded here, and
    # both generators put back, so a run's own random draws do not depend on this one.
    numpy_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(seed)
            np.random.seed(seed)
            return GradientShap(score).attribute(x, baselines=baselines, n_samples=samples, stdevs=0.05,
                                                 additional_forward_args=extra).detach()
    finally:
        np.random.set_state(numpy_state)


def _path_gradients(target, x: torch.Tensor, reference: torch.Tensor, steps: int) -> torch.Tensor:
    """Integrated gradients from mid-grey, kept differentiable in `x` (create_graph): the attack
    below must follow how the map moves, which captum's maps do not give. Only the attack's
    objective is computed here; every map that is measured is captum's."""
    alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps  # midpoint rule
    total = torch.zeros_like(x)
    for alpha in alphas:
        point = alpha * x
        score = target.explained_score(target(point), reference).sum()
        (gradient,) = torch.autograd.grad(score, point, create_graph=True)
        total = total + gradient
    return x * total / steps


@torch.no_grad()
def _predictions_kept(target, x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return ~target.success(target(x), reference).cpu()


def feature_importance_attack(target, images: torch.Tensor, reference: torch.Tensor, k: int, epsilon: float,
                              steps: int, step_size: float, path_steps: int = 10,
                              measure_steps: int = 50) -> dict:
    """The top-k iterative feature-importance attack of Ghorbani et al. (the ART paper's IFIA):
    signed-gradient steps, within `epsilon` (L-infinity, in [0, 1] pixel units) of each image,
    that push attribution out of the k pixels that mattered most, keeping the prediction.

    Maps are integrated gradients from mid-grey (`attribution_maps`, `measure_steps` points);
    the attack follows a differentiable `path_steps`-point version of them. Of all steps, each
    image keeps the one whose map shares the fewest top-k pixels with the clean map while the
    model's prediction stays the reference (a step that changes the prediction is an ordinary
    adversary, not a moved explanation; where no step kept it, the clean image stands). Images
    in [-1, 1]. Returns the adversaries, the clean and attacked maps, and per image how many
    steps kept the prediction (0: the map of the clean image stands, unattacked)."""
    x0 = images.detach()
    clean = attribution_maps(target, x0, reference, "integrated_gradients", steps=measure_steps)
    mask = top_k_mask(pixel_importance(clean), k).view(x0.shape[0], 1, *x0.shape[2:]).to(x0.dtype)
    radius = 2 * epsilon  # [0, 1] units -> [-1, 1]
    best, best_share = x0.clone(), torch.ones(x0.shape[0])
    steps_kept = torch.zeros(x0.shape[0], dtype=torch.long)
    x = x0.clone()
    for _ in range(steps):
        x = x.detach().requires_grad_(True)
        kept_mass = (_path_gradients(target, x, reference, path_steps).abs().sum(dim=1, keepdim=True) * mask).sum()
        (gradient,) = torch.autograd.grad(kept_mass, x)
        x = (x.detach() - 2 * step_size * gradient.sign()).clamp(x0 - radius, x0 + radius).clamp(-1, 1)
        held = _predictions_kept(target, x, reference)
        maps = attribution_maps(target, x, reference, "integrated_gradients", steps=measure_steps)
        share = top_k_intersection(clean, maps, k)
        steps_kept += held.long()
        better = held & (share < best_share)
        best[better.to(best.device)] = x[better.to(x.device)]
        best_share = torch.where(better, share, best_share)
    attacked = attribution_maps(target, best, reference, "integrated_gradients", steps=measure_steps)
    return {"adversaries": best, "clean_maps": clean, "attacked_maps": attacked, "steps_kept": steps_kept}


def explanation_shifts(target, backbone, images: torch.Tensor, attrs: torch.Tensor, reference: torch.Tensor,
                       k: int, method: str = "integrated_gradients", steps: int = 50) -> dict[str, dict]:
    """Per attribute, how far its one-attribute edit moves the explanation where it keeps the
    prediction: top-k intersection and Kendall's tau between the map of each reconstruction and
    the map of its edit (`backbone.edited` flips, as edit success and true effects use).

    Images in [-1, 1] with their attributes in {0, 1}; `reference` is the label explained (the
    model's prediction on the clean image, or --labels). Returns, per attribute, the per-image
    values of the faces the edit kept the prediction on ("kept": their indices) and how many
    faces the edit flipped instead ("flipped"): a share without its count means little.
    """
    with torch.no_grad():
        reconstruction = backbone(images, attrs)
    base = attribution_maps(target, reconstruction, reference, method, steps=steps)
    found = {}
    for index, name in enumerate(backbone.attributes):
        flipped, _ = edited(attrs, index, backbone.attributes)
        with torch.no_grad():
            edit = backbone(images, flipped)
        kept = _predictions_kept(target, edit, reference).nonzero().flatten()
        entry = {"kept": kept.tolist(), "flipped": int(len(images) - len(kept)),
                 "top_k_intersection": [], "kendall_tau": []}
        if len(kept):
            maps = attribution_maps(target, edit[kept], reference[kept], method, steps=steps)
            entry["top_k_intersection"] = top_k_intersection(base[kept], maps, k).tolist()
            entry["kendall_tau"] = kendall_tau(base[kept], maps).tolist()
        found[name] = entry
    return found
