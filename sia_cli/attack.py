"""One attack loop for SIA, its ablations and the baselines.

Every method is the same projected gradient loop over `f(G(x, a))` (or `f(x)` for
pixel baselines); what differs is configuration: which inputs move, through which
graph, and with which update rule. Per step: one forward, one backward giving the
gradients of both inputs, in-place updates and projections, no host sync.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch

from sia_cli.errors import SiaError


@dataclass(frozen=True)
class Method:
    name: str
    moves_attributes: bool
    moves_pixels: bool
    through_generator: bool
    rule: str = "sign"  # "sign" (paper Eq. 1) or "rmsprop" (raw gradients, SPT)
    single_step: bool = False  # FGSM: one step of size eps
    random_start: bool = False
    summary: str = ""


METHODS = {
    m.name: m
    for m in (
        Method("sia", True, True, True, summary="attributes and pixels through the generator (the paper's SIA)"),
        Method("attr", True, False, True, summary="attributes only, through the generator (ablation)"),
        Method("image", False, True, True, summary="pixels only, through the generator (ablation)"),
        Method("pgd", False, True, False, random_start=True, summary="pixel PGD on the plain image, no generator"),
        Method("fgsm", False, True, False, single_step=True, summary="one signed step of size eps, no generator"),
        Method("spt", True, False, True, rule="rmsprop", summary="attributes only, RMSProp on raw gradients (SPT)"),
    )
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise SiaError(f"unknown method {name!r}: choose from {', '.join(METHODS)}")
    return METHODS[name]


@dataclass(frozen=True)
class AttackSettings:
    steps: int = 200
    eps: float = 1.5 / 255
    step_size: float = 0.25 / 255
    eps_attr: float = 1.0
    attr_step_size: float | None = None  # defaults to step_size, as in the paper
    protect_eps: float = 0.0
    amp: str | None = None  # None or "bf16"
    nme_threshold: float = 0.1

    def for_method(self, method: Method) -> "AttackSettings":
        if method.single_step:
            return replace(self, steps=1, step_size=self.eps)
        return self


@dataclass
class AttackState:
    """Where a batch ended: inputs, bounds and the final images and outputs."""

    x: torch.Tensor  # pixels in [0, 1]
    a: torch.Tensor  # attributes in [0, 1]
    adversary: torch.Tensor  # final image in [-1, 1] at the backbone's size
    output: torch.Tensor  # target output on the adversary


def _autocast(device: torch.device, amp: str | None):
    if amp is None:
        return contextlib.nullcontext()
    if amp != "bf16":
        raise SiaError(f"--amp {amp!r}: only bf16 is supported")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def render(backbone, method: Method, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The image the target sees, in [-1, 1]."""
    image = x * 2 - 1
    return backbone(image, a) if method.through_generator else image


def quantize(image: torch.Tensor) -> torch.Tensor:
    """[-1, 1] image -> the nearest image an 8-bit PNG can hold, still in [-1, 1]."""
    return ((image.clamp(-1, 1) + 1) * 127.5).round_().div_(127.5).sub_(1)


def attribute_radius(a0: torch.Tensor, settings: AttackSettings, fixed: torch.Tensor | None) -> torch.Tensor:
    """Per-entry radius of the attribute ball: `fixed` entries (protected) get protect_eps."""
    radius = torch.full_like(a0, settings.eps_attr)
    if fixed is not None:
        radius = torch.where(fixed, torch.full_like(a0, settings.protect_eps), radius)
    return radius


def run_loop(
    backbone,
    target,
    method: Method,
    x0: torch.Tensor,
    a0: torch.Tensor,
    reference: torch.Tensor,
    settings: AttackSettings,
    a_radius: torch.Tensor,
    generator: torch.Generator | None = None,
    on_step=None,
) -> AttackState:
    """Algorithm 1 for a whole batch at once; `a_radius` (B, K) bounds each attribute's move."""
    settings = settings.for_method(method)
    x_lo, x_hi = (x0 - settings.eps).clamp_(0, 1), (x0 + settings.eps).clamp_(0, 1)
    a_lo, a_hi = (a0 - a_radius).clamp_(0, 1), (a0 + a_radius).clamp_(0, 1)
    x, a = x0.clone(), a0.clone()
    if method.random_start:
        noise = torch.rand(x.shape, generator=generator, device="cpu").to(x.device)
        x.add_((noise * 2 - 1) * settings.eps).clamp_(min=x_lo, max=x_hi)
    moving = [t for t, moves in ((x, method.moves_pixels), (a, method.moves_attributes)) if moves]
    for t in moving:
        t.requires_grad_(True)
    square_avg = torch.zeros_like(a) if method.rule == "rmsprop" else None
    attr_step = settings.attr_step_size or settings.step_size
    for step in range(settings.steps):
        with _autocast(x.device, settings.amp):
            loss = target.loss(target(render(backbone, method, x, a)), reference).float().sum()
        grads = torch.autograd.grad(loss, moving)
        with torch.no_grad():
            for t, g in zip(moving, grads):
                if t is x:
                    x.add_(g.sign(), alpha=settings.step_size).clamp_(min=x_lo, max=x_hi)
                elif square_avg is not None:
                    _rmsprop_(a, g, square_avg, attr_step)
                    a.clamp_(min=a_lo, max=a_hi)
                else:
                    a.add_(g.sign(), alpha=attr_step).clamp_(min=a_lo, max=a_hi)
        if on_step is not None:
            on_step(step + 1, settings.steps)
    x, a = x.detach(), a.detach()
    with torch.inference_mode(), _autocast(x.device, settings.amp):
        # Judge the adversary as it will be saved (8-bit PNG) so the report never claims
        # a success that writing the file undoes.
        adversary = quantize(render(backbone, method, x, a).float())
        output = target(adversary)
    return AttackState(x=x, a=a, adversary=adversary.clone(), output=output.clone())


def _rmsprop_(a: torch.Tensor, grad: torch.Tensor, square_avg: torch.Tensor, lr: float) -> None:
    """Gradient *ascent* with RMSProp (alpha 0.99, eps 1e-8, PyTorch's defaults)."""
    square_avg.mul_(0.99).addcmul_(grad, grad, value=0.01)
    a.addcdiv_(grad, square_avg.sqrt().add_(1e-8), value=lr)


@torch.inference_mode()
def ablation_effects(backbone, target, x: torch.Tensor, a: torch.Tensor, a0: torch.Tensor) -> torch.Tensor:
    """d_k per image: |p(G(x, a)) - p(G(x, a with a_k reset to a0_k))|, K extra forwards per image.

    `target.distance` compares two outputs (probabilities, or keypoint error), so the measure
    reflects how much each attribute's move matters to the model, not only that it moved.
    """
    batch, k = a.shape
    base = target(backbone(x * 2 - 1, a))
    reset = a.unsqueeze(1).repeat(1, k, 1)  # (B, K, K): row j has attribute j reset
    index = torch.arange(k, device=a.device)
    reset[:, index, index] = a0
    images = (x * 2 - 1).unsqueeze(1).expand(-1, k, -1, -1, -1).flatten(0, 1)
    ablated = target(backbone(images, reset.flatten(0, 1)))
    effect = target.distance(base.repeat_interleave(k, dim=0), ablated).view(batch, k)
    # Resetting an attribute that never moved changes nothing; without the mask, kernels that
    # vary with batch composition would report ~1e-7 for it.
    return effect * (a != a0)
