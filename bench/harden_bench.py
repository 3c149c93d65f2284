"""Benchmark: one `sia harden` epoch against one plain fine-tuning epoch on the same data.

In one process, in interleaved rounds, it times per epoch

  plain     the same Adam steps on the clean images alone: the same model file, batches
            (`sia_cli.harden.schedule`), image loading (`sia_cli.harden.load_batch`), labels,
            loss and learning rate as a hardening, and no attack;
  harden    `sia_cli.harden.harden` for one epoch with each --methods entry (sia and pgd by
            default): each step attacks the batch with the current weights, then takes one Adam
            step on clean images and adversaries.

An epoch's time is the sum of its optimiser steps' times (`HardenPlan.train_step`, stamped from
this script): loading the backbone and the model, the reference labels, the checkpoint and the
export are left out of both. A hardening's end-to-end wall time (one epoch, start-up included)
is printed too. Each figure is the median over --rounds; the ratio is harden / plain, as the
ratio of the medians and as the median of each round's ratio (a round's epochs run seconds apart,
so a burst of other work on a shared machine moves both).

    python bench/harden_bench.py                         # 128 faces, batch 32, 10 attack steps
    python bench/harden_bench.py --steps 200 --step-size 0.25/255 --n 32   # the paper's T

Prints a Markdown table and, last, one JSON object.
"""

from __future__ import annotations

import argparse
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

from sia_cli.engine.attack import AttackSettings
from sia_cli.inputs.synth import make_dataset
from sia_cli.jobs import harden as harden_module
from sia_cli.jobs.harden import HardenConfig, HardenPlan, load_batch, schedule
from sia_cli.runs.inputs import batches, load_inputs, reference_pass

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "examples" / "targets" / "eyeglasses_confounded.pt"


def number(text: str) -> float:
    """0.05 or 0.25/255, as the command line takes them."""
    top, _, bottom = text.partition("/")
    return float(top) / float(bottom or 1)


def labels_csv(folder: Path, label: str) -> Path:
    names = (folder / "list_attr.txt").read_text().splitlines()
    column = names[1].split().index(label)
    rows = ["file,label"] + [f"{r.split()[0]},{int(r.split()[1 + column] == '1')}" for r in names[2:]]
    path = folder / "labels.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def plain_epoch(config: HardenConfig) -> list[float]:
    """One epoch of plain fine-tuning; returns each optimiser step's seconds."""
    inputs = load_inputs(config, "cpu")
    target = inputs.target
    labels = {}
    for batch in batches(inputs, config.batch_size, "cpu", []):
        labels.update(zip((f.name for f in batch.files), reference_pass(inputs, batch)["reference"].cpu()))
    parameters = harden_module.trainable(target)
    optimizer = torch.optim.Adam(parameters, lr=config.lr)
    times = []
    for step in schedule(sorted(labels), config.batch_size, 1, config.seed):
        began = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        clean = load_batch(inputs, step.files, "cpu", step.number)
        reference = torch.stack([labels[name] for name in step.files])
        for parameter in parameters:
            parameter.requires_grad_(True)
        loss = target.loss(target(clean.x0 * 2 - 1), reference).float().sum() / len(step.files)
        loss.backward()
        for parameter in parameters:
            parameter.requires_grad_(False)
        optimizer.step()
        times.append(time.perf_counter() - began)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--label", default="Eyeglasses", help="the model's label attribute: labels and --protect")
    parser.add_argument("--n", type=int, default=128, help="synth faces (one epoch = n / batch steps)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--methods", nargs="+", default=["sia", "pgd"])
    parser.add_argument("--steps", type=int, default=10, help="attack steps per optimiser step")
    parser.add_argument("--step-size", type=number, default=0.05)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.save is deprecated
    torch.set_num_threads(args.threads)

    stamps: list[float] = []
    real_step = HardenPlan.train_step

    def stamped(self, context, step):
        began = time.perf_counter()
        result = real_step(self, context, step)
        stamps.append(time.perf_counter() - began)
        return result

    HardenPlan.train_step = stamped  # timing only: the step itself is the engine's
    load_before = os.getloadavg()[0]
    per_epoch: dict[str, list[float]] = {name: [] for name in ["plain", *args.methods]}
    wall: dict[str, list[float]] = {name: [] for name in args.methods}
    with tempfile.TemporaryDirectory() as tmp:
        faces = Path(tmp) / "faces"
        make_dataset(faces, args.n, seed=8100, size=64)
        base = dict(model=args.model, images=faces / "images", attrs_file=faces / "list_attr.txt",
                    labels=labels_csv(faces, args.label), protect=(args.label,), epochs=1, lr=1e-3,
                    batch_size=args.batch_size, settings=AttackSettings(steps=args.steps, step_size=args.step_size),
                    force=True)
        for round_ in range(args.rounds):
            per_epoch["plain"].append(sum(plain_epoch(HardenConfig(**base, out=Path(tmp) / "plain"))))
            for method in args.methods:
                stamps.clear()
                began = time.perf_counter()
                harden_module.harden(HardenConfig(**base, out=Path(tmp) / method, methods=(method,)))
                wall[method].append(time.perf_counter() - began)
                per_epoch[method].append(sum(stamps))
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in per_epoch.items()),
                  file=sys.stderr, flush=True)
    load_after = os.getloadavg()[0]
    plain = statistics.median(per_epoch["plain"])
    steps_per_epoch = -(-args.n // args.batch_size)
    print(f"{args.model.name}, {args.n} faces, batch {args.batch_size} ({steps_per_epoch} optimiser steps per epoch), "
          f"attack: {args.steps} steps of {args.step_size:g}, {args.threads} threads, median of {args.rounds} rounds; "
          f"1-minute load average {load_before:.2f} before, {load_after:.2f} after\n")
    paired = {m: [h / p for h, p in zip(per_epoch[m], per_epoch["plain"])] for m in args.methods}
    print("| epoch | seconds (median) | each round | vs plain (ratio of medians) | vs plain (median of the rounds' "
          "ratios) | harden() wall, start-up included (median) |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| plain fine-tuning | {plain:.2f} | {', '.join(f'{v:.2f}' for v in per_epoch['plain'])} | 1 | 1 | - |")
    for method in args.methods:
        value = statistics.median(per_epoch[method])
        print(f"| harden --method {method} | {value:.2f} | {', '.join(f'{v:.2f}' for v in per_epoch[method])} "
              f"| {value / plain:.1f}x | {statistics.median(paired[method]):.1f}x "
              f"| {statistics.median(wall[method]):.1f} s |")
    print(json.dumps({
        "model": args.model.name, "n": args.n, "batch_size": args.batch_size, "steps": args.steps,
        "step_size": args.step_size, "threads": args.threads, "rounds": args.rounds,
        "plain_s": per_epoch["plain"], **{f"{m}_s": per_epoch[m] for m in args.methods},
        **{f"{m}_vs_plain": statistics.median(per_epoch[m]) / plain for m in args.methods},
        **{f"{m}_vs_plain_paired": statistics.median(paired[m]) for m in args.methods},
        **{f"{m}_wall_s": wall[m] for m in args.methods},
        "load_before": load_before, "load_after": load_after,
        "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
