"""Validity of a diagnosis against the truth, on synthetic faces whose features we control.

The renderer draws face `i` of seed `s` from a nuisance stream of its own
(`faces.render_index`), so rendering the same index with one attribute flipped gives the same
face with only that feature changed: a counterfactual. Over a set of faces, the mean change of
the model's output under flipping attribute k is the TRUE effect of k on that model:

    t_k = mean_i distance(f(face_i), f(face_i with k flipped))

with `Target.distance` (|p_a - p_b| for binary models, total variation of the class
probabilities for multiclass, NME for keypoints). `validity` then scores a diagnosis measure
against it: does it name the same top attribute, how well does it rank (Spearman) and how
close is its profile (cosine).

Flipping follows `faces.resolve_conflicts(attrs, keep=k)`: turning a hair colour on turns the
face's other hair colour off, turning Bald on takes Bangs away and the reverse. Turning a hair
colour off leaves the face's nuisance hair (grey or red).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from sia_cli.engine.attack import flip_effects
from sia_cli.errors import SiaError
from sia_cli.inputs.faces import (
    ATTRIBUTES,
    IMAGE_NAME,
    check_attribute,
    check_correlations,
    face_labels,
    render_index,
    resolve_conflicts,
)
from sia_cli.progress import ProgressFn, silent
from sia_cli.runs.files import format_list_attr, write_text_atomic


def flip(attrs: dict[str, bool], name: str) -> dict[str, bool]:
    """`attrs` with `name` switched; the switched attribute wins any conflict it creates."""
    check_attribute(name)
    changed = dict(attrs)
    changed[name] = not attrs.get(name, False)
    return resolve_conflicts(changed, keep=name)


Counterfactuals = tuple[dict[str, bool], Image.Image, dict[str, Image.Image]]


def counterfactual_faces(seed: int, index: int, size: int = 64, correlations=(),
                         attributes: Sequence[str] = ATTRIBUTES) -> Counterfactuals:
    """(labels, original image, {attribute: image with only that attribute flipped}) of one face.

    The face is face `index` of `make_dataset(..., seed=seed, size=size, correlations=...)`:
    its original is byte for byte the PNG that `make_dataset` writes.
    """
    attrs = face_labels(seed, index, correlations)
    original, _ = render_index(attrs, seed, index, size)
    flipped = {name: render_index(flip(attrs, name), seed, index, size)[0] for name in attributes}
    return attrs, original, flipped


def counterfactual_bank(seed: int, n: int, size: int = 64, correlations=(),
                        attributes: Sequence[str] = ATTRIBUTES) -> torch.Tensor:
    """(n, 1 + K, 3, size, size) uint8: per face its original, then one flip per attribute.

    Rendering costs far more than a small model's forward, so one bank can serve many targets.
    """
    if n < 1:
        raise SiaError(f"true effects need at least one face (got n={n})")
    correlations = check_correlations(correlations)
    attributes = [check_attribute(a) for a in attributes]
    bank = torch.empty((n, 1 + len(attributes), 3, size, size), dtype=torch.uint8)
    for index in range(n):
        _, original, flipped = counterfactual_faces(seed, index, size, correlations, attributes)
        for j, image in enumerate([original] + [flipped[a] for a in attributes]):
            bank[index, j] = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    return bank


@torch.no_grad()
def bank_effects(target, bank: torch.Tensor, batch_size: int = 8) -> np.ndarray:
    """(n, K) per-face effects on a `counterfactual_bank`: the target's output distance
    between face i and face i with attribute k flipped. Images go in as [-1, 1]."""
    device = target._mean.device if hasattr(target, "_mean") else torch.device("cpu")
    n, views = bank.shape[:2]
    rows = []
    for start in range(0, n, max(1, batch_size)):
        chunk = bank[start : start + batch_size]
        count = chunk.shape[0]
        images = chunk.reshape(count * views, *chunk.shape[2:]).to(device).float() / 127.5 - 1
        out = target(images)
        out = out.view(count, views, *out.shape[1:])
        base = out[:, :1].expand_as(out[:, 1:]).reshape(count * (views - 1), *out.shape[2:])
        other = out[:, 1:].reshape(count * (views - 1), *out.shape[2:])
        rows.append(target.distance(other, base).view(count, views - 1).float().cpu().numpy())
    return np.concatenate(rows)


def true_effects(target, seed: int, n: int, size: int = 64, correlations=(),
                 attributes: Sequence[str] = ATTRIBUTES, batch_size: int = 8,
                 bank: torch.Tensor | None = None) -> dict[str, float]:
    """Mean |change of the target's output| per attribute when only that attribute is flipped.

    `target` is a loaded `sia_cli.targets.Target` (or any module taking images in [-1, 1]
    with a `distance(out_a, out_b)` method); faces are indices 0..n-1 of `seed` (drawn with
    `correlations`), or the given `bank` from `counterfactual_bank` with the same `attributes`.
    """
    attributes = list(attributes)
    if bank is None:
        bank = counterfactual_bank(seed, n, size, correlations, attributes)
    elif bank.shape[1] != len(attributes) + 1:
        raise SiaError(f"the counterfactual bank holds {bank.shape[1] - 1} flips, not {len(attributes)}")
    matrix = bank_effects(target, bank, batch_size)
    return {name: float(v) for name, v in zip(attributes, matrix.mean(axis=0))}


def generator_flip_effects(backbone, target, x0: torch.Tensor, a0: torch.Tensor, batch_size: int = 8,
                           attributes: Sequence[str] = ()) -> np.ndarray:
    """(n, K) effects of flipping each attribute through the generator instead of the renderer
    (`sia_cli.engine.attack.flip_effects`, the raw material of the `flip` measure), x0 in [0, 1],
    a0 in [0, 1], in batches; `attributes` (the backbone's names) turn off what cannot go with an
    attribute turned on, as the renderer's flips do.

    Where it is much smaller than the true effect, the backbone cannot edit that feature (a
    blind spot), whatever the attack.
    """
    step = max(1, batch_size)
    rows = [flip_effects(backbone, target, x0[start : start + step], a0[start : start + step], attributes)
            for start in range(0, x0.shape[0], step)]
    return torch.cat(rows).float().cpu().numpy()


# ----------------------------------------------------------------------------- scoring


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank (as Spearman's coefficient wants)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=float)
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson on mean-tie ranks); NaN when either side is constant."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise SiaError("Spearman needs two equally long lists of at least two values")
    ra, rb = _ranks(a) - (len(a) + 1) / 2, _ranks(b) - (len(b) + 1) / 2
    denominator = math.sqrt(float((ra ** 2).sum() * (rb ** 2).sum()))
    return float((ra * rb).sum() / denominator) if denominator > 0 else math.nan


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    denominator = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / denominator) if denominator > 0 else math.nan


def _top(values: dict[str, float]) -> str:
    return sorted(values, key=lambda name: (-values[name], name))[0]


def validity(diagnosis: dict[str, float], truth: dict[str, float]) -> dict:
    """Score a diagnosis measure (raw or normalised, per attribute) against the true effects.

    Compared over the attributes both name (a diagnosis leaves its protected attributes out,
    so those do not count): the true top attribute and its share of the true total over those
    attributes, the measure's top attribute and its share, whether the two tops agree, the
    Spearman rank correlation and the cosine similarity of the two profiles.
    """
    names = [name for name in diagnosis if name in truth]
    if len(names) < 2:
        raise SiaError("validity needs at least two attributes that both the diagnosis and the truth measure")
    measured = {name: float(diagnosis[name]) for name in names}
    true = {name: float(truth[name]) for name in names}
    true_top, measured_top = _top(true), _top(measured)
    true_total, measured_total = sum(true.values()), sum(measured.values())
    return {
        "attributes": names,
        "true_top": true_top,
        "true_top_share": true[true_top] / true_total if true_total > 0 else math.nan,
        "measured_top": measured_top,
        "measured_top_share": measured[measured_top] / measured_total if measured_total > 0 else math.nan,
        "true_share_of_measured_top": true[measured_top] / true_total if true_total > 0 else math.nan,
        "agree": true_top == measured_top,
        "spearman": spearman([measured[n] for n in names], [true[n] for n in names]),
        "cosine": cosine([measured[n] for n in names], [true[n] for n in names]),
    }


# ----------------------------------------------------------------------------- files


def write_counterfactuals(out: Path, n: int, seed: int, size: int = 64, correlations=(),
                          attributes: Sequence[str] = ATTRIBUTES, progress: ProgressFn = silent) -> Path:
    """Write `out/counterfactuals/<Attribute>/<index>.png`: face `index` of `make_dataset(out, n,
    seed, size, correlations)` with only that attribute flipped, plus `list_attr.txt` (CelebA layout,
    +1/-1) per attribute folder with each counterfactual's labels. Returns the counterfactuals folder."""
    correlations = check_correlations(correlations)
    attributes = [check_attribute(a) for a in attributes]
    root = Path(out) / "counterfactuals"
    for name in attributes:
        (root / name).mkdir(parents=True, exist_ok=True)
    names = [f"{i:06d}.png" for i in range(n)]
    labels = {name: np.empty((n, len(ATTRIBUTES)), dtype=np.int8) for name in attributes}
    step = max(1, n // 200)
    for index, file in enumerate(names):
        attrs = face_labels(seed, index, correlations)
        for name in attributes:
            changed = flip(attrs, name)
            render_index(changed, seed, index, size)[0].save(root / name / file, format="PNG")
            labels[name][index] = [1 if changed[a] else -1 for a in ATTRIBUTES]
        if (index + 1) % step == 0 or index + 1 == n:
            progress("counterfactuals", index + 1, n, None)
    for name in attributes:
        for path in (root / name).iterdir():  # a rerun with a smaller n leaves no stale faces
            if IMAGE_NAME.match(path.name) and int(path.stem) >= n:
                path.unlink()
        write_text_atomic(root / name / "list_attr.txt", format_list_attr(ATTRIBUTES, names, labels[name]))
    return root
