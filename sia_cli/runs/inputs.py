"""What every image run starts from: the run config, the loaded inputs (backbone, target, files,
attributes, labels), the batches, and the clean and reference passes over a batch."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from sia_cli.backbone.registry import load_backbone
from sia_cli.engine.attack import AttackSettings, quantize
from sia_cli.errors import SiaError
from sia_cli.inputs.images import ImageError, decode, image_tensor, list_images, read_attributes
from sia_cli.progress import ProgressFn, silent
from sia_cli.runs.distributed import World
from sia_cli.targets import load_target, read_labels
from sia_cli.targets.options import ModelOptions


@dataclass(frozen=True)
class RunConfig:
    model: Path
    images: Path
    out: Path
    gan: str | None = None
    attrs_file: Path | None = None
    methods: tuple[str, ...] = ("sia",)
    settings: AttackSettings = field(default_factory=AttackSettings)
    protect: tuple[str, ...] = ()
    batch_size: int | str = 16  # or "auto", which sia_cli.speed.tune settles
    compile: bool = False
    device: str = "cpu"
    seed: int = 0
    model_options: ModelOptions = field(default_factory=ModelOptions)  # how to load and read the model
    labels: Path | None = None
    force: bool = False
    keep_lost: bool = False  # count images lost in reconstruction in the success rate and measures
    command: str = ""
    align: bool = False  # find and align the faces of --images first (sia_cli.align.align_inputs)

    def describe(self) -> dict:
        """The settings as reports record them: the model options beside the others, flat."""
        data = asdict(self)
        data.update(data.pop("model_options"))
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}


@dataclass
class Inputs:
    """Everything loaded once before the first batch."""

    backbone: object
    target: object
    files: list[Path]
    attributes: object  # AttributeTable restricted to the backbone's names, or None
    labels: dict | None
    protected: torch.Tensor  # (K,) bool
    adversary_names: dict[str, str]  # source file name -> PNG name


def load_inputs(config: RunConfig, device: str, progress: ProgressFn = silent) -> Inputs:
    """Every input of a run, checked before the first batch (on `device`, this rank's)."""
    backbone = load_backbone(config.gan, device, progress)
    target = load_target(config.model, device=device, probe_size=backbone.img_size, options=config.model_options)
    files = list_images(config.images)
    table = read_attributes(config.attrs_file).select(backbone.attributes) if config.attrs_file else None
    mismatch = table.mismatch(files) if table is not None else None
    if mismatch:
        raise SiaError(f"{mismatch}: --attrs-file and --images must name the same files")
    if table is None and backbone.discriminator is None:
        raise SiaError(
            "no starting attributes: pass --attrs-file (CelebA list_attr layout); "
            f"backbone {backbone.info.name} has no discriminator head to predict them"
        )
    unknown = [name for name in config.protect if name not in backbone.attributes]
    if unknown:
        raise SiaError(f"--protect {', '.join(unknown)}: not a backbone attribute ({', '.join(backbone.attributes)})")
    protected = torch.tensor([name in config.protect for name in backbone.attributes])
    labels = read_labels(config.labels, target.task, target.task.class_labels) if config.labels else None
    if labels is not None:  # all of them before the first batch, not when a batch reaches the gap
        missing = [file.name for file in files if file.name not in labels]
        if missing:
            raise SiaError(f"--labels {config.labels} has no row for {missing[0]} "
                           f"({len(missing)} of {len(files)} image(s) missing)")
    return Inputs(backbone, target, files, table, labels, protected, adversary_names(files))


@dataclass
class Batch:
    files: list[Path]
    x0: torch.Tensor  # (B, 3, S, S) in [0, 1]
    a0: torch.Tensor  # (B, K) in [0, 1]
    index: int = 0  # position among the run's fixed blocks of files: seeds and shards follow it
    a0_source: str = "attrs_file"  # or "discriminator": estimated, not known
    sides: tuple[int, ...] = ()  # each file's shorter side before it was resized to the backbone's

    def part(self, start: int, stop: int) -> "Batch":
        """Images start..stop-1 of the batch, with its index and the source of its attributes."""
        return Batch(self.files[start:stop], self.x0[start:stop], self.a0[start:stop], self.index, self.a0_source,
                     self.sides[start:stop])


def batches(inputs: Inputs, batch_size: int, device: str, skipped: list, done=frozenset(), world: World = World()):
    """Yield loaded batches of this rank's blocks of the inputs' files, less those in `done`.

    Blocks are fixed over all the files before anything is loaded or left out, so a batch holds
    the same images, with the same index, whatever the number of processes and whether the
    run was resumed. Unusable files go to `skipped` with the reason.
    """
    for index, start in enumerate(range(0, len(inputs.files), batch_size)):
        if not world.owns(index):
            continue
        batch = load_batch(inputs, [f for f in inputs.files[start:start + batch_size] if f.name not in done],
                           device, index, skipped)
        if batch is not None:
            yield batch


def load_batch(inputs: Inputs, files: list[Path], device: str, index: int, skipped: list) -> Batch | None:
    """`files` as one batch with their starting attributes (from the attributes file, else the
    backbone's estimate); unusable files go to `skipped` with the reason. None when none is usable."""
    size = inputs.backbone.img_size
    pending: list[tuple[Path, torch.Tensor, np.ndarray | None]] = []
    sides = []
    for file in files:
        try:
            photo = decode(file)
            image = image_tensor(photo, size)
        except ImageError as exc:
            skipped.append({"file": file.name, "reason": str(exc)})
            continue
        vector = inputs.attributes.vector(file) if inputs.attributes is not None else None
        if inputs.attributes is not None and vector is None:
            skipped.append({"file": file.name, "reason": f"not listed in {inputs.attributes.path.name}"})
            continue
        pending.append((file, image, vector))
        sides.append(min(photo.size))
    if not pending:
        return None
    x0 = torch.stack([image for _, image, _ in pending]).to(device)
    if inputs.attributes is not None:
        a0, source = torch.from_numpy(np.stack([vector for _, _, vector in pending])).to(device), "attrs_file"
    else:
        a0, source = inputs.backbone.predict_attributes(x0 * 2 - 1), "discriminator"
    return Batch([file for file, _, _ in pending], x0, a0.float(), index, source, tuple(sides))


@torch.no_grad()  # not inference_mode: the reference label takes part in the attack's graph
def reference_pass(inputs: Inputs, batch: Batch) -> dict:
    """Clean prediction and the reference label (the model's own prediction, or --labels)."""
    clean = inputs.target(batch.x0 * 2 - 1)
    reference = _labelled_reference(inputs, batch, clean) if inputs.labels is not None else \
        inputs.target.reference(clean)
    return {"clean": clean, "reference": reference}


@torch.no_grad()
def clean_pass(inputs: Inputs, batch: Batch) -> dict:
    """`reference_pass`, plus the backbone's reconstruction with the model's prediction on it and
    the critic margin: what an attack's records need to tell its effect from the backbone's."""
    target, backbone = inputs.target, inputs.backbone
    reconstruction = backbone(batch.x0 * 2 - 1, batch.a0)
    # Judged like an adversary (8-bit, full precision), so that "lost in reconstruction" and
    # "success" compare like with like.
    reconstruction_out = target(quantize(reconstruction))
    return {**reference_pass(inputs, batch), "reconstruction": reconstruction,
            "reconstruction_out": reconstruction_out,
            "critic": backbone.critic_scores(batch.x0 * 2 - 1, reconstruction)}


def _labelled_reference(inputs: Inputs, batch: Batch, clean: torch.Tensor) -> torch.Tensor:
    # load_inputs has checked that every image has a row.
    values = torch.stack([torch.as_tensor(inputs.labels[f.name]) for f in batch.files]).to(clean.device)
    # Keypoint coordinates become heatmaps of the model's own heatmap size (clean.shape[-2:]).
    return inputs.target.reference_from_labels(values)


def adversary_names(files: list[Path]) -> dict[str, str]:
    """Source file name -> PNG name: its stem, or its whole name where stems clash (a.jpg, a.png)
    so that no adversary silently overwrites another."""
    stems = Counter(file.stem for file in files)
    return {file.name: f"{file.stem}.png" if stems[file.stem] == 1 else f"{file.name}.png" for file in files}
