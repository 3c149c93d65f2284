"""The renderer's true counterfactuals as a training signal for `sia train-gan`.

A `sia synth` folder records the seed that drew it (`.sia_synth.json`), and the renderer draws
face i again with any attributes, nuisance kept (`faces.render_index`). So for every training
face and every one-attribute edit the trainer knows the image the generator should produce:
the edit's true counterfactual. CelebA holds no such pairs; there the AttGAN recipe stays alone.

The edits are the ones the backbone is judged on (`backbone.edited`: one attribute flipped, and
what cannot go with it turned off), so the supervision and the measure ask for the same faces.
The judge (`examples/targets/attribute_judge.pt`) plays no part here.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sia_cli.backbone.attgan import edited
from sia_cli.errors import SiaError
from sia_cli.inputs import faces
from sia_cli.inputs.images import image_tensor
from sia_cli.measures.validity import counterfactual_faces
from sia_cli.progress import ProgressFn, silent


@dataclass(frozen=True)
class SynthSource:
    """How a `sia synth` folder was drawn: enough to draw any of its faces again."""

    seed: int
    size: int
    correlations: tuple[tuple[str, str, float], ...]

    @property
    def description(self) -> str:
        return f"sia synth seed {self.seed}, {self.size} px"


def synth_source(images: Path) -> SynthSource | None:
    """The drawing of the `sia synth` set whose images/ folder is `images`, or None for any
    other folder (CelebA, photos)."""
    marker = Path(images).parent / faces.MARKER
    if not marker.is_file():
        return None
    try:
        meta = json.loads(marker.read_text())
        return SynthSource(int(meta["seed"]), int(meta["size"]),
                           tuple((a, b, float(p)) for a, b, p in meta.get("correlations", [])))
    except (OSError, ValueError, KeyError, TypeError):
        raise SiaError(f"{marker} is not a `sia synth` record: draw the faces again with `sia synth`") from None


def face_index(file: Path) -> int:
    """The index a `sia synth` face was drawn with, from its file name (000042.png)."""
    if not faces.IMAGE_NAME.match(file.name):
        raise SiaError(f"{file.name} is not named as `sia synth` names its faces (NNNNNN.png): "
                       "counterfactuals need the faces as drawn; pass --no-counterfactuals")
    return int(file.stem)


def check_labels(source: SynthSource, files: list[Path], rows: list[np.ndarray], names: list[str]) -> None:
    """The labels must be the ones the faces were drawn with: a relabelled face's counterfactual
    would be drawn from labels its image does not show."""
    for file, row in zip(files, rows):
        truth = faces.face_labels(source.seed, face_index(file), source.correlations)
        drawn = np.array([truth[name] for name in names])
        if not np.array_equal(drawn, row > 0.5):
            wrong = [name for name, t, r in zip(names, drawn, row > 0.5) if t != r]
            raise SiaError(f"{file.name}: its labels differ from the face `sia synth` drew ({', '.join(wrong)}): "
                           "counterfactuals need the labels as drawn; pass --no-counterfactuals")


def _render_edits(job: tuple) -> np.ndarray:
    """Face `index` drawn once per one-attribute flip: (K, 3, img_size, img_size) uint8. The
    flips are the ones true effects are measured with (`validity.flip`, the same convention as
    `backbone.edited`)."""
    source, index, names, img_size = job
    _, _, flipped = counterfactual_faces(source.seed, index, source.size, source.correlations, names)
    out = np.empty((len(names), 3, img_size, img_size), dtype=np.uint8)
    for k, name in enumerate(names):
        out[k] = image_tensor(flipped[name].convert("RGB"), img_size).mul(255).round().to(torch.uint8).numpy()
    return out


def render_pairs(source: SynthSource, files: list[Path], names: list[str], img_size: int,
                 workers: int = 0, progress: ProgressFn = silent) -> torch.Tensor:
    """Every face's one-attribute edits as drawn by the renderer: (N, K, 3, S, S) uint8.

    About 6 ms a drawing at 64 px on this project's CPU, so 90 ms a face for 15 attributes; the
    drawings run in `workers` processes (default: one per core), before the first step."""
    jobs = [(source, face_index(file), list(names), img_size) for file in files]
    out = torch.empty((len(files), len(names), 3, img_size, img_size), dtype=torch.uint8)
    processes = workers or os.cpu_count() or 1
    step = max(1, len(jobs) // 100)

    def collect(results) -> None:
        for i, edits in enumerate(results):
            out[i] = torch.from_numpy(edits)
            if (i + 1) % step == 0 or i + 1 == len(jobs):
                progress("draw counterfactuals", i + 1, len(jobs))

    if processes == 1 or len(jobs) < 8:
        collect(map(_render_edits, jobs))
    else:
        # Spawned, not forked: a child forked after torch has started its OpenMP threads can
        # hang in its first torch call (seen here when the parent had loaded images first).
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            collect(pool.map(_render_edits, jobs, chunksize=16))
    return out


def one_attribute_edits(a: torch.Tensor, ks: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Row i of `a` with attribute ks[i] edited as `backbone.edited` edits it."""
    b = a.clone()
    for k in ks.unique().tolist():
        rows = ks == k
        b[rows] = edited(a[rows], k, names)[0]
    return b


def change_errors(fake: torch.Tensor, reconstruction: torch.Tensor, real: torch.Tensor, truth: torch.Tensor,
                  threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """How far the generator's change (edit minus reconstruction) is from the true change
    (counterfactual minus image), averaged over the pixels the edit truly changes, image by
    image: a mustache (1% of the pixels) then counts as much as pale skin (a third of them),
    where a plain pixel loss lets small features vanish. Images in [-1, 1]; `threshold` is the
    change in [0, 1] under which a pixel counts as unchanged. Returns each image's error and
    whether its edit changes any pixel at all (none should fail to)."""
    true_change = truth - real
    changed = (true_change.abs().amax(dim=1, keepdim=True) > 2 * threshold).float()
    area = changed.sum(dim=(1, 2, 3)) * real.size(1)
    error = ((fake - reconstruction) - true_change).abs() * changed
    shown = area > 0
    return error.sum(dim=(1, 2, 3)) / area.clamp(min=1), shown


def change_loss(fake: torch.Tensor, reconstruction: torch.Tensor, real: torch.Tensor, truth: torch.Tensor,
                threshold: float) -> torch.Tensor:
    """The mean of `change_errors` over the images whose edit changes something."""
    errors, shown = change_errors(fake, reconstruction, real, truth, threshold)
    if not shown.any():
        return fake.new_zeros(())
    return errors[shown].mean()


class ChangeFocus:
    """The change loss of a batch, each image weighed by how hard its attribute's edit is so far.

    Keeps a running mean of the change error per attribute (the generator's own training loss,
    nothing else); an image editing attribute k weighs (mean_k / mean over attributes) ** power,
    normalised over the batch. Power 0 weighs every image alike (`change_loss`). The weights
    follow the errors: once a hard edit is learnt its weight falls back. The running means are
    not in the checkpoint: a resumed run finds them again within a few hundred steps (decay
    0.99), and under torchrun each rank keeps its own."""

    def __init__(self, attributes: int, power: float, decay: float = 0.99):
        self.power, self.decay = power, decay
        self.running = torch.full((attributes,), float("nan"))

    def weights(self) -> torch.Tensor:
        known = torch.nan_to_num(self.running, nan=float(self.running.nanmean()) if self.running.isfinite().any() else 1.0)
        return (known / known.mean()).pow(self.power)

    def __call__(self, errors: torch.Tensor, shown: torch.Tensor, edited: torch.Tensor | None) -> torch.Tensor:
        if not shown.any():
            return errors.new_zeros(())
        if self.power == 0 or edited is None:
            return errors[shown].mean()
        ks, values = edited[shown].cpu(), errors[shown].detach().float().cpu()
        # this batch's mean error per attribute, folded into the running means in one pass
        count = torch.bincount(ks, minlength=len(self.running)).float()
        drawn = count > 0
        mean = torch.zeros_like(self.running).index_add_(0, ks, values)[drawn] / count[drawn]
        old = self.running[drawn]
        self.running[drawn] = torch.where(old.isnan(), mean, self.decay * old + (1 - self.decay) * mean)
        weight = self.weights()[ks].to(errors.device)
        return (errors[shown] * weight).sum() / weight.sum()
