"""`sia synth`'s data set: N procedural faces (sia_cli.inputs.faces) written in CelebA layout,
with `list_attr.txt`, `list_landmarks.txt` and the record of how they were drawn (`.sia_synth.json`),
so that any face can be drawn again."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sia_cli.errors import SiaError
from sia_cli.inputs.faces import (
    ATTRIBUTES,
    IMAGE_NAME,
    LANDMARK_NAMES,
    MARKER,
    check_correlations,
    face_labels,
    render_index,
)
from sia_cli.progress import ProgressFn, silent
from sia_cli.runs.files import format_list_attr, write_text_atomic


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SiaError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise SiaError(f"{out} is not empty and is not a previous `sia synth` output; choose another folder")


def _landmark_text(names: list[str], points: np.ndarray) -> str:
    header = " ".join(f"{n}_{axis}" for n in LANDMARK_NAMES for axis in "xy")
    lines = [str(len(names)), header]
    lines += [name + " " + " ".join(f"{v:4d}" for v in row) for name, row in zip(names, points)]
    return "\n".join(lines) + "\n"


def label_statistics(labels: np.ndarray, correlations) -> dict:
    positive = labels > 0
    col = {name: i for i, name in enumerate(ATTRIBUTES)}
    return {
        "n": int(len(labels)),
        "positive_share": {name: float(positive[:, i].mean()) for name, i in col.items()},
        "correlations": [
            {"a": a, "b": b, "p": p, "agreement": float((positive[:, col[a]] == positive[:, col[b]]).mean())}
            for a, b, p in correlations
        ],
    }


def _remove_stale_images(images: Path, n: int) -> None:
    for path in images.iterdir():
        if IMAGE_NAME.match(path.name) and int(path.stem) >= n:
            path.unlink()


def make_dataset(out: Path, n: int, seed: int, size: int = 64, correlations=(), progress: ProgressFn = silent) -> dict:
    """Write a CelebA-layout dataset of `n` faces under `out`; return label statistics."""
    out = Path(out)
    correlations = check_correlations(correlations)
    if n < 1:
        raise SiaError(f"--n must be at least 1 (got {n})")
    if not 16 <= size <= 1024:
        raise SiaError(f"--size must be within [16, 1024] (got {size})")
    if seed < 0:
        raise SiaError(f"--seed must be non-negative (got {seed})")
    _check_out_dir(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    meta = {"seed": seed, "n": n, "size": size, "correlations": [list(c) for c in correlations]}
    write_text_atomic(out / MARKER, json.dumps(meta) + "\n")
    names = [f"{i:06d}.png" for i in range(n)]
    labels = np.empty((n, len(ATTRIBUTES)), dtype=np.int8)
    points = np.empty((n, 10), dtype=np.int64)
    step = max(1, n // 200)
    for i, name in enumerate(names):
        # Separate streams: adding a correlation changes labels, never the nuisance of a face.
        attrs = face_labels(seed, i, correlations)
        img, pts = render_index(attrs, seed, i, size)
        img.save(images / name, format="PNG")
        labels[i] = [1 if attrs[a] else -1 for a in ATTRIBUTES]
        points[i] = np.rint(pts).astype(np.int64).ravel()
        if (i + 1) % step == 0 or i + 1 == n:
            progress("synth", i + 1, n, None)
    _remove_stale_images(images, n)
    write_text_atomic(out / "list_attr.txt", format_list_attr(ATTRIBUTES, names, labels))
    write_text_atomic(out / "list_landmarks.txt", _landmark_text(names, points))
    return label_statistics(labels, correlations)


