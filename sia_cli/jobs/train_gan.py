"""`sia train-gan` as a lifecycle plan (sia_cli.runs.lifecycle): the lock on --out, --force,
Ctrl-C and SIGTERM, resuming and atomic writes are the ones every long command has.

Units are blocks of --save-every generator steps, each ending with a checkpoint, so the journal
never records a step the saved weights do not hold; every rank works every unit (DDP averages
the gradients). A signal finishes the step in flight and saves it: an exception inside an
optimiser step could leave weights and moments half updated. A rerun continues from the latest
checkpoint (after a raised --max-steps too); a finished run is refused without --force.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from sia_cli.backbone import training
from sia_cli.backbone.attgan import CARD_FILE, SETTING_FILE, checkpoint_number, latest_checkpoint
from sia_cli.backbone.batches import draw
from sia_cli.backbone.judging import write_card
from sia_cli.backbone.trainer import TrainConfig, Trainer
from sia_cli.errors import SiaError
from sia_cli.progress import ProgressFn, silent
from sia_cli.runs.distributed import agree, barrier, join
from sia_cli.runs.lifecycle import Context, Plan, execute

# What may change between an interrupted run and its continuation: where it runs and how long.
NOT_SETTINGS = ("sia_version", "experiment_name", "max_steps")


class TrainPlan(Plan):
    what = "sia train-gan"
    task = "train-gan"
    shared_units = True

    def __init__(self, config: TrainConfig):
        self.config = config
        self.setting: dict = {}
        self.dataset = None
        self.pairs: torch.Tensor | None = None
        self.trainer: Trainer | None = None
        self.batches = None
        self.fixed: tuple | None = None
        self.resumed_from = 0
        self.losses: dict = {}
        self.began = 0.0
        self.stopped = False  # --time-limit reached
        self.interrupted = False  # Ctrl-C or SIGTERM: the step in flight was finished and saved

    def check_out(self, out: Path, force: bool) -> None:
        """The options and the data, before --out is made: a bad attribute name or a missing image
        leaves nothing behind."""
        self.dataset, self.setting = training.prepare(self.config, join(self.config.device)[0])
        last = self.finished(out)
        if last is not None and not force:
            raise SiaError(f"{out} holds a finished run ({last.relative_to(out)}); raise --max-steps to train on, "
                           "pass --force to start over, or pick another --out")

    def finished(self, out: Path) -> Path | None:
        last = latest_checkpoint(out)
        return last if last is not None and checkpoint_number(last) >= self.config.max_steps else None

    def load(self, config: TrainConfig, device: str, progress: ProgressFn):
        return self.dataset  # checked by check_out

    def batch_size(self, config: TrainConfig, dataset, device: str, world) -> int:
        return config.batch_size  # per process, as given: no model to tune for

    def begin(self, context: Context):
        world = context.world
        agree(lambda: training.check_images(context.inputs, world, context.progress), world)
        self.pairs = training.draw_pairs(self.config, context.inputs, world, context.progress)
        return None

    def clear(self, out: Path) -> None:
        """--force: what an earlier training wrote into `out`, nothing else."""
        for name in ("checkpoint", "sample_training"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (SETTING_FILE, CARD_FILE):
            (out / name).unlink(missing_ok=True)

    def fingerprint(self, context: Context) -> dict:
        return {**{k: v for k, v in self.setting.items() if k not in NOT_SETTINGS}, "seed": self.config.seed,
                "data_path": str(Path(self.config.images).resolve()),
                "attr_path": str(Path(self.config.attrs_file).resolve())}

    def total(self, context: Context) -> int:
        return self.config.max_steps

    def progress_of(self, context: Context, entries: dict[str, dict]) -> int:
        last = latest_checkpoint(context.out)  # steps a warm start or an earlier run hold count too
        return checkpoint_number(last) if last is not None else 0

    def units(self, context: Context, done: dict[str, dict]):
        config, world, out = self.config, context.world, context.out
        random.seed(config.seed)
        np.random.seed(config.seed)
        self.trainer = Trainer(config, self.setting, world, context.device)
        last = latest_checkpoint(out)
        if last is not None:  # the weights are the state; the journal only says which steps they hold
            self.resumed_from = agree(lambda: training.resume(self.trainer, last, self.setting), world)
        if world.size > 1:
            # Ranks differ in their data (sampler) and in their random targets and penalties, like
            # more images per step; weights start equal (DDP broadcasts rank 0's on wrapping).
            torch.manual_seed(config.seed + self.resumed_from + 1000 * world.rank)
        if world.main:
            training.write_setting(out, self.setting)
        self.batches = training.make_batches(config, context.inputs, self.trainer.device, world, self.resumed_from,
                                             self.pairs)
        images, attrs = next(iter(DataLoader(context.inputs, batch_size=min(8, len(context.inputs)))))
        self.fixed = (images.to(self.trainer.device) * 2 - 1, attrs.to(self.trainer.device))
        self.began = time.perf_counter()  # --time-limit counts training, not the drawing before it
        with contextlib.closing(self.batches):
            step = self.resumed_from
            while step < config.max_steps and not self.stopped:
                if self.interrupted:
                    raise KeyboardInterrupt
                end = min((step // config.save_every + 1) * config.save_every, config.max_steps)
                yield range(step + 1, end + 1)
                step = end
            if self.interrupted:
                raise KeyboardInterrupt

    def work(self, context: Context, steps: range) -> list[dict]:
        config, trainer, world, out = self.config, self.trainer, context.world, context.out
        entries, last = [], steps.start - 1
        with training.InterruptFlag() as interrupt:
            for step in steps:
                if training.should_stop(config, self.began, world, interrupt.raised):
                    self.stopped, self.interrupted = True, interrupt.raised
                    break
                trainer.set_step(step)
                for _ in range(config.n_d):
                    self.losses.update(trainer.critic_step(*draw(self.batches, trainer.device)))
                self.losses.update(trainer.generator_step(*draw(self.batches, trainer.device)))
                last = step
                entries.append({"file": f"step {step:07d}"})
                if step % 50 == 0 or step == config.max_steps:
                    context.progress(self.task, step, config.max_steps, self.shown_losses())
                if world.main and step % config.sample_every == 0:
                    training.write_sample(trainer, *self.fixed, out / "sample_training" / f"step_{step:07d}.png")
        if world.main and last >= steps.start:
            if last % config.sample_every:
                training.write_sample(trainer, *self.fixed, out / "sample_training" / f"step_{last:07d}.png")
            training.save_checkpoint(trainer, out, last, self.setting, config.keep)
        barrier(world)  # the checkpoint is on disk before any rank journals its steps
        return entries

    def shown_losses(self) -> dict:
        return {k: float(v) for k, v in self.losses.items()}

    def write(self, context: Context, entries: dict[str, dict], complete: bool):
        config, out = self.config, context.out
        final = latest_checkpoint(out)
        if not complete:
            return final
        steps = checkpoint_number(final) if final is not None else 0
        card = None
        if final is not None and steps == config.max_steps and steps > self.resumed_from:
            card = write_card(out, final, self.setting, context.inputs, self.trainer.device, config.judge,
                              config.card_images)
        return {
            "steps": steps,
            "resumed_from": self.resumed_from,
            "checkpoint": str(final) if final else None,
            "seconds": time.perf_counter() - self.began,
            "losses": self.shown_losses(),
            "images": len(context.inputs),
            "processes": context.world.size,
            "device": str(self.trainer.device),
            "card": card,
        }

    def kept(self, context: Context, result) -> str:
        return f"{result} holds step {checkpoint_number(result)}"


def train_gan(config: TrainConfig, progress: ProgressFn = silent) -> dict | None:
    """Train to `config.max_steps`; under torchrun with DDP, --batch-size per process, rank 0
    writing and returning the summary (None on the other ranks)."""
    training.check_config(config)  # before joining torchrun's group: --compile is refused there
    return execute(config, TrainPlan(config), progress)
