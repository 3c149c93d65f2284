"""Algorithm 1 of the paper as written: one image at a time, fp32, no tricks.

This is the reference that the engine's batched loop (`sia_cli.attack.run_loop`) is verified
against (tests/test_reference.py) and timed against (bench/attack_bench.py). The command
line never uses it.

Both lines of Algorithm 1 differentiate the same loss at the same point (x_{i-1}, a_{i-1}),
so one backward per step gives both gradients here too: the benchmark's speedup then
measures batching and the loop's care, not a second backward.
"""

from __future__ import annotations

import torch

from sia_cli.engine.attack import AttackSettings, AttackState, Method, quantize, random_offset, render


def reference_loop(
    backbone,
    target,
    method: Method,
    x0: torch.Tensor,
    a0: torch.Tensor,
    reference: torch.Tensor,
    settings: AttackSettings,
    a_radius: torch.Tensor,
    generator: torch.Generator | None = None,
) -> AttackState:
    """The engine's signature and result, computed image by image."""
    settings = settings.for_method(method)
    # PGD's random start is drawn for the whole set in one call, as the engine draws it, so
    # both loops start from the same points.
    offsets = random_offset(x0, settings.eps, generator) if method.random_start else torch.zeros_like(x0)
    finals = [
        attack_one(backbone, target, method, x0[i], a0[i], reference[i], settings, a_radius[i], offsets[i])
        for i in range(len(x0))
    ]
    x, a = torch.stack([f[0] for f in finals]), torch.stack([f[1] for f in finals])
    adversary, output = zip(*(judge(backbone, target, method, xi, ai) for xi, ai in zip(x, a)))
    return AttackState(x=x, a=a, adversary=torch.cat(adversary), output=torch.cat(output))


def attack_one(backbone, target, method: Method, x0, a0, reference, settings: AttackSettings, a_radius, offset):
    """T steps of Algorithm 1 for one image (x0 (3, S, S), a0 (K,)); returns (x_T, a_T)."""
    eta_x, eta_a = settings.step_size, settings.attr_step_size or settings.step_size
    x = project(x0 + offset, x0, settings.eps)
    a = a0.clone()
    square_avg = torch.zeros_like(a)
    for _ in range(settings.steps):
        x, a = x.detach().requires_grad_(method.moves_pixels), a.detach().requires_grad_(method.moves_attributes)
        loss = target.loss(target(render(backbone, method, x[None], a[None])), reference[None]).sum()
        moving = [t for t in (x, a) if t.requires_grad]
        grads = dict(zip(map(id, moving), torch.autograd.grad(loss, moving)))
        g_x, g_a = grads.get(id(x)), grads.get(id(a))
        with torch.no_grad():
            if method.moves_attributes and method.rule == "rmsprop":
                square_avg = 0.99 * square_avg + 0.01 * g_a * g_a
                a = project(a + eta_a * g_a / (square_avg.sqrt() + 1e-8), a0, a_radius)
            elif method.moves_attributes:
                a = project(a + eta_a * g_a.sign(), a0, a_radius)
            if method.moves_pixels:
                x = project(x + eta_x * g_x.sign(), x0, settings.eps)
    return x.detach(), a.detach()


def project(value: torch.Tensor, start: torch.Tensor, radius) -> torch.Tensor:
    """clip_[0,1](Proj_{|v - start|_inf <= radius}(v))."""
    return value.clamp(min=start - radius, max=start + radius).clamp(0, 1)


@torch.no_grad()
def judge(backbone, target, method: Method, x: torch.Tensor, a: torch.Tensor):
    """x_hat = G(x_T, a_T) as its 8-bit PNG, and the target's output on it."""
    adversary = quantize(render(backbone, method, x[None], a[None]))
    return adversary, target(adversary)


def difference(one: AttackState, other: AttackState) -> dict:
    """How far two attacks on the same images ended apart: share of 8-bit adversary values
    that differ, the largest difference in 8-bit levels, the largest attribute difference."""
    levels = (((one.adversary + 1) * 127.5).round() - ((other.adversary + 1) * 127.5).round()).abs()
    return {
        "share_different": float((levels > 0).float().mean()),
        "max_levels": int(levels.max()),
        "max_attribute": float((one.a - other.a).abs().max()),
    }
