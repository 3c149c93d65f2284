"""The parts of AttGAN training (WGAN-GP) on any CelebA-layout folder: checks, batches, checkpoints
in the public layout, samples. The run itself is `sia_cli.jobs.train_gan`, on the one lifecycle."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from sia_cli.backbone.attgan import SETTING_FILE, checkpoint_number, read_checkpoint
from sia_cli.backbone.batches import Prefetched, draws_ahead, loader_batches, memory_batches, pair_batches
from sia_cli.backbone.counterfactuals import (
    SynthSource,
    check_labels,
    render_pairs,
    synth_source,
)
from sia_cli.backbone.trainer import TrainConfig, Trainer
from sia_cli.engine.attack import AMP_MODES
from sia_cli.errors import STOPPED_BY, SiaError
from sia_cli.inputs.faces import MARKER
from sia_cli.inputs.images import LabelledImages, image_problem, read_attributes
from sia_cli.progress import ProgressFn, silent
from sia_cli.runs.distributed import World, all_gather
from sia_cli.runs.files import write_bytes_atomic, write_text_atomic
from sia_cli.text import first_few


def counterfactual_source(config: TrainConfig) -> SynthSource | None:
    """Where the true counterfactuals come from, or None to train with AttGAN's losses alone."""
    if config.counterfactuals is False:
        return None
    source = synth_source(Path(config.images))
    if source is None and config.counterfactuals:
        raise SiaError(f"--counterfactuals needs a `sia synth` folder: {Path(config.images).parent} has no "
                       f"{MARKER} saying how its faces were drawn")
    return source


def prepare(config: TrainConfig, world: World = World()) -> tuple[LabelledImages, dict]:
    """Check the data before any training starts."""
    if not Path(config.images).is_dir():
        raise SiaError(f"image folder not found: {config.images}")
    if not config.attributes:
        raise SiaError("--attributes names no attribute")
    table = read_attributes(config.attrs_file).select(config.attributes)
    dataset = LabelledImages(config.images, table, config.img_size)
    if config.img_size % (2**config.enc_layers) or config.img_size % (2**config.dis_layers):
        raise SiaError(f"--img-size {config.img_size} must be divisible by 2**layers ({2**config.enc_layers})")
    if len(dataset) < config.batch_size * world.size:
        raise SiaError(f"{len(dataset)} images is fewer than one batch ({config.batch_size}) per process "
                       f"({world.size} processes)")
    source = counterfactual_source(config)
    if source is not None:
        check_labels(source, dataset.files, [table.rows[f.name] for f in dataset.files], config.attributes)
    return dataset, config.setting()


def save_checkpoint(trainer: Trainer, out: Path, step: int, setting: dict, keep: int) -> Path:
    folder = out / "checkpoint"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"weights.{step}.pth"
    buffer = io.BytesIO()  # torch.save's own file writer reports a full disk as a cryptic RuntimeError
    torch.save(trainer.state(step, setting), buffer)
    write_bytes_atomic(path, buffer.getbuffer())
    old = sorted(folder.glob("weights.*.pth"), key=checkpoint_number)[:-keep]
    for stale in old:
        stale.unlink()
    return path


def write_setting(out: Path, setting: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / SETTING_FILE, json.dumps(setting, indent=4))


@torch.no_grad()
def write_sample(trainer: Trainer, images: torch.Tensor, attrs: torch.Tensor, path: Path) -> None:
    """Grid: each row one image; columns original, reconstruction, then each attribute flipped."""
    trainer.generator.eval()
    columns = [images, trainer.generator(images, trainer.attribute_input(attrs))]
    for k in range(attrs.size(1)):
        flipped = attrs.clone()
        flipped[:, k] = 1 - flipped[:, k]
        columns.append(trainer.generator(images, trainer.attribute_input(flipped)))
    trainer.train_mode()
    grid = torch.stack(columns, dim=1).flatten(0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(grid, nrow=len(columns), normalize=True, value_range=(-1, 1)), path)


def check_config(config: TrainConfig) -> None:
    """The options, before any work: a zero or negative one would fail deep inside training."""
    at_least_one = {
        "--batch-size": config.batch_size, "--max-steps": config.max_steps, "--n-d": config.n_d,
        "--img-size": config.img_size, "--save-every": config.save_every, "--sample-every": config.sample_every,
        "--enc-dim": config.enc_dim, "--dec-dim": config.dec_dim, "--dis-dim": config.dis_dim,
        "--dis-fc-dim": config.dis_fc_dim, "--layers": min(config.enc_layers, config.dec_layers, config.dis_layers),
    }
    for flag, value in at_least_one.items():
        if value < 1:
            raise SiaError(f"{flag} must be at least 1 (got {value})")
    for flag, value in {"--shortcut-layers": config.shortcut_layers, "--inject-layers": config.inject_layers,
                        "--refine-layers": config.refine_layers, "--detail-layers": config.detail_layers,
                        "--change-focus": config.change_focus,
                        "--workers": config.workers, "--seed": config.seed}.items():
        if value < 0:
            raise SiaError(f"{flag} must be non-negative (got {value})")
    if config.detail_only and config.detail_layers < 1:
        raise SiaError("--detail-only trains the detail blocks alone: give --detail-layers 1 or more")
    if not math.isfinite(config.detail_gate) or config.detail_gate < 0:
        raise SiaError(f"--detail-gate must be a finite non-negative number (got {config.detail_gate:g})")
    if config.detail_gate > 0 and config.detail_layers < 1:
        raise SiaError("--detail-gate weighs the detail blocks' addition: give --detail-layers 1 or more")
    if not math.isfinite(config.lr) or config.lr <= 0:
        raise SiaError(f"--lr must be a finite positive number (got {config.lr:g})")
    if config.time_limit is not None and (not math.isfinite(config.time_limit) or config.time_limit < 0):
        raise SiaError(f"--time-limit must be a finite non-negative number of minutes (got {config.time_limit / 60:g})")
    if config.lr_schedule not in ("constant", "cosine"):
        raise SiaError(f"--lr-schedule {config.lr_schedule!r}: choose constant or cosine")
    for flag, value in {"--lambda-pair": config.lambda_pair, "--lambda-change": config.lambda_change,
                        "--change-threshold": config.change_threshold}.items():
        if not math.isfinite(value) or value < 0:
            raise SiaError(f"{flag} must be a finite non-negative number (got {value:g})")
    if config.amp not in AMP_MODES:
        raise SiaError(f"--amp {config.amp!r}: only bf16 is supported")
    if (config.amp and str(config.device).startswith("cuda") and torch.cuda.is_available()
            and not torch.cuda.is_bf16_supported()):
        raise SiaError("--amp bf16: this GPU has no bf16 support; train without --amp")
    if config.compile and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Compiled forwards and DDP's gradient hooks, beside the penalty's eager critic, are untested together.
        raise SiaError("--compile runs in one process only: under torchrun, train without it")


def check_images(dataset: LabelledImages, world: World, progress: ProgressFn = silent) -> None:
    """Decode every training image before the first step (each rank its share): a truncated
    file found by the loader at step 40,000 would end the run without naming the file."""
    files = dataset.files[world.rank::world.size]
    bad = []
    for done, file in enumerate(files, start=1):
        reason = image_problem(file)
        if reason is not None:
            bad.append((file.name, reason))
        if done % 200 == 0 or done == len(files):
            progress("check images", done * world.size, len(dataset))
    if bad:
        named = first_few((f"{name} ({reason})" for name, reason in bad), 1)
        raise SiaError(f"cannot train on {named}; remove it from {dataset.files[0].parent} "
                       f"and its row from {dataset.table.path}")


def draw_pairs(config: TrainConfig, dataset: LabelledImages, world: World,
               progress: ProgressFn = silent) -> torch.Tensor | None:
    """Every face's true counterfactuals when the folder is a `sia synth` set (else None).
    Every rank draws all of them: the ranks share one permutation of the faces."""
    source = counterfactual_source(config)
    if source is None:
        return None
    return render_pairs(source, dataset.files, list(dataset.table.names), config.img_size, config.workers,
                        progress if world.main else silent)


def make_batches(config: TrainConfig, dataset: LabelledImages, device: torch.device, world: World, start: int,
                 pairs: torch.Tensor | None = None):
    """The run's endless batches from step `start` on: with the renderer's counterfactuals
    (`draw_pairs`), from memory (--preload), or through a DataLoader."""
    if pairs is not None:
        return pair_batches(dataset, pairs, config.batch_size, device, world, config.seed + start)
    if config.preload:
        # On the training device already: drawing a batch is a few tensor operations.
        return memory_batches(dataset, config.batch_size, device, world, config.seed + start)
    batches = loader_batches(dataset, config.batch_size, config.workers, world, config.seed + start, device)
    return Prefetched(batches, device) if draws_ahead(device) else batches


def should_stop(config: TrainConfig, began: float, world: World, interrupted: bool) -> bool:
    """Whether --time-limit has passed or Ctrl-C came; ranks decide together, or one would wait
    on the others forever."""
    stop = interrupted or (config.time_limit is not None and time.perf_counter() - began > config.time_limit)
    return any(all_gather(stop, world)) if world.size > 1 else stop


class InterruptFlag:
    """Ctrl-C (or SIGTERM: CI cancellation, docker stop, Slurm) during training raises a flag
    instead of an exception, so the step in flight finishes and the last step is saved whole:
    an exception inside an optimiser step could leave weights and moments half updated. A
    second signal stops at once."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name))

    def __init__(self):
        self.raised, self.previous = False, {}

    def __enter__(self) -> "InterruptFlag":
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self.previous = {signum: signal.signal(signum, self._on_signal) for signum in self.SIGNALS}
        return self

    def _on_signal(self, signum, frame) -> None:
        if signum != signal.SIGINT:
            STOPPED_BY["signal"] = signum  # the exit code says SIGTERM (143)
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True

    def __exit__(self, *exc) -> None:
        for signum, previous in self.previous.items():
            if previous is not None:
                signal.signal(signum, previous)


def resume(trainer: Trainer, checkpoint: Path, setting: dict) -> int:
    """Load the run to continue; other attributes or another architecture is a user error, not a crash."""
    state = read_checkpoint(checkpoint)
    previous = state.get("sia", {}).get("setting", {}).get("attrs")
    if previous is not None and list(previous) != setting["attrs"]:
        raise SiaError(f"cannot resume from {checkpoint}: it was trained on attributes {','.join(previous)}")
    try:
        return trainer.load(state)
    except (RuntimeError, KeyError):
        raise SiaError(
            f"cannot resume from {checkpoint}: its weights do not fit these settings "
            f"(sizes and layers must match {checkpoint.parent.parent / SETTING_FILE})"
        ) from None


def config_dict(config: TrainConfig) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}


