"""Class imbalance: SIA augmentation against reweighting and resampling (the paper's Table 6 shape).

    python examples/imbalance_study.py                  # about 11 minutes on 2 shared CPU cores
    python examples/imbalance_study.py --repeats 5 --n-train 4000

A binary classifier of one synth attribute (default Eyeglasses, which the shipped backbone
edits in about half of the faces) is trained on a 1:99 imbalanced set: --n-train faces of
which 1% have the attribute, picked by their labels (`sia_cli.faces.face_labels`) from one
seeded stream of faces drawn at the renderer's natural rates and rendered in that order.
Five variants, each from the same initial weights and for the same number of Adam steps:

* baseline: the imbalanced set as it is;
* reweighting: the positives' loss weighted by negatives / positives (BCE `pos_weight`);
* resampling: the positives repeated until the classes are even (random oversampling);
* SIA augmentation: `sia augment` run on the baseline with the true labels, `--class 1`
  (the minority only), the label attribute protected and --aug-per-positive rounds per
  positive face (later rounds start from jittered attributes); its adversaries join the
  training set labelled positive;
* SIA + reweighting: both, the weight being negatives / (positives + adversaries).

Each is measured on a balanced held-out set (--n-test faces of each class, another seed):
precision, recall and accuracy at probability 0.5, the area under the ROC curve (the ranking,
whatever the threshold), and the recall on the backbone's reconstructions G(x, a0) of the same
test positives: the look every SIA adversary has, so a gap between the two recalls is the
distance between the generator's images and the real ones. With --repeats R every variant is
trained R times (model seeds 0..R-1, the augmentation redone on each repeat's baseline) and the
table gives the mean and the spread (min to max). Prints a Markdown table; data, augmentation
sets and each finished repeat's figures are cached in --work, so an interrupted run resumes at
the repeat it was in.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure_validity as mv  # noqa: E402  (the small CNN and the pooled-pixel MLP)
import train_targets as tt  # noqa: E402

from sia_cli.backbone.registry import load_backbone  # noqa: E402
from sia_cli.engine.attack import AttackSettings  # noqa: E402
from sia_cli.inputs.faces import ATTRIBUTES, face_labels, render_index  # noqa: E402
from sia_cli.inputs.images import load_image, read_attributes  # noqa: E402
from sia_cli.jobs.augment import AugmentConfig, augment  # noqa: E402
from sia_cli.runs.files import format_list_attr  # noqa: E402

VARIANTS = ("baseline", "reweighting", "resampling", "SIA augmentation", "SIA + reweighting")
TRAIN_SEED, TEST_SEED = 7100, 7200  # face streams; no other study draws these


def render_selection(folder: Path, seed: int, label: str, positives: int, negatives: int) -> Path:
    """The first `positives` faces with `label` and the first `negatives` without it, of the
    face stream `seed`, in stream order, as a CelebA-layout folder with list_attr.txt and
    labels.csv (file,label). Cached: an existing folder with a list_attr.txt is reused."""
    if (folder / "list_attr.txt").is_file():
        return folder
    picked, counts, index = [], {True: 0, False: 0}, 0
    want = {True: positives, False: negatives}
    while counts[True] < positives or counts[False] < negatives:
        attrs = face_labels(seed, index)
        if counts[attrs[label]] < want[attrs[label]]:
            picked.append((index, attrs))
            counts[attrs[label]] += 1
        index += 1
    (folder / "images").mkdir(parents=True, exist_ok=True)
    names, rows = [], []
    for index, attrs in picked:
        name = f"{index:06d}.png"  # the index in the stream: face_labels(seed, index) gives its labels
        render_index(attrs, seed, index, tt.SIZE)[0].save(folder / "images" / name, format="PNG")
        names.append(name)
        rows.append([1 if attrs[a] else -1 for a in ATTRIBUTES])
    with open(folder / "labels.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label"])
        writer.writerows([name, int(attrs[label])] for name, (_, attrs) in zip(names, picked))
    (folder / "list_attr.txt").write_text(format_list_attr(ATTRIBUTES, names, rows), encoding="utf-8")
    return folder


def load_set(folder: Path, label: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = tt.load_folder(folder)
    return images, labels[label].float()


def load_augmented(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with open(folder / "labels.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    images = torch.stack([load_image(folder / "images" / row["file"], tt.SIZE) for row in rows])
    return images, torch.tensor([float(row["label"]) for row in rows])


def fit(arch: str, images: torch.Tensor, labels: torch.Tensor, pool: torch.Tensor, steps: int, seed: int,
        pos_weight: float | None, batch: int, lr: float):
    """`steps` Adam steps on batches drawn from `pool` (indices, repeats allowed) in seeded
    permutations; the same initial weights for every call with the same seed."""
    torch.manual_seed(seed)
    model = mv.ARCHS[arch]()
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat([pool[torch.randperm(len(pool), generator=generator)]
                       for _ in range(-(-steps * batch // len(pool)))])
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    weight = None if pos_weight is None else torch.tensor([pos_weight])
    model.train()
    for step in range(steps):
        index = order[step * batch:(step + 1) * batch]
        logits = model((images[index] - 0.5) / 0.5).squeeze(1)
        loss = F.binary_cross_entropy_with_logits(logits, labels[index], pos_weight=weight)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def logits_of(model, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model((chunk - 0.5) / 0.5).squeeze(1) for chunk in images.split(256)])


def auc(logits: torch.Tensor, truth: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney; ties share their mean rank): the ranking, whatever the threshold."""
    values, positive = logits.numpy(), truth.numpy() > 0.5
    order = values.argsort(kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def scores(model, images: torch.Tensor, labels: torch.Tensor, reconstructions: torch.Tensor) -> dict[str, float]:
    logits = logits_of(model, images)
    predicted, truth = logits > 0, labels > 0.5
    tp = int((predicted & truth).sum())
    on_reconstructions = logits_of(model, reconstructions) > 0
    return {"precision": tp / int(predicted.sum()) if predicted.any() else float("nan"),
            "recall": tp / int(truth.sum()), "accuracy": float((predicted == truth).float().mean()),
            "predicted_positive": int(predicted.sum()), "auc": auc(logits, labels),
            # the same test faces through the backbone (G(x, a0)): the look of every SIA adversary
            "recall_reconstructed": float(on_reconstructions[truth].float().mean())}


def reconstruct(folder: Path, images: torch.Tensor, gan: str | None) -> torch.Tensor:
    """The backbone's reconstructions G(x, a0) of a folder's faces, in [0, 1]."""
    backbone = load_backbone(gan)
    table = read_attributes(folder / "list_attr.txt").select(backbone.attributes)
    a0 = torch.from_numpy(np.stack([table.rows[name] for name in table.rows])).float()
    with torch.no_grad():
        return torch.cat([(backbone(x * 2 - 1, a) + 1) / 2 for x, a in zip(images.split(50), a0.split(50))]).clamp(0, 1)


def cell(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v == v]  # precision is undefined (NaN) when nothing is predicted positive
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    short = max(0, digits - 1)
    return f"{np.mean(values):.{digits}f} ({min(values):.{short}f}-{max(values):.{short}f})"


def one_repeat(seed: int, args, steps: int, images, labels, test, train_dir: Path, positives: int,
               negatives: int, log) -> dict:
    """The five variants of one model seed (the augmentation made with this seed's baseline)."""
    everything = torch.arange(len(images))
    oversampled = torch.cat([everything, everything[labels > 0.5].repeat(max(0, negatives // positives - 1))])
    common = dict(arch=args.arch, steps=steps, seed=seed, batch=args.batch_size, lr=args.lr)
    found = {}
    baseline = fit(images=images, labels=labels, pool=everything, pos_weight=None, **common)
    found["baseline"] = scores(baseline, *test)
    found["reweighting"] = scores(fit(images=images, labels=labels, pool=everything,
                                      pos_weight=negatives / positives, **common), *test)
    found["resampling"] = scores(fit(images=images, labels=labels, pool=oversampled, pos_weight=None, **common), *test)
    log(f"repeat {seed}: baseline, reweighting, resampling trained")
    model_path = args.work / f"baseline-{args.label}-{args.arch}-seed{seed}.pt"
    tt.save(baseline, model_path, tt.classifier_yaml(args.label) + "output: logits\n")
    aug_dir = args.work / f"augment-{args.label}-{args.arch}-seed{seed}-x{args.aug_per_positive}-t{args.steps}"
    summary = augment(AugmentConfig(
        model=model_path, images=train_dir / "images", attrs_file=train_dir / "list_attr.txt", out=aug_dir,
        labels=train_dir / "labels.csv", only_class="1", n=positives * args.aug_per_positive,
        protect=(args.label,), settings=AttackSettings(steps=args.steps, step_size=args.step_size),
        batch_size=32, seed=seed, gan=args.gan, force=True))
    aug_images, aug_labels = load_augmented(aug_dir)
    log(f"repeat {seed}: {len(aug_images)} SIA adversaries of the positives "
        f"({summary.get('fooled')} judged wrong by the baseline)")
    all_images, all_labels = torch.cat([images, aug_images]), torch.cat([labels, aug_labels])
    pool = torch.arange(len(all_images))
    found["SIA augmentation"] = scores(fit(images=all_images, labels=all_labels, pool=pool, pos_weight=None,
                                           **common), *test)
    weight = negatives / (positives + int((aug_labels > 0.5).sum()))
    found["SIA + reweighting"] = scores(fit(images=all_images, labels=all_labels, pool=pool, pos_weight=weight,
                                            **common), *test)
    log(f"repeat {seed}: SIA variants trained")
    return {"scores": found, "augmented": len(aug_images), "fooled": summary.get("fooled")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sia-imbalance"))
    parser.add_argument("--label", default="Eyeglasses")
    parser.add_argument("--arch", choices=sorted(mv.ARCHS), default="cnn")
    parser.add_argument("--n-train", type=int, default=2000, help="training faces, 1%% of them positive")
    parser.add_argument("--ratio", type=int, default=99, help="negatives per positive")
    parser.add_argument("--n-test", type=int, default=200, help="held-out faces of each class")
    parser.add_argument("--epochs", type=float, default=8,
                        help="training length, in passes over the imbalanced set (the same steps for every variant)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--aug-per-positive", type=int, default=10, help="SIA adversaries per positive face")
    parser.add_argument("--steps", type=int, default=20, help="SIA steps of the augmentation")
    parser.add_argument("--step-size", type=float, default=0.05, help="SIA step (pixels stay within eps)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gan", default=None, help="backbone of the augmentation (default: the shipped one)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.script/save are deprecated
    torch.set_num_threads(args.threads)
    began = time.time()

    def log(text: str) -> None:
        print(f"[{time.time() - began:5.0f} s] {text}", file=sys.stderr, flush=True)

    positives = max(1, round(args.n_train / (args.ratio + 1)))
    negatives = args.n_train - positives
    train_dir = render_selection(args.work / f"train-{args.label}-p{positives}-n{negatives}-s{TRAIN_SEED}",
                                 TRAIN_SEED, args.label, positives, negatives)
    test_dir = render_selection(args.work / f"test-{args.label}-{args.n_test}x2-s{TEST_SEED}",
                                TEST_SEED, args.label, args.n_test, args.n_test)
    images, labels = load_set(train_dir, args.label)
    test_images, test_labels = load_set(test_dir, args.label)
    test_reconstructions = reconstruct(test_dir, test_images, args.gan)
    test = (test_images, test_labels, test_reconstructions)
    log(f"training set: {positives} positive, {negatives} negative; test set: {args.n_test} + {args.n_test}")
    steps = max(1, round(args.epochs * len(images) / args.batch_size))
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    augmented_sizes, fooled = [], []
    settings = {k: str(v) for k, v in sorted(vars(args).items()) if k not in ("work", "repeats", "threads")}
    key = hashlib.sha256(json.dumps({**settings, "figures": 2}).encode()).hexdigest()[:10]  # 2: AUC, reconstructions
    for seed in range(args.repeats):
        cached = args.work / f"results-{key}-seed{seed}.json"  # one finished repeat: a rerun skips it
        if cached.is_file():
            done = json.loads(cached.read_text())
            log(f"repeat {seed}: read from {cached.name}")
        else:
            done = one_repeat(seed, args, steps, images, labels, test, train_dir, positives, negatives, log)
            cached.write_text(json.dumps(done) + "\n")
        for name in VARIANTS:
            results[name].append(done["scores"][name])
        augmented_sizes.append(done["augmented"])
        fooled.append(done["fooled"])

    spread = " (mean, min-max over the repeats)" if args.repeats > 1 else ""
    out = [f"## Imbalance: {args.label}, {positives}:{negatives} training faces, {args.arch}, {steps} Adam steps of "
           f"batch {args.batch_size} per variant, {args.repeats} model seed(s); SIA augmentation: "
           f"{augmented_sizes[0]} adversaries of the positives ({args.aug_per_positive} per positive, {args.steps} "
           f"steps of {args.step_size:g}, {args.label} protected; judged wrong by the baseline: {fooled}); "
           f"balanced test set of {2 * args.n_test} faces", "",
           f"| variant | precision{spread} | recall | accuracy | predicted positive ({args.n_test} are) | AUC "
           f"| recall on reconstructions |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in VARIANTS:
        rows = results[name]
        out.append(f"| {name} | {cell([r['precision'] for r in rows])} | {cell([r['recall'] for r in rows])} "
                   f"| {cell([r['accuracy'] for r in rows])} | {cell([r['predicted_positive'] for r in rows], 0)} "
                   f"| {cell([r['auc'] for r in rows])} | {cell([r['recall_reconstructed'] for r in rows])} |")
    out.append(f"\n({time.time() - began:.0f} s)")
    print("\n".join(out), flush=True)


if __name__ == "__main__":
    main()
