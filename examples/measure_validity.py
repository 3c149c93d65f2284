"""Measure each diagnosis measure against the TRUE effects of planted confounders.

    python examples/measure_validity.py --threads 2     # about 13 minutes on 2 CPU cores
    python examples/measure_validity.py --quick         # a few minutes, a smaller table

Trains small binary classifiers on synth faces whose label co-occurs with a planted confounder
(strengths 0.9 and 0.99), plus unconfounded controls, in two architectures: the small CNN of
examples/train_targets.py and an MLP on 16x16 downsampled pixels. For every model it measures

* the truth: on fresh faces, the mean |change of P(label)| when one attribute is flipped in the
  renderer and nothing else changes (`sia_cli.measures.validity.true_effects`);
* the diagnosis: `sia diagnose` on other fresh faces with the label attribute protected, multi
  mode (Eq. 2 `sensitivity`, the counterfactual flip `sensitivity_flip`, the headline, and
  ablation `sensitivity_ablation`) and single mode (`sensitivity_single`);

and prints one Markdown table per measure (true top attribute and its share of the true total
over the unprotected attributes, the measure's top, agreement, Spearman, cosine) and a summary.
Datasets and models are cached in --work (outside the repository), so a rerun only diagnoses.
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_targets as tt  # noqa: E402  (the training code of the shipped example targets)

from sia_cli.engine.attack import AttackSettings  # noqa: E402
from sia_cli.inputs.faces import ATTRIBUTES, HAIR_COLOURS, face_labels  # noqa: E402
from sia_cli.inputs.synth import make_dataset
from sia_cli.jobs.diagnose import DiagnoseConfig, diagnose  # noqa: E402
from sia_cli.measures.table import FLIP, TABLE  # noqa: E402
from sia_cli.measures.validity import bank_effects, counterfactual_bank, validity  # noqa: E402
from sia_cli.targets import load_target  # noqa: E402

PAIRS = ("Mustache:Pale_Skin", "Smiling:Blond_Hair", "Eyeglasses:Black_Hair")


class PixelMLP(nn.Module):
    """A second architecture with no convolutional prior: an MLP on 16x16 average-pooled pixels."""

    def __init__(self, pool: int = 4, size: int = tt.SIZE, hidden: int = 128, outputs: int = 1):
        super().__init__()
        self.pool = pool
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * (size // pool) ** 2, hidden), nn.ReLU(),
                                 nn.Linear(hidden, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(F.avg_pool2d(x, self.pool))


class SoftplusCNN(tt.Classifier):
    """The small CNN with softplus (beta 10, close to ReLU) in place of ReLU: a smooth network, whose
    input gradient has a second derivative, as ART's search for its training point needs (the ART
    paper swaps ReLU for softplus there; `sia` cannot swap the activations of a file, so the
    hardening study builds the model smooth)."""

    def __init__(self, width: int = 16, outputs: int = 1):
        super().__init__(width, outputs, activation=lambda: nn.Softplus(beta=10))


ARCHS = {"cnn": tt.Classifier, "mlp": PixelMLP, "cnn-softplus": SoftplusCNN}


def parse_pair(text: str) -> tuple[str, str]:
    label, confounder = text.split(":")
    return label, confounder


def model_specs(args) -> list[dict]:
    """(arch, label, confounder or None, strength) of every model, controls after their pairs."""
    specs = []
    for arch in args.archs:
        for label, confounder in map(parse_pair, args.pairs):
            for strength in args.strengths:
                specs.append(dict(arch=arch, label=label, confounder=confounder, strength=strength))
        if not args.no_controls:
            for label in dict.fromkeys(parse_pair(p)[0] for p in args.pairs):
                specs.append(dict(arch=arch, label=label, confounder=None, strength=0.0))
    return specs


def spec_name(spec: dict) -> str:
    planted = f"{spec['confounder']}@{spec['strength']:g}" if spec["confounder"] else "control"
    return f"{spec['arch']} {spec['label']} / {planted}"


def train(spec: dict, args) -> Path:
    """Train (or reuse) one model; the dataset is shared by every architecture."""
    correlations = ((spec["label"], spec["confounder"], spec["strength"]),) if spec["confounder"] else ()
    tag = f"{spec['label']}-{spec['confounder']}-{spec['strength']:g}" if spec["confounder"] else "control"
    data_seed = 600 + zlib.crc32(tag.encode()) % 100000  # distinct per dataset, fixed across runs
    folder = tt._dataset(args.work / f"data-{tag}-n{args.n_train}-s{data_seed}", args.n_train, data_seed, correlations)
    path = args.work / "models" / f"{spec['arch']}-{spec['label']}-{tag}-n{args.n_train}-e{args.epochs}.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        images, labels = tt.load_folder(folder)
        model = tt.fit(ARCHS[spec["arch"]](), images, labels[spec["label"]].unsqueeze(1),
                       F.binary_cross_entropy_with_logits, args.epochs, seed=zlib.crc32(path.name.encode()) % 100000)
        tt.save(model, path, tt.classifier_yaml(spec["label"]) + "output: logits\n")
    return path


def diagnose_model(path: Path, spec: dict, faces: Path, args, mode: str, steps: int) -> dict:
    config = DiagnoseConfig(
        model=path, images=faces / "images", attrs_file=faces / "list_attr.txt",
        out=args.work / "runs" / f"{path.stem}-{mode}-d{args.n_diag}-t{steps}", protect=(spec["label"],),
        settings=AttackSettings(steps=steps), mode=mode, bootstrap=0, force=True, gan=args.gan,
    )
    return diagnose(config)


def accuracy(target, bank: torch.Tensor, labels: np.ndarray) -> float:
    with torch.no_grad():
        p = target.probability(target(bank[:, 0].float() / 127.5 - 1)).numpy()
    return float(((p > 0.5) == labels).mean())


def fmt(value: float) -> str:
    return "n/a" if value != value else f"{value:+.2f}"


def table(rows: list[dict], measure: str) -> list[str]:
    lines = [f"### {measure}", "",
             "| model | acc. | true top (share) | hair share | measure top (share; its true share) | agree "
             "| Spearman | cosine |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        v = row["validity"][measure]
        lines.append(
            f"| {row['name']} | {row['accuracy']:.2f} | {v['true_top']} ({v['true_top_share']:.2f}) "
            f"| {row['hair_share']:.2f} | {v['measured_top']} ({v['measured_top_share']:.2f}; "
            f"{v['true_share_of_measured_top']:.2f}) | {'yes' if v['agree'] else 'no'} "
            f"| {fmt(v['spearman'])} | {fmt(v['cosine'])} |")
    return lines + [""]


def summary(rows: list[dict]) -> list[str]:
    def true_top(row: dict) -> str:  # every measure's score names the same true top: it is the truth's
        return row["validity"][FLIP.label]["true_top"]

    groups = {
        "all models": rows,
        "confounded": [r for r in rows if r["spec"]["confounder"]],
        "controls": [r for r in rows if not r["spec"]["confounder"]],
        "true top is a hair colour": [r for r in rows if true_top(r) in HAIR_COLOURS],
        "true top is not a hair colour": [r for r in rows if true_top(r) not in HAIR_COLOURS],
    }
    lines = ["### Summary: top agrees (count) / mean Spearman / mean cosine", "",
             "| measure | " + " | ".join(f"{g} ({len(m)})" for g, m in groups.items()) + " |",
             "| --- |" + " --- |" * len(groups)]
    for measure in [m.label for m in TABLE]:
        cells = []
        for members in groups.values():
            if not members:
                cells.append("-")
                continue
            vs = [m["validity"][measure] for m in members]
            agree = sum(v["agree"] for v in vs)
            cells.append(f"{agree}/{len(vs)} / {np.nanmean([v['spearman'] for v in vs]):+.2f} "
                         f"/ {np.nanmean([v['cosine'] for v in vs]):.2f}")
        lines.append(f"| {measure} | " + " | ".join(cells) + " |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sia-validity"))
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), metavar="LABEL:CONFOUNDER")
    parser.add_argument("--strengths", nargs="+", type=float, default=[0.9, 0.99])
    parser.add_argument("--archs", nargs="+", choices=sorted(ARCHS), default=["cnn", "mlp"])
    parser.add_argument("--no-controls", action="store_true")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--n-truth", type=int, default=128, help="fresh faces for the true effects")
    parser.add_argument("--n-diag", type=int, default=24, help="fresh faces for the diagnosis")
    parser.add_argument("--steps", type=int, default=100, help="attack steps, multi mode")
    parser.add_argument("--single-steps", type=int, default=20, help="attack steps, single mode")
    parser.add_argument("--gan", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="two pairs at 0.99, one control each, fewer faces and steps (a few minutes)")
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.strengths = ["Mustache:Pale_Skin", "Eyeglasses:Black_Hair"], [0.99]
        args.n_train, args.epochs, args.n_truth, args.n_diag = 800, 5, 48, 8
        args.steps, args.single_steps = 40, 15
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    began = time.time()

    def log(text: str) -> None:
        print(f"[{time.time() - began:5.0f} s] {text}", file=sys.stderr, flush=True)

    truth_seed, diag_seed = 9101, 9102  # no training set uses these
    bank = counterfactual_bank(truth_seed, args.n_truth, tt.SIZE)
    truth_labels = [face_labels(truth_seed, i) for i in range(args.n_truth)]
    faces = args.work / f"diag-faces-n{args.n_diag}-s{diag_seed}"
    if not (faces / "list_attr.txt").exists():
        make_dataset(faces, args.n_diag, seed=diag_seed, size=tt.SIZE)
    log(f"{args.n_truth} counterfactual faces rendered")

    rows = []
    for spec in model_specs(args):
        path = train(spec, args)
        target = load_target(path)
        truth = dict(zip(ATTRIBUTES, bank_effects(target, bank).mean(axis=0).tolist()))
        reports = {mode: diagnose_model(path, spec, faces, args, mode, steps)
                   for mode, steps in (("multi", args.steps), ("single", args.single_steps))}
        unprotected = {k: v for k, v in truth.items() if k != spec["label"]}
        total = sum(unprotected.values()) or 1.0
        rows.append({
            "spec": spec, "name": spec_name(spec),
            "accuracy": accuracy(target, bank, np.array([t[spec["label"]] for t in truth_labels])),
            "hair_share": sum(unprotected[c] for c in HAIR_COLOURS if c in unprotected) / total,
            # each measure read from the mode it ranks in (Eq. 2: multi)
            "validity": {m.label: validity(reports[m.ranks_in][m.key], truth) for m in TABLE},
        })
        log(f"{spec_name(spec)}: true top {rows[-1]['validity'][FLIP.label]['true_top']}")

    settings = (f"{len(rows)} models; training: {args.n_train} faces, {args.epochs} epochs; truth: {args.n_truth} "
                f"fresh faces; diagnosis: {args.n_diag} fresh faces, {args.steps} steps (multi), "
                f"{args.single_steps} steps (single), label attribute protected; backbone: {args.gan or 'default'}")
    out = [f"## Diagnosis against the truth ({settings})", "",
           "acc. = accuracy on the unconfounded truth faces; share = share of the true total over the "
           "14 unprotected attributes; hair share = the three hair colours' share of the true total.", ""]
    for measure in [m.label for m in TABLE]:
        out += table(rows, measure)
    out += summary(rows)
    out.append(f"({time.time() - began:.0f} s)")
    print("\n".join(out), flush=True)


if __name__ == "__main__":
    main()
