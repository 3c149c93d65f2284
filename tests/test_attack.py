"""The attack engine (`sia_cli.engine.attack`): every method as configuration of one loop.

Real tensors throughout: the shipped 64x64 backbone, the shipped TorchScript eyeglasses
classifier loaded with `load_target`, and a few synthetic faces. Numbers such as the
success rate depend on the checkpoint (which gets retrained), so only invariants are
asserted here.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import synth_batch

from sia_cli.backbone.registry import load_backbone
from sia_cli.engine import attack as engine
from sia_cli.engine.attack import (
    METHODS,
    AttackSettings,
    ablation_effects,
    attribute_radius,
    get_method,
    quantize,
    render,
    run_loop,
)
from sia_cli.errors import SiaError
from sia_cli.targets import load_target

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit deprecation notices

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "examples" / "targets" / "eyeglasses_confounded.pt"
N_IMAGES = 3
STEPS = 4
# Attributes held by the protection mask in these tests (Eyeglasses is what the target predicts).
PROTECTED = ("Eyeglasses", "Smiling")
# Steps large enough that every bound is reached within STEPS: pixel steps of 1/255 against
# eps 1.5/255, attribute steps of 0.3 against the [0, 1] box and the protection radius.
BOUND_SETTINGS = AttackSettings(steps=STEPS, eps=1.5 / 255, step_size=1 / 255, attr_step_size=0.3)


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(None)  # the registry default, synth-faces-64


@pytest.fixture(scope="module")
def target(backbone):
    return load_target(TARGET, probe_size=backbone.img_size)


@pytest.fixture(scope="module")
def faces(tmp_path_factory, backbone):
    """(x0 in [0, 1], a0 in [0, 1]) for a few synthetic faces at the backbone's size."""
    return synth_batch(tmp_path_factory.mktemp("faces"), backbone, N_IMAGES, seed=3)


@pytest.fixture(scope="module")
def reference(target, faces):
    x0, _ = faces
    with torch.no_grad():
        return target.reference(target(x0 * 2 - 1))


def protection_mask(backbone, a0: torch.Tensor) -> torch.Tensor:
    fixed = torch.tensor([name in PROTECTED for name in backbone.attributes])
    return fixed.expand_as(a0)


def attack(backbone, target, faces, reference, method: str, settings=BOUND_SETTINGS, a0=None, fixed=None):
    x0, file_a0 = faces
    a0 = file_a0 if a0 is None else a0
    radius = attribute_radius(a0, settings, fixed)
    state = run_loop(backbone, target, get_method(method), x0, a0, reference, settings, radius,
                     torch.Generator().manual_seed(0))
    return x0, a0, state


def centred(a0: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    # Protected attributes start at 0.5 so that they could move either way: a start on
    # the edge of [0, 1] would hide a broken protection behind the box clamp.
    return torch.where(fixed, torch.full_like(a0, 0.5), a0)


# ------------------------------------------------------------------------- bounds


@pytest.mark.parametrize("method", list(METHODS))
def test_bounds_hold_and_protected_attributes_do_not_move(backbone, target, faces, reference, method):
    fixed = protection_mask(backbone, faces[1])
    a0 = centred(faces[1], fixed)
    settings = replace(BOUND_SETTINGS, protect_eps=0.0)
    x0, a0, state = attack(backbone, target, faces, reference, method, settings, a0, fixed)
    assert (state.x - x0).abs().max() <= settings.eps + 1e-6
    assert 0 <= state.x.min() and state.x.max() <= 1
    assert 0 <= state.a.min() and state.a.max() <= 1
    assert torch.equal(state.a[fixed], a0[fixed])  # not "close": protect_eps 0 means no move at all


@pytest.mark.parametrize("method", [m for m in METHODS if METHODS[m].moves_attributes])
def test_protected_attributes_move_at_most_protect_eps(backbone, target, faces, reference, method):
    fixed = protection_mask(backbone, faces[1])
    a0 = centred(faces[1], fixed)
    settings = replace(BOUND_SETTINGS, protect_eps=0.1)
    _, a0, state = attack(backbone, target, faces, reference, method, settings, a0, fixed)
    moved = (state.a - a0).abs()
    assert moved[fixed].max() <= 0.1 + 1e-6
    # Steps of 0.3 push past 0.1 at once: the radius, not a small step, is what held them.
    assert moved[fixed].max() > 0.1 - 1e-6
    # Unprotected attributes keep the full radius eps_attr = 1.
    assert moved[~fixed].max() > 0.1


def test_attribute_radius_is_eps_attr_except_for_fixed_entries():
    a0 = torch.rand(2, 4)
    settings = AttackSettings(eps_attr=0.7, protect_eps=0.05)
    fixed = torch.tensor([[True, False, False, True]] * 2)
    radius = attribute_radius(a0, settings, fixed)
    assert torch.equal(radius, torch.tensor([[0.05, 0.7, 0.7, 0.05]] * 2))
    assert torch.equal(attribute_radius(a0, settings, None), torch.full_like(a0, 0.7))


# ---------------------------------------------------------- which graph each method uses


class CountingBackbone(torch.nn.Module):
    """The real backbone, counting how often the generator runs."""

    def __init__(self, backbone):
        super().__init__()
        self.inner = backbone
        self.calls = 0

    def forward(self, x, a):
        self.calls += 1
        return self.inner(x, a)


class _CountBackward(torch.autograd.Function):
    """Identity whose backward counts how many backward passes flow through the target."""

    @staticmethod
    def forward(ctx, value, counter):
        ctx.counter = counter
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        ctx.counter["backward"] += 1
        return grad, None


class CountingTarget:
    """The real target, counting forwards and backward passes through its output."""

    def __init__(self, target):
        self.inner = target
        self.counter = {"forward": 0, "backward": 0}

    def __call__(self, image):
        self.counter["forward"] += 1
        out = self.inner(image)
        return _CountBackward.apply(out, self.counter) if torch.is_grad_enabled() else out

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("method", list(METHODS))
def test_generator_calls_per_method(backbone, target, faces, reference, method):
    counting = CountingBackbone(backbone)
    attack(counting, target, faces, reference, method)
    steps = 1 if METHODS[method].single_step else STEPS
    # Pixel baselines attack the plain image; the others render once per step plus the adversary.
    expected = steps + 1 if METHODS[method].through_generator else 0
    assert counting.calls == expected


@pytest.mark.parametrize("method", list(METHODS))
def test_exactly_one_backward_per_step(backbone, target, faces, reference, method, monkeypatch):
    grad_calls = []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(engine.torch.autograd, "grad", lambda *a, **k: grad_calls.append(1) or real_grad(*a, **k))
    counting = CountingTarget(target)
    attack(backbone, counting, faces, reference, method)
    steps = 1 if METHODS[method].single_step else STEPS
    # One backward gives the gradients of pixels and attributes together, never one each.
    assert len(grad_calls) == steps
    assert counting.counter["backward"] == steps
    # One forward per step, one for judging the final adversary.
    assert counting.counter["forward"] == steps + 1


# ------------------------------------------------------------------- update rules


def test_fgsm_is_one_signed_step_of_size_eps(backbone, target, faces, reference):
    settings = AttackSettings(steps=50, eps=2 / 255, step_size=0.1 / 255)  # fgsm ignores both
    x0, _, state = attack(backbone, target, faces, reference, "fgsm", settings)
    image = (x0 * 2 - 1).requires_grad_()
    loss = target.loss(target(image), reference).sum()
    (gradient,) = torch.autograd.grad(loss, image)  # d/dx = 2 d/dimage: same sign
    expected = (x0 + settings.eps * gradient.sign()).clamp(0, 1)
    assert torch.allclose(state.x, expected, atol=1e-6)
    inside = (x0 > settings.eps) & (x0 < 1 - settings.eps) & (gradient != 0)
    assert torch.allclose((state.x - x0).abs()[inside], torch.tensor(settings.eps), atol=1e-6)


def test_sign_rule_moves_attributes_by_whole_steps(backbone, target, faces, reference):
    step = 0.01
    settings = AttackSettings(steps=5, attr_step_size=step)
    a0 = torch.full_like(faces[1], 0.5)  # in the middle of [0, 1]: no clamp can cut a step short
    _, a0, state = attack(backbone, target, faces, reference, "attr", settings, a0)
    in_steps = (state.a - a0) / step
    assert torch.allclose(in_steps, in_steps.round(), atol=1e-3)


def test_spt_moves_attributes_by_raw_gradient_rmsprop_not_sign(backbone, target, faces, reference):
    step = 0.01
    settings = AttackSettings(steps=5, attr_step_size=step)
    a0 = torch.full_like(faces[1], 0.5)
    x0, a0, state = attack(backbone, target, faces, reference, "spt", settings, a0)
    assert torch.equal(state.x, x0)  # attribute-only
    in_steps = (state.a - a0) / step
    assert (in_steps - in_steps.round()).abs().max() > 1e-2, "spt moves look like sign steps"
    assert (state.a != a0).any()


def test_attr_never_moves_pixels(backbone, target, faces, reference):
    x0, a0, state = attack(backbone, target, faces, reference, "attr")
    assert torch.equal(state.x, x0)
    assert (state.a != a0).any()


@pytest.mark.parametrize("method", ["image", "pgd", "fgsm"])
def test_pixel_methods_never_move_attributes(backbone, target, faces, reference, method):
    x0, a0, state = attack(backbone, target, faces, reference, method)
    assert torch.equal(state.a, a0)
    assert (state.x != x0).any()


def test_pgd_random_start_depends_on_the_generator_seed(backbone, target, faces, reference):
    x0, a0 = faces
    settings = AttackSettings(steps=1)
    radius = attribute_radius(a0, settings, None)

    def run(seed):
        return run_loop(backbone, target, get_method("pgd"), x0, a0, reference, settings, radius,
                        torch.Generator().manual_seed(seed)).x

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


def test_final_adversary_is_judged_as_the_8bit_image_it_will_be_saved_as(backbone, target, faces, reference):
    _, _, state = attack(backbone, target, faces, reference, "sia")
    assert torch.equal(state.adversary, quantize(state.adversary))
    with torch.no_grad():
        assert torch.allclose(state.output, target(state.adversary), atol=1e-5)
        rendered = quantize(render(backbone, get_method("sia"), state.x, state.a))
    assert torch.allclose(state.adversary, rendered, atol=1e-6)


def test_unknown_method_is_a_sia_error():
    with pytest.raises(SiaError, match="unknown method 'cw'"):
        get_method("cw")


# ------------------------------------------------------------------------ helpers


def test_quantize_values_are_k_over_127_5_minus_1():
    image = torch.rand(2, 3, 9, 11) * 2.4 - 1.2  # also outside [-1, 1]
    quantized = quantize(image)
    k = ((quantized + 1) * 127.5).round()
    assert k.min() >= 0 and k.max() <= 255
    assert torch.equal(quantized, k / 127.5 - 1)
    assert torch.equal(quantize(quantized), quantized)  # idempotent: saving twice changes nothing
    assert (quantized - image.clamp(-1, 1)).abs().max() <= 1 / 255 + 1e-6  # the nearest level


def test_ablation_effects_are_nonnegative_and_zero_for_unmoved_attributes(backbone, target, faces, reference):
    fixed = protection_mask(backbone, faces[1])
    _, a0, state = attack(backbone, target, faces, reference, "sia", a0=None, fixed=fixed)
    effects = ablation_effects(backbone, target, state.x, state.a, a0)
    assert effects.shape == a0.shape
    assert (effects >= 0).all()
    unmoved = state.a == a0
    assert unmoved[fixed].all() and (~unmoved).any()
    assert (effects[unmoved] == 0).all()
