"""AttGAN training (WGAN-GP) on any CelebA-layout folder, writing the public checkpoint layout."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torchvision.utils import make_grid, save_image

from sia_cli import __version__
from sia_cli.backbone.attgan import (
    SETTING_FILE,
    Discriminator,
    DiscriminatorConfig,
    Generator,
    GeneratorConfig,
    checkpoint_number,
    latest_checkpoint,
    read_checkpoint,
)
from sia_cli.backbone.batches import Prefetched, draw, draws_ahead, loader_batches, memory_batches, pair_batches
from sia_cli.backbone.counterfactuals import (
    SynthSource,
    change_loss,
    check_labels,
    render_pairs,
    synth_source,
)
from sia_cli.backbone.judging import write_card
from sia_cli.engine.attack import AMP_MODES, amp_context
from sia_cli.engine.speed import to_channels_last
from sia_cli.errors import INTERRUPTED, STOPPED_BY, SiaError
from sia_cli.inputs.faces import MARKER
from sia_cli.inputs.images import LabelledImages, image_problem, read_attributes
from sia_cli.progress import ProgressFn, silent
from sia_cli.runs.distributed import World, agree, all_gather, barrier, join
from sia_cli.runs.files import write_bytes_atomic, write_text_atomic
from sia_cli.runs.journal import locked

LOCK = ".sia.lock"


@dataclass(frozen=True)
class TrainConfig:
    images: Path
    attrs_file: Path
    attributes: list[str]
    out: Path
    img_size: int = 64
    batch_size: int = 32
    max_steps: int = 10000  # generator steps; each follows n_d critic steps
    enc_dim: int = 16
    dec_dim: int = 16
    enc_layers: int = 4
    dec_layers: int = 4
    dis_dim: int = 16
    dis_layers: int = 4
    dis_fc_dim: int = 64
    shortcut_layers: int = 1
    inject_layers: int = 1
    thres_int: float = 0.5
    lambda_1: float = 100.0  # reconstruction
    lambda_2: float = 10.0  # generator attribute classification
    lambda_3: float = 1.0  # critic attribute classification
    lambda_gp: float = 10.0
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    n_d: int = 5
    sample_every: int = 500
    save_every: int = 1000
    keep: int = 2
    resume: bool = False
    device: str = "cpu"  # under torchrun `cuda` means each rank's own GPU (see train_gan)
    seed: int = 0
    workers: int = 0
    preload: bool = False  # decode every image once into memory on the training device
    time_limit: float | None = None  # seconds; stop early with a checkpoint
    judge: Path | None = None  # attribute classifier (TorchScript, one logit per attribute) for the card
    card_images: int = 256  # training images the card's measurements use
    amp: str | None = None  # "bf16": autocast the forwards; the losses and the gradient penalty stay fp32
    compile: bool = False  # torch.compile the forwards (not the gradient penalty's: see Trainer)
    # NHWC weights. No faster on this project's CPU (bench/RESULTS.md); bench/train_bench.py
    # measures it on CUDA, where cuDNN's bf16 kernels want it.
    channels_last: bool = False
    # The renderer's true counterfactuals (sia_cli.backbone.counterfactuals): None uses them when --images
    # is a `sia synth` folder, which records how to draw its faces again.
    counterfactuals: bool | None = None
    lambda_pair: float = 100.0  # L1 between each edit and its true counterfactual
    lambda_change: float = 100.0  # the change's error over the truly changed pixels (change_loss)
    change_threshold: float = 0.02  # in [0, 1]: a pixel that moves less is unchanged
    lr_schedule: str = "constant"  # or "cosine": down to 5% of --lr at --max-steps

    def setting(self) -> dict:
        """The run's settings in the keys a public `setting.txt` uses."""
        return {
            "attrs": list(self.attributes),
            "n_attrs": len(self.attributes),
            "img_size": self.img_size,
            "shortcut_layers": self.shortcut_layers,
            "inject_layers": self.inject_layers,
            "enc_dim": self.enc_dim,
            "dec_dim": self.dec_dim,
            "dis_dim": self.dis_dim,
            "dis_fc_dim": self.dis_fc_dim,
            "enc_layers": self.enc_layers,
            "dec_layers": self.dec_layers,
            "dis_layers": self.dis_layers,
            "enc_norm": "batchnorm",
            "dec_norm": "batchnorm",
            "dis_norm": "instancenorm",
            "dis_fc_norm": "none",
            "enc_acti": "lrelu",
            "dec_acti": "relu",
            "dis_acti": "lrelu",
            "dis_fc_acti": "relu",
            "lambda_1": self.lambda_1,
            "lambda_2": self.lambda_2,
            "lambda_3": self.lambda_3,
            "lambda_gp": self.lambda_gp,
            "mode": "wgan",
            "batch_size": self.batch_size,
            "lr": self.lr,
            "betas": list(self.betas),
            "n_d": self.n_d,
            "thres_int": self.thres_int,
            "counterfactuals": self.counterfactuals,
            "lambda_pair": self.lambda_pair,
            "lambda_change": self.lambda_change,
            "change_threshold": self.change_threshold,
            "lr_schedule": self.lr_schedule,
            "data_path": str(self.images),
            "attr_path": str(self.attrs_file),
            "experiment_name": self.out.name,
            "sia_version": __version__,
        }


def gradient_penalty(critic: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    alpha = torch.rand(real.size(0), 1, 1, 1, device=real.device)
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    score = critic(mixed)[0]
    (grad,) = torch.autograd.grad(score.sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


class Edits(torch.nn.Module):
    """The generator step's forward as one call, so DistributedDataParallel can see it."""

    def __init__(self, generator: Generator):
        super().__init__()
        self.generator = generator

    def forward(self, real: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.generator.encode(real)
        return self.generator.decode(features, b), self.generator.decode(features, a)


class Trainer:
    """Holds the two networks and their optimisers; `critic_step` and `generator_step` run one update.

    Under torchrun the trained forwards go through DistributedDataParallel, which averages
    gradients across ranks; forwards that need no gradient use the plain modules, whose
    weights DDP keeps equal on every rank. `--compile` compiles the forwards, and `--amp bf16`
    runs them under autocast; the modules themselves stay as built, so checkpoints keep their
    keys and load anywhere.
    """

    def __init__(self, config: TrainConfig, setting: dict, world: World = World(), device: str | None = None):
        self.config = config
        device = torch.device(device or config.device)
        self.generator = Generator(GeneratorConfig.from_setting(setting)).to(device)
        self.critic = Discriminator(DiscriminatorConfig.from_setting(setting)).to(device)
        if config.channels_last:
            # Weights only: convolutions follow them, and Adam's moments take the layout of the
            # parameters they are made for. A checkpoint's tensors load into either layout.
            to_channels_last(self.generator, self.critic)
        self.optim_g = torch.optim.Adam(self.generator.parameters(), lr=config.lr, betas=config.betas)
        self.optim_d = torch.optim.Adam(self.critic.parameters(), lr=config.lr, betas=config.betas)
        self.device = device
        self.edits, self.scorer = Edits(self.generator), self.critic
        if world.size > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.edits = DistributedDataParallel(self.edits, device_ids=ids)
            self.scorer = DistributedDataParallel(self.critic, device_ids=ids)
        # The penalty differentiates the critic twice; a compiled graph can be differentiated
        # only once, so the penalty always scores with the eager critic.
        self.penalty_scorer = self.scorer
        self.faker, self.frozen_critic = self.generator, self.critic  # no gradient to their weights
        if config.compile:  # one process only (check_config): wrappers, so the modules keep their keys
            self.faker, self.edits, self.scorer, self.frozen_critic = (
                torch.compile(module) for module in (self.generator, self.edits, self.scorer, self.critic))

    def attribute_input(self, a: torch.Tensor) -> torch.Tensor:
        return (a * 2 - 1) * self.config.thres_int

    def autocast(self):
        return amp_context(self.device, self.config.amp)

    def set_step(self, step: int) -> None:
        """The learning rate of `step` (1-based): a function of the step alone, so a resumed run
        continues the schedule where it stopped."""
        c = self.config
        lr = c.lr
        if c.lr_schedule == "cosine":
            lr = c.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step - 1, c.max_steps) / c.max_steps)))
        for optimiser in (self.optim_g, self.optim_d):
            for group in optimiser.param_groups:
                group["lr"] = lr

    def critic_step(self, real: torch.Tensor, a: torch.Tensor, b: torch.Tensor, truth=None) -> dict:
        c = self.config
        with self.autocast():
            with torch.no_grad():
                fake = self.faker(real, self.attribute_input(b))
            real_score, real_cls = self.scorer(real)
            fake_score, _ = self.scorer(fake)
        # Losses in fp32 whatever the forwards ran in; the penalty also differentiates in fp32:
        # bf16's 8-bit mantissa would blur the gradient norm it holds at 1.
        wasserstein = real_score.float().mean() - fake_score.float().mean()
        penalty = gradient_penalty(self.penalty_scorer, real, fake.float())
        cls = F.binary_cross_entropy_with_logits(real_cls.float(), a)
        loss = -wasserstein + c.lambda_gp * penalty + c.lambda_3 * cls
        self.optim_d.zero_grad(set_to_none=True)
        loss.backward()
        self.optim_d.step()
        return {"d_wd": wasserstein.detach(), "d_gp": penalty.detach(), "d_cls": cls.detach()}

    def generator_step(self, real: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       truth: torch.Tensor | None = None) -> dict:
        """AttGAN's generator losses; given `truth`, each edit's true counterfactual (in [-1, 1]),
        also the pair and change losses of sia_cli.counterfactuals."""
        c = self.config
        for p in self.critic.parameters():
            p.requires_grad_(False)
        with self.autocast():
            fake, recon = self.edits(real, self.attribute_input(a), self.attribute_input(b))
            fake_score, fake_cls = self.frozen_critic(fake)
        adv = -fake_score.float().mean()
        cls = F.binary_cross_entropy_with_logits(fake_cls.float(), b)
        rec = F.l1_loss(recon.float(), real)
        loss = adv + c.lambda_2 * cls + c.lambda_1 * rec
        supervised = {}
        if truth is not None:
            pair = F.l1_loss(fake.float(), truth)
            change = change_loss(fake.float(), recon.float(), real, truth, c.change_threshold)
            loss = loss + c.lambda_pair * pair + c.lambda_change * change
            supervised = {"g_pair": pair.detach(), "g_change": change.detach()}
        self.optim_g.zero_grad(set_to_none=True)
        loss.backward()
        self.optim_g.step()
        for p in self.critic.parameters():
            p.requires_grad_(True)
        return {"g_adv": adv.detach(), "g_cls": cls.detach(), "g_rec": rec.detach(), **supervised}

    def state(self, step: int, setting: dict) -> dict:
        return {
            "G": self.generator.state_dict(),
            "D": self.critic.state_dict(),
            "optim_G": self.optim_g.state_dict(),
            "optim_D": self.optim_d.state_dict(),
            "sia": {"step": step, "setting": setting, "version": __version__},
        }

    def load(self, state: dict) -> int:
        self.generator.load_state_dict(state["G"])
        self.critic.load_state_dict(state["D"])
        if "optim_G" in state:
            self.optim_g.load_state_dict(state["optim_G"])
            self.optim_d.load_state_dict(state["optim_D"])
        return int(state.get("sia", {}).get("step", 0))












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
    """Check the data and the output folder before any training starts."""
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
    out = Path(config.out)
    source = counterfactual_source(config)
    if source is not None:
        check_labels(source, dataset.files, [table.rows[f.name] for f in dataset.files], config.attributes)
    existing = latest_checkpoint(out)
    if existing is not None and not config.resume:
        raise SiaError(f"{out} already holds checkpoint {existing.name}: pass --resume to continue or pick another --out")
    return dataset, config.setting()


def _save(trainer: Trainer, out: Path, step: int, setting: dict, keep: int) -> Path:
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


def _write_setting(out: Path, setting: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / SETTING_FILE, json.dumps(setting, indent=4))


@torch.no_grad()
def _sample(trainer: Trainer, images: torch.Tensor, attrs: torch.Tensor, path: Path) -> None:
    """Grid: each row one image; columns original, reconstruction, then each attribute flipped."""
    trainer.generator.eval()
    columns = [images, trainer.generator(images, trainer.attribute_input(attrs))]
    for k in range(attrs.size(1)):
        flipped = attrs.clone()
        flipped[:, k] = 1 - flipped[:, k]
        columns.append(trainer.generator(images, trainer.attribute_input(flipped)))
    trainer.generator.train()
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
                        "--workers": config.workers, "--seed": config.seed}.items():
        if value < 0:
            raise SiaError(f"{flag} must be non-negative (got {value})")
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
        name, reason = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise SiaError(f"cannot train on {name}: {reason}{more}; remove it from {dataset.files[0].parent} "
                       f"and its row from {dataset.table.path}")


def train_gan(config: TrainConfig, progress: ProgressFn = silent) -> dict:
    """Train to `config.max_steps`; under torchrun with DDP, --batch-size per process, rank 0 writing.

    Holds a lock on --out throughout: a second run into the folder of a running one is refused."""
    check_config(config)
    # This rank's device (`cuda` becomes `cuda:LOCAL_RANK`): the config is the run's, shared by all ranks.
    world, device = join(config.device)
    dataset, setting = agree(lambda: prepare(config, world), world)
    agree(lambda: _make_out(Path(config.out)), world)
    with locked(config.out, LOCK, "sia train-gan", world):
        agree(lambda: check_images(dataset, world, progress if world.main else silent), world)
        return _train(config, world, device, dataset, setting, progress)


def _make_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SiaError(f"cannot write to --out {out}: {exc.strerror or exc}") from None


def _train(config: TrainConfig, world: World, device: str, dataset: LabelledImages, setting: dict,
           progress: ProgressFn) -> dict:
    out = Path(config.out)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    trainer = Trainer(config, setting, world, device)
    start = 0
    if config.resume and latest_checkpoint(out) is not None:
        start = agree(lambda: _resume(trainer, latest_checkpoint(out), setting), world)
    if world.size > 1:
        # Ranks differ in their data (sampler) and in their random targets and penalties, like
        # more images per step; weights start equal (DDP broadcasts rank 0's on wrapping).
        torch.manual_seed(config.seed + start + 1000 * world.rank)
    if world.main:
        _write_setting(out, setting)
    source = counterfactual_source(config)
    if source is not None:
        # Every rank draws all of them: the ranks share one permutation of the faces.
        pairs = render_pairs(source, dataset.files, list(dataset.table.names), config.img_size,
                             config.workers, progress if world.main else silent)
        batches = pair_batches(dataset, pairs, config.batch_size, trainer.device, world, config.seed + start)
    elif config.preload:
        # On the training device already: drawing a batch is a few tensor operations.
        batches = memory_batches(dataset, config.batch_size, trainer.device, world, config.seed + start)
    else:
        batches = loader_batches(dataset, config.batch_size, config.workers, world, config.seed + start, trainer.device)
        if draws_ahead(trainer.device):
            batches = Prefetched(batches, trainer.device)
    fixed_images, fixed_attrs = next(iter(DataLoader(dataset, batch_size=min(8, len(dataset)))))
    fixed = (fixed_images.to(trainer.device) * 2 - 1, fixed_attrs.to(trainer.device))
    losses: dict = {}
    began = time.perf_counter()
    last = start
    with _InterruptFlag() as interrupt, contextlib.closing(batches):
        for step in range(start + 1, config.max_steps + 1):
            if _should_stop(config, began, world, interrupt.raised):
                break
            trainer.set_step(step)
            for _ in range(config.n_d):
                losses.update(trainer.critic_step(*draw(batches, trainer.device)))
            losses.update(trainer.generator_step(*draw(batches, trainer.device)))
            last = step
            if step % 50 == 0 or step == config.max_steps:
                progress("train-gan", step, config.max_steps, {k: float(v) for k, v in losses.items()})
            if world.main and (step % config.sample_every == 0 or step == config.max_steps):
                _sample(trainer, *fixed, out / "sample_training" / f"step_{step:07d}.png")
            if world.main and (step % config.save_every == 0 or step == config.max_steps):
                _save(trainer, out, step, setting, config.keep)
    if world.main and last != config.max_steps and last > start:
        _sample(trainer, *fixed, out / "sample_training" / f"step_{last:07d}.png")
        _save(trainer, out, last, setting, config.keep)
    barrier(world)  # the last checkpoint is on disk before any rank reports it
    final = latest_checkpoint(out)
    card = None
    if world.main and final is not None and not interrupt.raised and last == config.max_steps and last > start:
        card = write_card(Path(config.out), final, setting, dataset, trainer.device, config.judge, config.card_images)
    if interrupt.raised:
        error = SiaError(f"interrupted after step {last}: {final or 'no checkpoint yet'} holds it; "
                         "rerun with --resume to continue", INTERRUPTED)
        error.shared = world.size > 1  # every rank stops alike: rank 0 alone need say it
        raise error
    return {
        "steps": last,
        "resumed_from": start,
        "checkpoint": str(final) if final else None,
        "seconds": time.perf_counter() - began,
        "losses": {k: float(v) for k, v in losses.items()},
        "images": len(dataset),
        "processes": world.size,
        "device": str(trainer.device),
        "card": card,
    }


def _should_stop(config: TrainConfig, began: float, world: World, interrupted: bool) -> bool:
    """Whether --time-limit has passed or Ctrl-C came; ranks decide together, or one would wait
    on the others forever."""
    stop = interrupted or (config.time_limit is not None and time.perf_counter() - began > config.time_limit)
    return any(all_gather(stop, world)) if world.size > 1 else stop


class _InterruptFlag:
    """Ctrl-C (or SIGTERM: CI cancellation, docker stop, Slurm) during training raises a flag
    instead of an exception, so the step in flight finishes and the last step is saved whole:
    an exception inside an optimiser step could leave weights and moments half updated. A
    second signal stops at once."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name))

    def __init__(self):
        self.raised, self.previous = False, {}

    def __enter__(self) -> "_InterruptFlag":
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


def _resume(trainer: Trainer, checkpoint: Path, setting: dict) -> int:
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










