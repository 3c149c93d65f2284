"""Attributional robustness training (ART, Singh et al.; section 3 and Algorithm 1 of the paper in
shared/papers): align each image with the input gradient of its true class, against the input
gradient of the most likely wrong class, at a point that a few PGD steps choose to break that
alignment.

The triplet term, per image: softplus(-(d_neg - d_pos)) (a soft-margin triplet loss), with
d_pos = 1 - cos(x, grad of the reference class's score) and d_neg = 1 - cos(x, grad of the
rival's score). Images are the engine's [-1, 1] pixels; scores come from the task
(`Target.explained_score`, `Target.rival_score`): a binary head's rival is its own logit
negated, a multiclass head's its largest other logit.

The paper evaluates the gradients of a copy of the network with softplus in place of ReLU, whose
second derivative is not zero. A TorchScript graph or exported program cannot have its
activations replaced, so the model's own are used: for a ReLU network the attack that picks the
training point then follows only the direct dependence of the cosine on the image (the
gradient's own change with the image is zero almost everywhere), which makes that point weaker;
the triplet term's gradient in the weights is unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ArtSettings:
    """The authors' CIFAR settings (their public training code): the triplet term weighed 0.5,
    its training point 3 steps of 5/255 from a random start within 8/255, the attack on the
    top 1,000 of 3,072 input values (a third)."""

    art_weight: float = 0.5
    art_epsilon: float = 8 / 255  # [0, 1] pixel units
    art_steps: int = 3
    art_step_size: float = 5 / 255
    art_top_share: float = 1000 / 3072


def class_gradients(target, x: torch.Tensor, reference: torch.Tensor, create_graph: bool) -> tuple:
    """Input gradients of the reference class's score and of its rival's, per image."""
    if not x.requires_grad:
        x = x.requires_grad_(True)
    out = target(x)
    true = target.explained_score(out, reference).sum()
    rival = target.rival_score(out, reference).sum()
    (g_true,) = torch.autograd.grad(true, x, create_graph=create_graph, retain_graph=True)
    (g_rival,) = torch.autograd.grad(rival, x, create_graph=create_graph)
    return g_true, g_rival


def triplet(x: torch.Tensor, g_true: torch.Tensor, g_rival: torch.Tensor,
            index: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) soft-margin triplet loss on cosine distances, anchor the image; on the input values
    `index` (B, k) only where given."""
    flat = [t.flatten(1) for t in (x, g_true, g_rival)]
    if index is not None:
        flat = [t.gather(1, index) for t in flat]
    image, positive, negative = flat
    d_pos = 1 - F.cosine_similarity(image, positive, dim=1, eps=1e-8)
    d_neg = 1 - F.cosine_similarity(image, negative, dim=1, eps=1e-8)
    return F.softplus(-(d_neg - d_pos))


def training_point(target, x: torch.Tensor, reference: torch.Tensor, settings: ArtSettings,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The point within `art_epsilon` of each image (in [-1, 1]) that `art_steps` signed steps,
    from a random start, choose to break the alignment on the top input values of the image's
    own true-class gradient."""
    radius, step = 2 * settings.art_epsilon, 2 * settings.art_step_size  # [0, 1] units -> [-1, 1]
    x0 = x.detach()
    noise = torch.rand(x0.shape, generator=generator, device="cpu").to(x0.device, x0.dtype)
    point = (x0 + radius * (2 * noise - 1)).clamp(-1, 1)
    g_true, _ = class_gradients(target, point.clone(), reference, create_graph=False)
    k = max(1, round(settings.art_top_share * g_true[0].numel()))
    index = g_true.flatten(1).abs().topk(k, dim=1).indices
    for _ in range(settings.art_steps):
        point = point.detach().requires_grad_(True)
        g_true, g_rival = class_gradients(target, point, reference, create_graph=True)
        loss = triplet(point, g_true, g_rival, index).sum()
        (direction,) = torch.autograd.grad(loss, point, allow_unused=True)
        if direction is None:  # a graph whose gradient does not depend on the image at all
            break
        point = (point.detach() + step * direction.sign()).clamp(x0 - radius, x0 + radius).clamp(-1, 1)
    return point.detach()


def art_terms(target, x: torch.Tensor, point: torch.Tensor, reference: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image: the task loss at the training point (`training_point`), and the triplet term
    on the image and on the point (each with its own gradients), both differentiable in the
    model's weights: call with the weights requiring gradients (and pick the point without)."""
    both = torch.cat([x.detach(), point.detach()]).requires_grad_(True)
    twice = torch.cat([reference, reference])
    g_true, g_rival = class_gradients(target, both, twice, create_graph=True)
    term = triplet(both, g_true, g_rival).view(2, len(x)).mean(dim=0)
    return {"point_loss": target.loss(target(point.detach()), reference).float(), "triplet": term.float()}
