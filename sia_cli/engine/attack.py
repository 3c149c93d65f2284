"""One attack loop for SIA, its ablations and the baselines.

Every method is the same projected gradient loop over `f(G(x, a))` (or `f(x)` for
pixel baselines); what differs is configuration: which inputs move, through which
graph, and with which update rule. Per step: one forward, one backward giving the
gradients of both inputs, in-place updates and projections, no host sync.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from sia_cli.backbone.attgan import edited
from sia_cli.errors import SiaError

AMP_MODES = (None, "bf16")


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

    def __post_init__(self):
        if self.amp not in AMP_MODES:
            raise SiaError(f"--amp {self.amp!r}: only bf16 is supported")

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


def amp_context(device: torch.device, amp: str | None):
    """bf16 autocast for `--amp bf16`; the loss and the updates stay in fp32."""
    if amp is None:
        return contextlib.nullcontext()
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


def attack_batch(
    backbone,
    target,
    method: Method,
    x0: torch.Tensor,
    a0: torch.Tensor,
    reference: torch.Tensor,
    settings: AttackSettings,
    protected: torch.Tensor | None = None,
    *,
    movable: torch.Tensor | None = None,
    start_offset: torch.Tensor | None = None,
    seed: int | None = None,
    on_step=None,
) -> AttackState:
    """A batch's attack as every caller runs it (attack, diagnose, augment, the speed probe, harden).

    `protected` (K,) bool: attributes held within protect_eps of a0. `movable` (B, K) bool: where
    given, only those entries may move (single-attribute diagnosis). `start_offset` (B, K): start
    that far from a0 in the unprotected attributes, within a0's ball (augment's later rounds).
    `seed` seeds the random start of methods that have one (PGD).
    """
    fixed = protected.to(a0.device).expand_as(a0) if protected is not None else None
    radius = attribute_radius(a0, settings, fixed)
    if movable is not None:
        radius = torch.where(movable, radius, torch.zeros_like(radius))
    start = a0
    if start_offset is not None:
        offset = start_offset.to(a0.device)
        start, radius = shifted_start(a0, radius, offset * ~fixed if fixed is not None else offset)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return run_loop(backbone, target, method, x0, start, reference, settings, radius, generator, on_step)


def shifted_start(a0: torch.Tensor, radius: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A start inside a0's ball and a radius around it whose ball never leaves a0's ball.

    The attack loop centres its ball on its start, so a shifted start needs a new radius: one
    side of the box that ends at 0 or 1 is no constraint (the loop clips to [0, 1] anyway); a
    side inside (0, 1) limits the radius to the room left on that side.
    """
    low, high = (a0 - radius).clamp(0, 1), (a0 + radius).clamp(0, 1)
    start = torch.minimum(torch.maximum(a0 + offset, low), high)
    unbounded = torch.full_like(a0, math.inf)
    room_below = torch.where(low > 0, start - low, unbounded)
    room_above = torch.where(high < 1, high - start, unbounded)
    # Unmoved entries keep their radius exactly, so an unshifted start is bit for bit the paper's attack.
    return start, torch.where(start == a0, radius, torch.minimum(room_below, room_above).clamp(max=1.0))


def pixel_box(x0: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of x: the eps-ball around x0 within [0, 1]."""
    return (x0 - eps).clamp_(0, 1), (x0 + eps).clamp_(0, 1)


def attribute_box(a0: torch.Tensor, radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of a: the per-entry radius around a0 within [0, 1]."""
    return (a0 - radius).clamp_(0, 1), (a0 + radius).clamp_(0, 1)


def random_offset(x0: torch.Tensor, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    """PGD's uniform start offset in [-eps, eps], for the whole batch in one draw.

    Drawn on the CPU so that a seed gives the same start on any device.
    """
    noise = torch.rand(x0.shape, generator=generator, device="cpu").to(x0.device)
    return (noise * 2 - 1) * eps


def working_copy(x0: torch.Tensor) -> torch.Tensor:
    # Prepared models hold NHWC weights (sia_cli.engine.speed); an NHWC x spares the first cuDNN
    # convolution a layout copy per step. On CPU x keeps its layout, so that a loop on
    # unprepared models does exactly the reference's arithmetic.
    layout = torch.channels_last if x0.is_cuda and x0.dim() == 4 else torch.preserve_format
    return x0.clone(memory_format=layout)


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
    """Algorithm 1 for a whole batch at once; `a_radius` (B, K) bounds each attribute's move.

    Per step: one forward and one backward of f(G(x, a)) that give the gradients of both
    inputs, updates and projections in place, and nothing read back to the host, so the
    device never waits for Python. Success flags and logs are computed by the caller from
    the returned state. The loaders freeze both models' parameters, so the backward keeps
    and computes nothing for weights: input gradients only.
    """
    settings = settings.for_method(method)
    x_lo, x_hi = pixel_box(x0, settings.eps)
    a_lo, a_hi = attribute_box(a0, a_radius)
    x, a = working_copy(x0), a0.clone()
    if method.random_start:
        x.add_(random_offset(x0, settings.eps, generator)).clamp_(min=x_lo, max=x_hi)
    moving = [t for t, moves in ((x, method.moves_pixels), (a, method.moves_attributes)) if moves]
    for t in moving:
        t.requires_grad_(True)
    square_avg = torch.zeros_like(a) if method.rule == "rmsprop" else None
    attr_step = settings.attr_step_size or settings.step_size
    for step in range(settings.steps):
        grads = gradients(backbone, target, method, x, a, reference, moving, settings.amp)
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
    return final_state(backbone, target, method, x.detach(), a.detach(), settings.amp)


def gradients(backbone, target, method: Method, x, a, reference, moving: list[torch.Tensor], amp: str | None):
    """One forward and one backward of f(G(x, a)): the gradients of the `moving` inputs, together."""
    with amp_context(x.device, amp):
        loss = target.loss(target(render(backbone, method, x, a)), reference).float().sum()
    return torch.autograd.grad(loss, moving)


def final_state(backbone, target, method: Method, x: torch.Tensor, a: torch.Tensor, amp: str | None) -> AttackState:
    """Render the adversary and judge it.

    It is judged as it will be saved (8-bit PNG) and by the target in full precision, as
    the clean reference label was, so the report never claims a success that writing the
    file or deploying the model undoes.
    """
    with torch.inference_mode():
        with amp_context(x.device, amp):
            rendered = render(backbone, method, x, a)
        adversary = quantize(rendered.float())
        output = target(adversary)
    return AttackState(x=x, a=a, adversary=adversary.clone(), output=output.clone())


def _rmsprop_(a: torch.Tensor, grad: torch.Tensor, square_avg: torch.Tensor, lr: float) -> None:
    """Gradient *ascent* with RMSProp (alpha 0.99, eps 1e-8, PyTorch's defaults)."""
    square_avg.mul_(0.99).addcmul_(grad, grad, value=0.01)
    a.addcdiv_(grad, square_avg.sqrt().add_(1e-8), value=lr)


def _one_attribute_effects(backbone, target, x: torch.Tensor, base: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, K): target.distance between `base` (B outputs) and f(G(x, rows[:, j])) for each of
    the K attribute vectors `rows` (B, K, K) holds per image; x in [0, 1]."""
    batch, k = rows.shape[:2]
    images = (x * 2 - 1).unsqueeze(1).expand(-1, k, -1, -1, -1).flatten(0, 1)
    # In pieces of the attack's own batch size: B * K images at once could exhaust the memory
    # that --batch-size auto sized for B.
    pieces = zip(images.split(batch), rows.flatten(0, 1).split(batch))
    outputs = torch.cat([target(backbone(piece, attrs)) for piece, attrs in pieces])
    return target.distance(base.repeat_interleave(k, dim=0), outputs).view(batch, k)


@torch.inference_mode()
def ablation_effects(backbone, target, x: torch.Tensor, a: torch.Tensor, a0: torch.Tensor) -> torch.Tensor:
    """d_k per image: |p(G(x, a)) - p(G(x, a with a_k reset to a0_k))|, K extra forwards per image.

    `target.distance` compares two outputs (probabilities, or keypoint error), so the measure
    reflects how much each attribute's move matters to the model, not only that it moved.
    """
    k = a.shape[1]
    reset = a.unsqueeze(1).repeat(1, k, 1)  # (B, K, K): row j has attribute j reset
    index = torch.arange(k, device=a.device)
    reset[:, index, index] = a0
    effect = _one_attribute_effects(backbone, target, x, target(backbone(x * 2 - 1, a)), reset)
    # Resetting an attribute that never moved changes nothing; without the mask, kernels that
    # vary with batch composition would report ~1e-7 for it.
    return effect * (a != a0)


@torch.inference_mode()
def flip_effects(backbone, target, x0: torch.Tensor, a0: torch.Tensor, attributes: Sequence[str] = ()) -> torch.Tensor:
    """c_k per image: distance(f(G(x0, a0)), f(G(x0, a0 with a_k flipped))), K extra forwards per
    image; no attack.

    Each attribute is switched to the other side of 0.5 (a_k -> 1 if a_k <= 0.5, else 0), so a
    starting vector that the critic's head estimated (values between 0 and 1) is flipped as fully
    as a labelled one; given the backbone's `attributes`, an attribute turned on turns off what
    cannot go with it (`attgan.edited`: another hair colour, Bald against Bangs), the edit the
    backbone was trained and judged on, and the one the renderer's true effects are made of.
    Where the backbone edits what it names, this estimates each attribute's true effect
    directly, whatever path an attack took.
    """
    k = a0.shape[1]
    rows = []
    for column in range(k):
        start = a0.clone()
        start[:, column] = (a0[:, column] > 0.5).to(a0.dtype)  # so that edited's 1 - a lands across 0.5
        if attributes:
            rows.append(edited(start, column, attributes)[0])
        else:
            start[:, column] = 1 - start[:, column]
            rows.append(start)
    flipped = torch.stack(rows, dim=1)  # (B, K, K): row j has attribute j flipped
    return _one_attribute_effects(backbone, target, x0, target(backbone(x0 * 2 - 1, a0)), flipped)
