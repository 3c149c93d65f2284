"""Making the attack fast on the hardware at hand: memory layout, compilation, batch size.

`tune` runs once per run, after the models are loaded and before the first batch. The
attack loop (`sia_cli.attack.run_loop`) is the same whatever is chosen here.
"""

from __future__ import annotations

import gc
from dataclasses import replace
from typing import Callable

import torch

from sia_cli.engine.attack import METHODS, AttackSettings, attack_batch
from sia_cli.errors import SiaError
from sia_cli.runs.distributed import World, agree, all_gather

AUTO = "auto"
# A CPU has no device memory to fill: `--batch-size auto` takes the size at which the example
# attack's throughput peaked on this project's 2-core CPU (bench/RESULTS.md).
CPU_BATCH = 64
# Share of the largest batch that fitted that `auto` uses: cuDNN picks workspace-hungry
# algorithms per shape, and a run holds a few tensors the probe does not.
HEADROOM = 0.9


def tune(config, inputs, device: torch.device, world: World = World(), rows: int = 1, wanted: int = 1) -> int:
    """Prepare the run's models in place; return the batch size to use (`auto` settled).

    `rows`: attack rows per image (single-attribute diagnosis attacks K at once); `wanted`:
    images the run will attack, which `auto` never exceeds."""
    return prepare(inputs.backbone, inputs.target, device, config.settings, config.batch_size, config.compile,
                   rows, max(wanted, 1), world)


def prepare(backbone, target, device: torch.device, settings: AttackSettings, batch_size: int | str = AUTO,
            compile: bool = False, rows: int = 1, cap: int = 1 << 16, world: World = World(),
            channels_last: bool = True) -> int:
    """Models in NHWC layout (and compiled on request); returns the batch size to use.

    Order matters: the batch size is probed on the models as they will run, but before
    compilation, which would otherwise compile a graph for every size tried.
    """
    if channels_last:
        to_channels_last(backbone, target)
    if batch_size == AUTO:
        batch_size = agreed_batch_size(backbone, target, settings, device, rows, cap, world)
    if compile:
        compile_models(backbone, target)
    return batch_size


def to_channels_last(*modules: torch.nn.Module) -> None:
    """NHWC weights. cuDNN's fastest convolution kernels (bf16 tensor cores included) want
    them, and oneDNN on this project's CPU ran the example attack about 15% faster with them
    (bench/RESULTS.md). Convolutions follow the weights' layout, so inputs need no change."""
    for module in modules:
        module.to(memory_format=torch.channels_last)


def compile_models(backbone: torch.nn.Module, target: torch.nn.Module) -> None:
    """torch.compile both models in place, so their attributes and methods stay reachable.

    A TorchScript target runs in the TorchScript runtime, which torch.compile cannot trace:
    it stays as it is (its own JIT optimises it) and only the generator is compiled.
    """
    backbone.compile()
    if not isinstance(getattr(target, "model", None), torch.jit.ScriptModule):
        target.compile()


def agreed_batch_size(backbone, target, settings: AttackSettings, device: torch.device, rows: int, cap: int,
                      world: World) -> int:
    """`auto` on every rank, then the smallest: ranks must cut the run into the same blocks."""
    size = agree(lambda: auto_batch_size(backbone, target, settings, device, rows, cap), world)
    return min(all_gather(size, world))


def auto_batch_size(backbone, target, settings: AttackSettings, device: torch.device, rows: int = 1,
                    cap: int = 1 << 16) -> int:
    """Images per batch: on CUDA the largest that fits (with HEADROOM), on CPU `CPU_BATCH`; at most `cap`."""
    if device.type != "cuda":
        return min(CPU_BATCH, cap)
    largest = largest_fitting(lambda size: fits(backbone, target, settings, device, size * rows), cap)
    return max(1, int(largest * HEADROOM)) if largest < cap else largest


def largest_fitting(fits_: Callable[[int], bool], cap: int) -> int:
    """The largest size in [1, cap] that fits, where every size up to some limit fits and none
    beyond it: doubling until a size fails, then bisection."""
    good, size = 0, 1
    while size <= cap and fits_(size):
        good, size = size, size * 2
    if good == 0:
        raise SiaError("--batch-size auto: not even one image fits in GPU memory")
    bad = min(size, cap + 1)
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits_(middle) else (good, middle)
    return good


def fits(backbone, target, settings: AttackSettings, device: torch.device, rows: int) -> bool:
    """Whether two attack steps on `rows` random images run without exhausting GPU memory."""
    try:
        probe(backbone, target, settings, device, rows)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        gc.collect()  # tensors held by the failed step's frames
        if device.type == "cuda":
            torch.cuda.empty_cache()


def probe(backbone, target, settings: AttackSettings, device: torch.device, rows: int) -> None:
    """The heaviest method (SIA: both inputs, through the generator), as a run would hold it."""
    size, k = backbone.img_size, len(backbone.attributes)
    x0 = torch.rand(rows, 3, size, size, device=device)
    a0 = torch.rand(rows, k, device=device)
    with torch.no_grad():
        reference = target.reference(target(x0 * 2 - 1))
        reconstruction = backbone(x0 * 2 - 1, a0)  # noqa: F841 - a run keeps it for the report
    attack_batch(backbone, target, METHODS["sia"], x0, a0, reference, replace(settings, steps=2))
