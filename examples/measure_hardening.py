"""Measure `sia harden` on synth faces with a planted confounder (the README's hardening tables).

    python examples/measure_hardening.py                    # 2.5 minutes on 2 calm CPU cores, 12 on busy ones
    python examples/measure_hardening.py --archs mlp cnn    # both architectures, 5 minutes on calm cores

For each planted pair LABEL:CONFOUNDER (default Mustache:Eyeglasses, co-occurring 99% of the
time in the training faces) and each architecture (the MLP on pooled pixels and the small CNN
of examples/measure_validity.py) it trains the ORIGINAL classifier of LABEL on confounded faces,
then fine-tunes copies of it with `sia_cli.harden.harden` on the first --n-hard of those same
training faces (the renderer draws face i of a seed identically whatever the data set's size):

* `fine-tune, clean`: the same Adam steps on the clean images alone (`--mix 1`; the method is
  fgsm, whose adversaries get weight 0): what further training without adversaries does;
* `SIA-Adv`: `--method sia`, labelled with the true LABEL (`--labels`);
* `SIA-Adv, own labels`: `--method sia` without labels: counterfactual training on the
  original model's own predictions;
* `PGD-Adv`: `--method pgd`, labelled with the true LABEL;
* `ART`: `--method art` (attributional robustness training), labelled with the true LABEL.

Every model is then measured on the SAME held-out faces, drawn WITHOUT the confounder:

* with the engine's own before/after evaluation (`sia_cli.jobs.harden_eval.evaluate`) on --n-eval faces
  with their true labels: clean accuracy, accuracy under FGSM, PGD and SIA at eps 1.5/255 and
  4/255, SDAR and the headline (flip) sensitivity of a diagnosis, LABEL protected; with
  --explanations also the attributional measures of `sia diagnose --explanations` (top-k
  intersection and Kendall's tau under the feature-importance attack; the ART paper's Table 1);
* against the truth on --n-truth other faces, each re-rendered with one attribute flipped
  (`sia_cli.measures.validity.counterfactual_bank`): clean accuracy, the true effect (mean change of
  P(LABEL)) of flipping the confounder and of flipping the label itself, and the true top
  attribute with its share of the total over the attributes the diagnosis ranks (all but LABEL).

Everything is seeded; data, models, hardenings and evaluations are cached in --work under
names that carry their settings, so a rerun only redoes what changed. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure_validity as mv  # noqa: E402  (the validity study's two small architectures)
import train_targets as tt  # noqa: E402

from sia_cli.engine.attack import AttackSettings  # noqa: E402
from sia_cli.inputs.faces import ATTRIBUTES, face_labels  # noqa: E402
from sia_cli.inputs.images import read_attributes  # noqa: E402
from sia_cli.jobs.harden import HardenConfig, harden  # noqa: E402
from sia_cli.jobs.harden_eval import EVAL_EPS, EVAL_METHODS, evaluate  # noqa: E402
from sia_cli.measures.table import default_headline  # noqa: E402
from sia_cli.measures.validity import bank_effects, counterfactual_bank  # noqa: E402
from sia_cli.runs.distributed import World  # noqa: E402
from sia_cli.targets import load_target  # noqa: E402

# name -> (method, use the true labels, mix); mix None: --mix
VARIANTS = {
    "fine-tune, clean": ("fgsm", True, 1.0),
    "SIA-Adv": ("sia", True, None),
    "SIA-Adv, own labels": ("sia", False, None),
    "PGD-Adv": ("pgd", True, None),
    # ART as its authors train it: the task loss at its own training point only (mix 0), plus the
    # triplet term (weight 0.5; sia_cli.engine.art)
    "ART": ("art", True, 0.0),
    "ART, clean loss kept": ("art", True, None),  # --mix as given: the clean images' loss stays
}
EVAL_SEED, TRUTH_SEED = 9401, 9402  # no training set uses these


def short_hash(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:10]


def labels_csv(folder: Path, label: str) -> Path:
    """file,label (0/1) of a synth folder, from its list_attr.txt."""
    table = read_attributes(folder / "list_attr.txt")
    column = table.names.index(label)
    path = folder / f"labels-{label}.csv"
    rows = ["file,label"] + [f"{name},{int(values[column] > 0.5)}" for name, values in table.rows.items()]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def train_original(arch: str, label: str, confounder: str, args) -> tuple[Path, Path, int]:
    """The confounded original (cached) and its training folder; returns (model, data, data seed)."""
    correlations = ((label, confounder, args.strength),)
    data_seed = 4100 + zlib.crc32(f"{label}-{confounder}-{args.strength:g}".encode()) % 1000 + args.seed * 1000
    data = tt._dataset(args.work / f"train-{label}-{confounder}-{args.strength:g}-n{args.n_train}-s{data_seed}",
                       args.n_train, data_seed, correlations)
    path = args.work / "models" / f"{arch}-{label}-{confounder}-{args.strength:g}-n{args.n_train}" \
                                  f"-e{args.train_epochs}-s{data_seed}.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        images, labels = tt.load_folder(data)
        torch.manual_seed(data_seed)
        model = mv.ARCHS[arch]()
        tt.fit(model, images, labels[label].unsqueeze(1), F.binary_cross_entropy_with_logits, args.train_epochs,
               seed=data_seed + zlib.crc32(arch.encode()) % 1000)
        tt.save(model, path, tt.classifier_yaml(label) + "output: logits\n")
    return path, data, data_seed


def hardening_faces(data: Path, data_seed: int, label: str, confounder: str, args) -> Path:
    """The first --n-hard faces of the original's training set, drawn again (identical files)."""
    folder = args.work / f"hard-{data.name}-first{args.n_hard}"
    tt._dataset(folder, args.n_hard, data_seed, ((label, confounder, args.strength),))
    first = "000000.png"
    if (folder / "images" / first).read_bytes() != (data / "images" / first).read_bytes():
        raise SystemExit(f"{folder} does not start with the training faces of {data}")
    return folder


def settings(args) -> AttackSettings:
    return AttackSettings(steps=args.steps, step_size=args.step_size, attr_step_size=args.attr_step_size)


def harden_variant(model: Path, faces: Path, label: str, name: str, args) -> tuple[Path, float]:
    """One hardening (cached); returns the hardened model and the training's wall time in seconds."""
    method, labelled, mix = VARIANTS[name]
    values = dict(model=model.name, faces=faces.name, method=method, labelled=labelled, mix=mix if mix is not None else args.mix,
                  epochs=args.epochs, lr=args.lr, batch=args.batch_size, steps=args.steps, step=args.step_size,
                  attr_step=args.attr_step_size, seed=args.seed)
    out = args.work / "hardened" / f"{model.stem}-{method}-{'labels' if labelled else 'own'}-{short_hash(values)}"
    record = out / "study.json"
    if record.is_file():
        return out / "model.pt", json.loads(record.read_text())["seconds"]
    began = time.time()
    harden(HardenConfig(
        model=model, images=faces / "images", attrs_file=faces / "list_attr.txt", out=out, methods=(method,),
        labels=labels_csv(faces, label) if labelled else None, protect=(label,), settings=settings(args),
        epochs=args.epochs, lr=args.lr, mix=mix if mix is not None else args.mix, batch_size=args.batch_size,
        seed=args.seed, force=True))
    seconds = time.time() - began
    record.write_text(json.dumps({"seconds": seconds, "settings": values}) + "\n")
    return out / "model.pt", seconds


def measure(model: Path, label: str, confounder: str, eval_faces: Path, bank: torch.Tensor,
            bank_labels: np.ndarray, args) -> dict:
    """The engine's before/after figures and the truth, for one model."""
    config = HardenConfig(
        model=model, images=eval_faces / "images", out=args.work / "unused", protect=(label,),
        settings=settings(args), eval_images=eval_faces / "images", eval_attrs_file=eval_faces / "list_attr.txt",
        eval_labels=labels_csv(eval_faces, label), eval_steps=args.eval_steps, batch_size=args.batch_size,
        seed=args.seed)
    tag = short_hash(dict(sha=hashlib.sha256(model.read_bytes()).hexdigest(), eval=eval_faces.name,
                          steps=args.eval_steps, step=args.step_size, attr_step=args.attr_step_size, label=label,
                          headline=default_headline("multi")))
    folder = args.work / "evaluations" / f"{model.parent.name}-{model.stem}-{tag}{'-explained' if args.explanations else ''}"
    figures = evaluate(config, model, folder, World(), lambda *_: None, explanations=args.explanations)
    target = load_target(model)
    truth = dict(zip(ATTRIBUTES, bank_effects(target, bank).mean(axis=0).tolist()))
    with torch.no_grad():
        p = target.probability(target(bank[:, 0].float() / 127.5 - 1)).numpy()
    shares = figures.get("sensitivity") or {}
    per_image = {}
    if args.explanations:  # each image's own figures, for the paired change against the original
        report = json.loads((folder / "diagnosis" / "report.json").read_text())
        per_image = {r["file"]: (r.get("explanation_attack_top_k"), r.get("explanation_attack_tau"))
                     for r in report["images"]}
    return {**figures, "truth": truth, "per_image_attributional": per_image, "truth_accuracy": float(((p > 0.5) == bank_labels).mean()),
            "confounder_share": shares.get(confounder),
            "top": max(shares, key=shares.get) if shares else None}


def paired_change(before: dict, after: dict, which: int, n: int = 2000) -> str:
    """Mean change of one attributional measure (0: top-k, 1: tau) on the images both models
    measured (their prediction kept by some step of the attack), with a 95% percentile bootstrap
    interval over those images."""
    files = [f for f in before if before[f][which] is not None and (after.get(f) or (None, None))[which] is not None]
    if len(files) < 2:
        return "-"
    change = np.array([after[f][which] - before[f][which] for f in files])
    rng = np.random.default_rng(0)
    means = change[rng.integers(0, len(change), (n, len(change)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return f"{change.mean():+.3f} [{low:+.3f}, {high:+.3f}] on {len(files)}"


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def tables(title: str, rows: list[tuple[str, dict, float | None]], label: str, confounder: str, args) -> list[str]:
    eps_names = [f"{eps * 255:g}/255" for eps in EVAL_EPS]
    attacks = [(m, e) for m in EVAL_METHODS for e in eps_names]
    out = [f"#### {title}: accuracy on {args.n_eval} held-out unconfounded faces (true labels)", "",
           "| model | clean | " + " | ".join(f"{m.upper()} {e}" for m, e in attacks) + " | training (s) |",
           "| --- |" + " --- |" * (len(attacks) + 2)]
    for name, row, seconds in rows:
        robust = row["accuracy_under_attack"]
        out.append(f"| {name} | {fmt(row['clean_accuracy'])} | "
                   + " | ".join(fmt(robust.get(m, {}).get(e)) for m, e in attacks)
                   + f" | {'-' if seconds is None else f'{seconds:.0f}'} |")
    out += ["", f"#### {title}: the truth on {args.n_truth} other unconfounded faces, and the diagnosis", "",
            f"| model | clean accuracy | true effect of {confounder} | true effect of {label} "
            f"| {confounder} / {label} | true top (share) | SDAR | diagnosis top (share) | {confounder} share |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row, _ in rows:
        truth = row["truth"]
        ratio = truth[confounder] / truth[label] if truth[label] else float("nan")
        top = row["top"]
        top_cell = f"{top} ({row['sensitivity'][top]:.2f})" if top else "-"
        unprotected = {k: v for k, v in truth.items() if k != label}  # as the diagnosis sees them
        true_top = max(unprotected, key=unprotected.get)
        true_share = unprotected[true_top] / (sum(unprotected.values()) or 1.0)
        out.append(f"| {name} | {row['truth_accuracy']:.2f} | {truth[confounder]:.3f} | {truth[label]:.3f} "
                   f"| {ratio:.1f} | {true_top} ({true_share:.2f}) | {fmt(row['sdar'], 4)} | {top_cell} "
                   f"| {fmt(row['confounder_share'])} |")
    if any(row.get("attributional") for _, row, _ in rows):
        out += ["", f"#### {title}: attributional robustness on the {args.n_eval} held-out faces "
                "(`sia diagnose --explanations` defaults: top-k feature-importance attack, eps 8/255, 50 steps of "
                "1/255, integrated gradients of 100 steps, k = 400 of 4,096 pixels)", "",
                "| model | clean accuracy | PGD 4/255 | top-k intersection | Kendall's tau | images measured "
                "| top-k, paired change from the original | tau, paired change from the original "
                "| explanation sensitivity, top 3 (edits that keep the prediction) | stands out |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        original = rows[0][1].get("per_image_attributional") or {}
        for name, row, _ in rows:
            found = row.get("attributional") or {}
            moved = {k: v for k, v in (found.get("explanation_sensitivity") or {}).items() if v == v}  # not NaN
            top = ", ".join(f"{k} {moved[k]:.2f}" for k in sorted(moved, key=moved.get, reverse=True)[:3])
            out.append(f"| {name} | {fmt(row['clean_accuracy'])} | "
                       f"{fmt(row['accuracy_under_attack'].get('pgd', {}).get('4/255'))} | "
                       f"{fmt(found.get('top_k_intersection'))} | {fmt(found.get('kendall_tau'))} | "
                       f"{found.get('images', '-')} | "
                       + " | ".join(paired_change(original, row.get("per_image_attributional") or {}, which)
                                    for which in (0, 1))
                       + f" | {top or '-'} | {found.get('explanation_stands_out') or 'none'} |")
    return out + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sia-hardening"))
    parser.add_argument("--pairs", nargs="+", default=["Mustache:Eyeglasses"], metavar="LABEL:CONFOUNDER")
    parser.add_argument("--strength", type=float, default=0.99, help="co-occurrence in the training faces")
    parser.add_argument("--archs", nargs="+", choices=sorted(mv.ARCHS), default=["mlp"])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--n-train", type=int, default=600, help="confounded faces the original is trained on")
    parser.add_argument("--train-epochs", type=int, default=5)
    parser.add_argument("--n-hard", type=int, default=192, help="the first N training faces, for hardening")
    parser.add_argument("--epochs", type=int, default=6, help="hardening epochs")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--mix", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="attack steps while hardening")
    parser.add_argument("--step-size", type=float, default=0.05,
                        help="attack step (pixels are kept within eps whatever it is)")
    parser.add_argument("--attr-step-size", type=float, default=None, help="attribute step (default: --step-size)")
    parser.add_argument("--n-eval", type=int, default=48, help="held-out faces of the engine's evaluation")
    parser.add_argument("--eval-steps", type=int, default=10)
    parser.add_argument("--n-truth", type=int, default=128, help="held-out faces for the true effects")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--explanations", action="store_true",
                        help="evaluate the attributional measures too (slower: the feature-importance attack)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.script/save are deprecated
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    began = time.time()

    def log(text: str) -> None:
        print(f"[{time.time() - began:5.0f} s] {text}", file=sys.stderr, flush=True)

    eval_faces = tt._dataset(args.work / f"eval-n{args.n_eval}-s{EVAL_SEED + args.seed}", args.n_eval,
                             EVAL_SEED + args.seed, ())
    bank = counterfactual_bank(TRUTH_SEED + args.seed, args.n_truth, tt.SIZE)
    log(f"{args.n_eval} evaluation faces, {args.n_truth} counterfactual faces")
    out = [f"## Hardening with a planted confounder (training: {args.n_train} faces at co-occurrence "
           f"{args.strength:g}, {args.train_epochs} epochs; hardening: the first {args.n_hard} of them, {args.epochs} "
           f"epochs, lr {args.lr:g}, mix {args.mix:g}, batch {args.batch_size}, {args.steps} steps of "
           f"{args.step_size:g}{'' if args.attr_step_size is None else f' (attributes {args.attr_step_size:g})'}, "
           f"eps 1.5/255; evaluation: {args.eval_steps} steps; label attribute protected; seed {args.seed})", ""]
    for pair in args.pairs:
        label, confounder = pair.split(":")
        bank_labels = np.array([face_labels(TRUTH_SEED + args.seed, i)[label] for i in range(args.n_truth)])
        for arch in args.archs:
            original, data, data_seed = train_original(arch, label, confounder, args)
            faces = hardening_faces(data, data_seed, label, confounder, args)
            log(f"{arch} {label}/{confounder}: original trained")
            rows = [("original", measure(original, label, confounder, eval_faces, bank, bank_labels, args), None)]
            log("original measured")
            for name in args.variants:
                model, seconds = harden_variant(original, faces, label, name, args)
                log(f"{name}: hardened in {seconds:.0f} s")
                rows.append((name, measure(model, label, confounder, eval_faces, bank, bank_labels, args), seconds))
                log(f"{name}: measured")
            out += tables(f"{arch}, {label} / {confounder} at {args.strength:g}", rows, label, confounder, args)
    out.append(f"({time.time() - began:.0f} s)")
    print("\n".join(out), flush=True)


if __name__ == "__main__":
    main()
