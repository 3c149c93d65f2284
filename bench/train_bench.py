"""Benchmark: `sia train-gan`'s training loop against its floor.

In one process it times generator steps per second of

  floor     per generator step, n_d critic steps and one generator step of
            `sia_cli.training.Trainer` on one batch already in memory, the same tensors every
            time: the forward and backward passes a step cannot do without;
  loop      the real loop, `sia_cli.jobs.train_gan.train_gan`, on synthetic faces written as PNG
            files: with --preload (images decoded once, batches drawn on the device), and
            through the DataLoader with --workers 0, its batches drawn one ahead in a thread
            and drawn in line between steps (the engine draws ahead on CUDA only), and with
            --workers 2;

each under the speed options that may close the gap: `plain` (fp32, NCHW weights, eager),
`channels-last`, `bf16` (--amp bf16) and `compile` (--compile), and on CUDA all three together.

Built for a shared machine, where other work comes in bursts of minutes:

- the floors of all variants run step by step in turn (one trainer each, built and warmed up
  once), so each option is compared with the others seconds apart;
- each loop runs between two short floor slices of its own variant, and its ratio to the floor
  is taken against those (`loop / floor`, the median over the rounds);
- a rate is one over the median step: a burst slows some steps, not the median.

A loop is timed from the end of its warm-up steps to the end of its last generator step, by
stamping `Trainer.generator_step`: start-up, the final checkpoint and card are left out. On
CUDA a rate is steps over a span whose two ends synchronise, since kernels run behind the host.

Prints a Markdown table and, last, one JSON object.

    python bench/train_bench.py                      # shipped backbone's architecture, 512 faces
    python bench/train_bench.py --device cuda --steps 50 --warmup 10

The defaults are the shipped backbone's architecture (sia_cli/backbone/builtin/synth-faces-64:
64x64, 15 attributes, encoder, decoder and critic width 16, 4 layers) at batch 32 and n_d 2,
as the next default backbone is trained.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from sia_cli.backbone import training
from sia_cli.backbone.training import TrainConfig, Trainer
from sia_cli.jobs.train_gan import train_gan
from sia_cli.inputs.faces import ATTRIBUTES
from sia_cli.inputs.images import LabelledImages, read_attributes
from sia_cli.inputs.synth import make_dataset

OPTIONS = {"channels-last": {"channels_last": True}, "bf16": {"amp": "bf16"}, "compile": {"compile": True}}
PLAIN = {"channels_last": False, "amp": None, "compile": False}
# Data paths of the real loop: the config fields each sets, and whether the DataLoader's
# batches are drawn in a thread (`sia_cli.training.draws_ahead`; None: as the engine decides,
# which is on CUDA only).
PATHS = {
    "preload": ({"preload": True}, None),
    "workers0-thread": ({"workers": 0}, True),
    "workers0-inline": ({"workers": 0}, False),
    "workers2": ({"workers": 2}, None),
}
PATH_TITLES = {"preload": "--preload", "workers0-thread": "--workers 0, drawn in a thread",
               "workers0-inline": "--workers 0, drawn in line", "workers2": "--workers 2"}
# Variants whose loop runs on every data path; the others' on --preload only.
ALL_PATHS_FOR = ("plain", "channels-last+bf16+compile")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--faces", type=int, default=512, help="synthetic training faces written as PNG")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-d", type=int, default=2, help="critic steps per generator step")
    parser.add_argument("--dim", type=int, default=16, help="encoder, decoder and critic width")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10,
                        help="timed generator steps per contender and round (bf16 on a CPU without bf16 "
                             "instructions is emulated, an order of magnitude slower: fewer steps there)")
    parser.add_argument("--warmup", type=int, default=2, help="generator steps before the timing starts (>= 1)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; medians are reported")
    parser.add_argument("--slice", type=int, default=4, help="floor steps timed just before and just after each loop")
    parser.add_argument("--variants", default=None,
                        help="comma-separated: plain, or options joined by + (channels-last, bf16, compile); "
                             "default: plain,channels-last,bf16,compile (and all three together on CUDA)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- what is timed


def variant_fields(name: str) -> dict:
    fields = dict(PLAIN)
    if name != "plain":
        for option in name.split("+"):
            if option not in OPTIONS:
                raise SystemExit(f"unknown option {option!r} in variant {name!r}: plain or {', '.join(OPTIONS)}")
            fields.update(OPTIONS[option])
    return fields


def default_variants(device: str) -> list[str]:
    variants = ["plain", "channels-last", "bf16", "compile"]
    if device.startswith("cuda"):
        variants.append("channels-last+bf16+compile")
    return variants


def contenders(variants: list[str]) -> list[tuple[str, str]]:
    """(variant, path) pairs; path `floor` is the floor."""
    found = []
    for variant in variants:
        found.append((variant, "floor"))
        found += [(variant, path) for path in (PATHS if variant in ALL_PATHS_FOR else ("preload",))]
    return found


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Stamps:
    """Times at the end of generator steps, and the step durations after the warm-up. On CUDA
    only the two stamps that bound the timed span synchronise, and every step counts as the
    span's mean: synchronising each step would stall the host's drawing of the next batch,
    which a run overlaps with the device's work."""

    def __init__(self, device: str, warmup: int, steps: int):
        self.device, self.warmup, self.steps, self.times = device, warmup, steps, []
        self.cuda = device.startswith("cuda")

    def stamp(self) -> None:
        if self.cuda and len(self.times) + 1 in (self.warmup, self.warmup + self.steps):
            sync(self.device)
        self.times.append(time.perf_counter())

    def durations(self) -> list[float]:
        if len(self.times) < self.warmup + self.steps:
            raise RuntimeError(f"only {len(self.times)} generator steps ran")
        timed = self.times[self.warmup - 1 : self.warmup + self.steps]
        if self.cuda:
            return [(timed[-1] - timed[0]) / self.steps] * self.steps
        return [b - a for a, b in zip(timed, timed[1:])]


@contextlib.contextmanager
def stamped(stamps: Stamps):
    """Every `Trainer.generator_step` of the real loop stamps the time as it returns."""
    original = Trainer.generator_step

    def generator_step(self, *args, **kwargs):
        losses = original(self, *args, **kwargs)
        stamps.stamp()
        return losses

    Trainer.generator_step = generator_step
    try:
        yield
    finally:
        Trainer.generator_step = original


@contextlib.contextmanager
def drawing_ahead(ahead: bool | None):
    """The DataLoader's batches drawn in a thread (True) or between steps (False), whatever the
    engine would choose on this device; None leaves the engine's choice."""
    original = training.draws_ahead
    if ahead is not None:
        training.draws_ahead = lambda device: ahead
    try:
        yield
    finally:
        training.draws_ahead = original


class Bench:
    def __init__(self, args, device: str, workdir: Path):
        self.args, self.device, self.workdir = args, device, workdir
        data = workdir / "faces"
        make_dataset(data, args.faces, seed=args.seed + 1000, size=args.img_size)
        self.base = TrainConfig(
            images=data / "images", attrs_file=data / "list_attr.txt", attributes=list(ATTRIBUTES),
            out=workdir / "run", img_size=args.img_size, batch_size=args.batch_size, n_d=args.n_d,
            enc_dim=args.dim, dec_dim=args.dim, dis_dim=args.dim, enc_layers=args.layers, dec_layers=args.layers,
            dis_layers=args.layers, sample_every=10**9, save_every=10**9, device=device, seed=args.seed,
            card_images=args.batch_size,  # the card at the end is not timed; keep it short
        )
        table = read_attributes(self.base.attrs_file).select(self.base.attributes)
        dataset = LabelledImages(self.base.images, table, args.img_size)
        # The floor's one batch, as the loop's `_draw` makes them: images in [-1, 1], attributes, targets.
        generator = torch.Generator().manual_seed(args.seed)
        images = torch.stack([dataset[i][0] for i in range(args.batch_size)]) * 2 - 1
        attrs = torch.stack([dataset[i][1] for i in range(args.batch_size)])
        target = attrs[torch.randperm(args.batch_size, generator=generator)]
        self.batch = tuple(t.to(device) for t in (images, attrs, target))
        self.trainers: dict[str, Trainer] = {}
        self.runs = 0

    def config(self, variant: str, **fields) -> TrainConfig:
        return dataclasses.replace(self.base, **variant_fields(variant), **fields)

    def trainer(self, variant: str) -> Trainer:
        """The variant's floor trainer, built and warmed up once (compiled in its warm-up)."""
        if variant not in self.trainers:
            config = self.config(variant)
            torch.manual_seed(self.args.seed)
            self.trainers[variant] = Trainer(config, config.setting(), device=self.device)
            self.steps(self.trainers[variant], self.args.warmup)
        return self.trainers[variant]

    def floor(self, variant: str, steps: int) -> list[float]:
        return self.steps(self.trainer(variant), steps)

    def steps(self, trainer: Trainer, steps: int) -> list[float]:
        """Durations of `steps` floor steps: n_d critic steps and a generator step on the one batch."""
        stamps = Stamps(self.device, 1, steps)
        stamps.stamp()
        for _ in range(steps):
            for _ in range(trainer.config.n_d):
                trainer.critic_step(*self.batch)
            trainer.generator_step(*self.batch)
            stamps.stamp()
        return stamps.durations()

    def loop(self, variant: str, path: str) -> list[float]:
        warmup, steps = self.args.warmup, self.args.steps
        self.runs += 1
        fields, ahead = PATHS[path]
        config = self.config(variant, **fields, max_steps=warmup + steps, out=self.workdir / f"run{self.runs}")
        stamps = Stamps(self.device, warmup, steps)
        with stamped(stamps), drawing_ahead(ahead):
            train_gan(config)
        return stamps.durations()


def rotated(items: list, r: int, rounds: int) -> list:
    shift = (r * len(items)) // max(rounds, 1)  # so no contender always runs first
    return items[shift:] + items[:shift]


def run_rounds(bench: Bench, variants: list[str], rounds: int) -> dict:
    args, cuda = bench.args, bench.device.startswith("cuda")
    if any("compile" in v for v in variants):
        # Every loop compiles fresh modules; past dynamo's recompile limit it would quietly run eagerly.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    for variant in variants:
        bench.trainer(variant)
    loops = [(v, p) for v, p in contenders(variants) if p != "floor"]
    floor_steps = {v: [] for v in variants}
    loop_steps = {c: [] for c in loops}
    paired = {c: [] for c in loops}
    for r in range(rounds):
        # Floors in turn, a step each (on CUDA a span of steps each): options compared seconds apart.
        for _ in range(1 if cuda else args.steps):
            for variant in rotated(variants, r, rounds):
                floor_steps[variant] += bench.floor(variant, args.steps if cuda else 1)
        print(f"round {r + 1}/{rounds} floors: " + ", ".join(
            f"{v} {1 / statistics.median(floor_steps[v]):.3f}" for v in variants) + " steps/s", flush=True)
        for variant, path in rotated(loops, r, rounds):
            around = bench.floor(variant, args.slice)
            steps = bench.loop(variant, path)
            around += bench.floor(variant, args.slice)
            loop_steps[(variant, path)] += steps
            paired[(variant, path)].append(statistics.median(around) / statistics.median(steps))
            print(f"round {r + 1}/{rounds} {variant:>26} {path:>16}: {1 / statistics.median(steps):.3f} steps/s, "
                  f"floor around it {1 / statistics.median(around):.3f}, ratio {paired[(variant, path)][-1]:.3f}",
                  flush=True)
    return {"floor_steps": floor_steps, "loop_steps": loop_steps, "paired": paired}


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


def summarise(found: dict, rounds: int) -> dict:
    """Per variant: its floor (and against the plain one), and each loop's rate with its ratio
    to the floor slices around it (the median over the rounds)."""
    floor = {v: 1 / statistics.median(d) for v, d in found["floor_steps"].items()}
    plain = floor.get("plain")
    rows = {}
    for variant, rate in floor.items():
        row = {"floor_steps_per_s": round(rate, 4)}
        if plain:
            row["floor_vs_plain_floor"] = round(rate / plain, 3)
        rows[variant] = row
    for (variant, path), steps in found["loop_steps"].items():
        rate = 1 / statistics.median(steps)
        ratios = found["paired"][(variant, path)]
        rows[variant][path] = {
            "steps_per_s": round(rate, 4),
            "vs_floor": round(statistics.median(ratios), 3),
            "vs_floor_rounds": [round(x, 3) for x in ratios],
            **({"vs_plain_floor": round(rate / plain, 3)} if plain else {}),
        }
    return {"variants": rows, "rounds": rounds}


def markdown(rows: dict) -> str:
    paths = [p for p in PATHS if any(p in row for row in rows.values())]
    head = ["variant", "floor steps/s", "floor / plain floor"] + [PATH_TITLES[p] for p in paths]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for variant, row in rows.items():
        cells = [variant, f"{row['floor_steps_per_s']:.3f}", f"{row.get('floor_vs_plain_floor', float('nan')):.2f}"]
        for path in paths:
            cell = row.get(path)
            cells.append("" if cell is None else f"{cell['steps_per_s']:.3f} (**{cell['vs_floor']:.2f}**)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.warmup = max(1, args.warmup)
    warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notices (the card's judge)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    variants = args.variants.split(",") if args.variants else default_variants(device)
    for variant in variants:
        variant_fields(variant)  # unknown names fail before any work
    with tempfile.TemporaryDirectory(prefix="sia-train-bench-") as workdir:
        bench = Bench(args, device, Path(workdir))
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        found = run_rounds(bench, variants, args.rounds)
    summary = summarise(found, args.rounds)
    summary.update({
        "device": device_name(device), "torch": torch.__version__, "faces": args.faces, "img_size": args.img_size,
        "batch_size": args.batch_size, "n_d": args.n_d, "dim": args.dim, "layers": args.layers,
        "steps": args.steps, "warmup": args.warmup, "slice": args.slice,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "minutes": round((time.perf_counter() - started) / 60, 1),
    })
    print(f"\ndevice: {summary['device']}; torch {summary['torch']}; {args.faces} faces {args.img_size}px, "
          f"batch {args.batch_size}, n_d {args.n_d}, width {args.dim}, {args.layers} layers; "
          f"{args.steps} timed steps after {args.warmup}, {args.rounds} rounds; "
          f"load average before/after {summary['load_average_1min']}\n")
    print("Loop cells: steps/s (**loop / floor**: against the floor slices of its variant around it, "
          "median over the rounds).\n")
    print(markdown(summary["variants"]))
    print()
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
