"""Benchmark: the attack loop against its floor and against Algorithm 1 as written.

In one process, in interleaved rounds (so machine noise hits all three alike), it times

  (a) loop   the engine's batched attack loop (sia_cli.attack.run_loop), final pass included;
  (b) naive  Algorithm 1 as written: one image at a time, fp32, eager (sia_cli.engine.reference);
  (c) floor  T bare forward+backward passes of f(G(.)) on the same batch, nothing else;

and prints images/s of each, the ratios, the peak memory and the device. The last line is
one JSON object: loop_vs_floor (time of (a) / time of (c)), speedup_vs_naive (time of (b) /
time of (a)), images_per_s (of (a)), peak_memory_mb, device, and the settings.

    python bench/attack_bench.py                    # shipped example backbone and target
    python bench/attack_bench.py --config paper --device cuda --amp bf16 --steps 200 --naive-images 4

`--config paper` builds the paper's sizes with random weights: AttGAN 224x224, 15
attributes, shortcut 1, inject 1, and torchvision's ResNet-50 with one output, saved as
TorchScript (or `--target-format export`) and loaded like a user's model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from sia_cli.backbone.attgan import AttGAN, BackboneInfo, Generator, GeneratorConfig
from sia_cli.backbone.registry import load_backbone
from sia_cli.engine.attack import (
    METHODS,
    AttackSettings,
    AttackState,
    attribute_radius,
    gradients,
    run_loop,
    working_copy,
)
from sia_cli.engine.reference import difference, reference_loop
from sia_cli.engine.speed import prepare
from sia_cli.inputs.images import load_image, read_attributes
from sia_cli.inputs.synth import make_dataset
from sia_cli.targets import load_target

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_TARGET = REPO / "examples" / "targets" / "eyeglasses_confounded.pt"
# The paper's 15 attributes (section 4.1), in its order.
PAPER_ATTRIBUTES = ["Bald", "Bangs", "Black_Hair", "Blond_Hair", "Brown_Hair", "Bushy_Eyebrows", "Eyeglasses",
                    "Male", "Mouth_Slightly_Open", "Mustache", "No_Beard", "Pale_Skin", "Young", "Smiling",
                    "Wearing_Lipstick"]
IMAGENET = "input_size: 224\nmean: [0.485, 0.456, 0.406]\nstd: [0.229, 0.224, 0.225]\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", choices=("example", "paper"), default="example",
                        help="example: the shipped backbone and eyeglasses target; paper: paper sizes, random weights")
    parser.add_argument("--gan", default=None, help="backbone for --config example (registry name or path)")
    parser.add_argument("--target", type=Path, default=None, help="target model file for --config example")
    parser.add_argument("--target-format", choices=("torchscript", "export"), default="torchscript",
                        help="how --config paper saves its ResNet-50")
    parser.add_argument("--batch-size", default="16", help="images per batch, or auto (largest that fits)")
    parser.add_argument("--image-size", type=int, default=None, help="generator image size (default: the backbone's)")
    parser.add_argument("--steps", type=int, default=50, help="attack steps T")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds of (a), (b), (c); medians are reported")
    parser.add_argument("--method", choices=sorted(METHODS), default="sia", help="attack method timed")
    parser.add_argument("--naive-images", type=int, default=None,
                        help="time (b) on the first N images only and scale to the batch (it is per image anyway)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--amp", choices=("bf16",), default=None, help="bf16 autocast for (a) and (c)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models of (a) and (c)")
    parser.add_argument("--no-channels-last", action="store_true",
                        help="keep (a) and (c) in NCHW, to measure what the NHWC layout that runs use brings")
    parser.add_argument("--scan", default=None, metavar="B1,B2,...",
                        help="instead: time (a) alone at these batch sizes, interleaved, and print images/s of each")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of faces, weights and PGD starts")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- models


def example_models(args, device: str):
    backbone = load_backbone(args.gan, device)
    target = load_target(args.target or EXAMPLE_TARGET, device=device, probe_size=args.image_size or backbone.img_size)
    return backbone, target


def paper_models(args, device: str, workdir: Path):
    """Fresh copies of the same random-weight models: the seed fixes the weights."""
    torch.manual_seed(args.seed)
    config = GeneratorConfig(enc_dim=64, dec_dim=64, enc_layers=5, dec_layers=5, n_attrs=len(PAPER_ATTRIBUTES),
                             shortcut_layers=1, inject_layers=1, img_size=224)
    info = BackboneInfo(name="paper-random-224", attributes=PAPER_ATTRIBUTES, img_size=224)
    backbone = AttGAN(Generator(config), info).freeze().to(device)
    path = workdir / ("resnet50.pt2" if args.target_format == "export" else "resnet50.pt")
    if not path.exists():
        save_resnet50(path, args.seed, args.target_format)
    return backbone, load_target(path, device=device, probe_size=224)


def save_resnet50(path: Path, seed: int, target_format: str) -> None:
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet50(weights=None, num_classes=1).eval()
    if target_format == "torchscript":
        torch.jit.save(torch.jit.script(model), str(path), _extra_files={"sia.yaml": IMAGENET})
        return
    example = torch.rand(2, 3, 224, 224)
    program = torch.export.export(model, (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(program, str(path), extra_files={"sia.yaml": IMAGENET})


def build(args, device: str, workdir: Path):
    """Fresh (backbone, target), as loaded."""
    return paper_models(args, device, workdir) if args.config == "paper" else example_models(args, device)


# ------------------------------------------------------------------------------ inputs


def faces(n: int, size: int, attributes: list[str], seed: int, workdir: Path):
    """n synthetic faces at `size` with their attribute vectors: real inputs, so success rates mean something."""
    root = workdir / f"faces_{n}_{size}"
    if not root.exists():
        make_dataset(root, n, seed=seed, size=size)
    table = read_attributes(root / "list_attr.txt").select(attributes)
    files = sorted((root / "images").glob("*.png"))
    x0 = torch.stack([load_image(f, size) for f in files])
    a0 = torch.from_numpy(np.stack([table.vector(f) for f in files])).float()
    return x0, a0


# ------------------------------------------------------------------------------ timing


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def floor(backbone, target, method, x0, a0, reference, steps: int, amp: str | None) -> None:
    """(c): the loop's own forward+backward, `steps` times, without updates or final pass."""
    x = working_copy(x0).requires_grad_(method.moves_pixels)
    a = a0.clone().requires_grad_(method.moves_attributes)
    moving = [t for t in (x, a) if t.requires_grad]
    for _ in range(steps):
        gradients(backbone, target, method, x, a, reference, moving, amp)


class Bench:
    """The three contenders on one batch, with what each needs."""

    def __init__(self, args, device: str, workdir: Path):
        self.args, self.device = args, device
        self.method = METHODS[args.method]
        self.settings = AttackSettings(steps=args.steps, amp=args.amp)
        self.plain = build(args, device, workdir)
        self.fast = build(args, device, workdir)
        # Prepared exactly as a run prepares them (sia_cli.speed.tune), `auto` settled the same way.
        size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
        self.batch = prepare(*self.fast, torch.device(device), self.settings, size, args.compile, cap=4096,
                             channels_last=not args.no_channels_last)
        backbone = self.fast[0]
        self.size = args.image_size or backbone.img_size
        x0, a0 = faces(self.batch, self.size, backbone.attributes, args.seed, workdir)
        self.x0, self.a0 = x0.to(device), a0.to(device)
        with torch.no_grad():
            self.reference = self.plain[1].reference(self.plain[1](self.x0 * 2 - 1))
        self.radius = attribute_radius(self.a0, self.settings, None)
        self.naive_n = min(args.naive_images or self.batch, self.batch)

    def loop(self, steps: int | None = None, rows: int | None = None):
        settings = AttackSettings(steps=steps or self.args.steps, amp=self.args.amp)
        x0, a0, reference, radius = (t[:rows] for t in (self.x0, self.a0, self.reference, self.radius))
        return run_loop(*self.fast, self.method, x0, a0, reference, settings, radius,
                        torch.Generator().manual_seed(self.args.seed))

    def naive(self, steps: int | None = None, n: int | None = None):
        n = n or self.naive_n
        settings = AttackSettings(steps=steps or self.args.steps)
        return reference_loop(*self.plain, self.method, self.x0[:n], self.a0[:n], self.reference[:n], settings,
                              self.radius[:n], torch.Generator().manual_seed(self.args.seed))

    def floor(self, steps: int | None = None):
        steps = self.settings.for_method(self.method).steps if steps is None else steps
        return floor(*self.fast, self.method, self.x0, self.a0, self.reference, steps, self.args.amp)

    def warm_up(self) -> None:
        """TorchScript optimises a graph after profiling two runs; compile compiles on first use."""
        self.loop(steps=2)
        self.floor(steps=3)
        self.naive(steps=2, n=1)


def run_rounds(bench: Bench, rounds: int) -> dict:
    times = {"loop": [], "naive": [], "floor": []}
    peak_mb, states = 0.0, {}
    order = list(times)
    for r in range(rounds):
        for name in order[r % 3:] + order[:r % 3]:  # rotated, so no contender always runs first
            if name == "loop" and bench.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            seconds, states[name] = timed(getattr(bench, name), bench.device)
            times[name].append(seconds)
            if name == "loop" and bench.device.startswith("cuda"):
                peak_mb = max(peak_mb, torch.cuda.max_memory_allocated() / 2**20)
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    if not bench.device.startswith("cuda"):
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {"times": times, "peak_mb": peak_mb, "states": states}


# ----------------------------------------------------------------------------- report


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def success_rate(bench: Bench, state, n: int) -> float:
    """Share of the first n images whose adversary changed the prediction."""
    target = bench.plain[1]
    return float(target.success(state.output[:n], bench.reference[:n]).float().mean())


def agreement(states: dict, n: int) -> dict:
    """How far (a) ended from (b) on the images both attacked: speed must not change results."""
    loop = states["loop"]
    first = AttackState(x=loop.x[:n], a=loop.a[:n], adversary=loop.adversary[:n], output=loop.output[:n])
    return {key: round(value, 6) for key, value in difference(first, states["naive"]).items()}


def summarise(bench: Bench, result: dict) -> dict:
    t = {name: statistics.median(values) for name, values in result["times"].items()}
    naive_per_batch = t["naive"] * bench.batch / bench.naive_n
    states, cuda = result["states"], bench.device.startswith("cuda")
    return {
        "loop_vs_floor": round(t["loop"] / t["floor"], 4),
        # Each round's (a)/(c), adjacent in time: less exposed to slow drifts of the machine.
        "loop_vs_floor_paired": round(statistics.median(
            loop / floor for loop, floor in zip(result["times"]["loop"], result["times"]["floor"])), 4),
        "speedup_vs_naive": round(naive_per_batch / t["loop"], 3),
        "images_per_s": round(bench.batch / t["loop"], 3),
        "naive_images_per_s": round(bench.batch / naive_per_batch, 3),
        "floor_images_per_s": round(bench.batch / t["floor"], 3),
        "peak_memory_mb": round(result["peak_mb"], 1),
        "peak_memory_kind": "cuda max_memory_allocated during (a)" if cuda else "process peak RSS",
        "device": device_name(bench.device),
        "success_rate": round(success_rate(bench, states["loop"], bench.batch), 4),
        "naive_success_rate": round(success_rate(bench, states["naive"], bench.naive_n), 4),
        "success_rate_on_naive_images": round(success_rate(bench, states["loop"], bench.naive_n), 4),
        "loop_vs_naive_adversaries": agreement(states, bench.naive_n),
        "seconds_median": {name: round(v, 4) for name, v in t.items()},
        **settings_of(bench),
    }


def settings_of(bench: Bench) -> dict:
    args = bench.args
    return {
        "config": args.config, "method": args.method, "batch_size": bench.batch, "image_size": bench.size,
        "steps": args.steps, "rounds": args.rounds, "naive_images": bench.naive_n, "amp": args.amp,
        "compile": args.compile, "channels_last": not args.no_channels_last, "torch": torch.__version__,
    }


def print_summary(s: dict) -> None:
    print(f"device: {s['device']}; torch {s['torch']}")
    print(f"config {s['config']}, method {s['method']}, batch {s['batch_size']}, {s['image_size']}px, "
          f"T = {s['steps']}, amp {s['amp']}, compile {s['compile']}, channels-last {s['channels_last']}, "
          f"median of {s['rounds']} rounds")
    print(f"(a) loop : {s['images_per_s']:10.3f} images/s   ({s['seconds_median']['loop']:.3f} s per batch)")
    print(f"(b) naive: {s['naive_images_per_s']:10.3f} images/s   (per image, timed on {s['naive_images']})")
    print(f"(c) floor: {s['floor_images_per_s']:10.3f} images/s   ({s['seconds_median']['floor']:.3f} s per batch)")
    print(f"(a)/(c) loop vs floor: {s['loop_vs_floor']:.3f} (median of per-round ratios {s['loop_vs_floor_paired']:.3f})"
          f"    (b)/(a) speedup vs naive: {s['speedup_vs_naive']:.2f}x")
    d = s["loop_vs_naive_adversaries"]
    print(f"(a) vs (b) adversaries: {100 * d['share_different']:.2f}% of 8-bit values differ, by at most "
          f"{d['max_levels']} levels; attributes by at most {d['max_attribute']:.4f}")
    print(f"machine load (1-min average) before and after the rounds: {s['load_average_1min']}")
    print(f"peak memory: {s['peak_memory_mb']:.0f} MB ({s['peak_memory_kind']})")
    print(f"attack success: (a) {s['success_rate']:.3f} of {s['batch_size']} images; on the {s['naive_images']} "
          f"that (b) attacked (a) {s['success_rate_on_naive_images']:.3f}, (b) {s['naive_success_rate']:.3f}")


def scan(args, device: str, workdir: Path) -> dict:
    """(a) alone at several batch sizes, in interleaved rounds: where throughput stops growing."""
    sizes = sorted({int(size) for size in args.scan.split(",")})
    args.batch_size = str(max(sizes))
    bench = Bench(args, device, workdir)
    for size in sizes:
        bench.loop(steps=2, rows=size)
    rates: dict[int, list[float]] = {size: [] for size in sizes}
    for r in range(args.rounds):
        for size in sizes[r % len(sizes):] + sizes[:r % len(sizes)]:
            seconds, _ = timed(lambda: bench.loop(rows=size), device)
            rates[size].append(size / seconds)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k}: {v[-1]:.2f}" for k, v in rates.items()), flush=True)
    by_size = {str(size): round(statistics.median(values), 3) for size, values in rates.items()}
    for size, rate in by_size.items():
        print(f"batch {size:>5}: {rate:10.3f} images/s")
    return {"images_per_s_by_batch": by_size, "device": device_name(device), **settings_of(bench)}


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notices
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.scan:
        with tempfile.TemporaryDirectory(prefix="sia-bench-") as workdir:
            print(json.dumps(scan(args, device, Path(workdir))))
        return 0
    with tempfile.TemporaryDirectory(prefix="sia-bench-") as workdir:
        bench = Bench(args, device, Path(workdir))
        bench.warm_up()
        load_before = os.getloadavg()[0]
        summary = summarise(bench, run_rounds(bench, args.rounds))
    # Other work on the machine slows all three alike (interleaved rounds), but say how much there was.
    summary["load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print_summary(summary)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
