"""The AttGAN training step: the two networks, their optimisers, and one critic and one generator
update (WGAN-GP, attribute classification, reconstruction, and with the renderer's true
counterfactuals the pair and change losses)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from sia_cli import __version__
from sia_cli.backbone.attgan import (
    Discriminator,
    DiscriminatorConfig,
    Generator,
    GeneratorConfig,
)
from sia_cli.backbone.counterfactuals import ChangeFocus, change_errors
from sia_cli.engine.attack import amp_context
from sia_cli.engine.speed import to_channels_last
from sia_cli.runs.distributed import World


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
    refine_layers: int = 0  # residual blocks before the image layer (attgan.Refine; not public AttGAN's)
    detail_layers: int = 0  # blocks at the image's resolution that read the input image (attgan.Detail; ours)
    # Train the detail blocks alone (and the critic): every other generator weight and batch
    # statistic stays as loaded, so a detail stage sharpens the images and leaves the edits.
    detail_only: bool = False
    # In [0, 1] units: where the decoder's image departs this far from the input the detail
    # blocks' addition fades (attgan.Detail), so they sharpen and do not undo edits. 0: no gate.
    detail_gate: float = 0.0
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
    force: bool = False  # --out holds a finished run or other settings: start over
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
    # Each attribute's change loss weighed by (its running mean / the mean over attributes) ** focus:
    # the edits the generator does worst, by its own training loss, get more of the gradient. 0: alike.
    change_focus: float = 0.0
    lr_schedule: str = "constant"  # or "cosine": down to 5% of --lr at --max-steps

    def setting(self) -> dict:
        """The run's settings in the keys a public `setting.txt` uses."""
        return {
            "attrs": list(self.attributes),
            "n_attrs": len(self.attributes),
            "img_size": self.img_size,
            "shortcut_layers": self.shortcut_layers,
            "inject_layers": self.inject_layers,
            "refine_layers": self.refine_layers,
            "detail_layers": self.detail_layers,
            "detail_only": self.detail_only,
            "detail_gate": self.detail_gate,
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
            "change_focus": self.change_focus,
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
        return self.generator.decode(features, b, real), self.generator.decode(features, a, real)


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
        trained = self.generator.detail if config.detail_only else self.generator
        # Frozen weights get no gradient at all: the backward pass stops at the detail blocks.
        self.generator.requires_grad_(False)
        trained.requires_grad_(True)
        self.optim_g = torch.optim.Adam(trained.parameters(), lr=config.lr, betas=config.betas)
        self.train_mode()
        self.optim_d = torch.optim.Adam(self.critic.parameters(), lr=config.lr, betas=config.betas)
        self.device = device
        self.edits, self.scorer = Edits(self.generator), self.critic
        self.focus = ChangeFocus(len(config.attributes), config.change_focus)
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

    def train_mode(self) -> None:
        """The generator in training mode, but with --detail-only its frozen part in eval mode:
        batch norm in training mode would move the running statistics the frozen part draws with."""
        self.generator.train(not self.config.detail_only)
        self.generator.detail.train()

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

    def critic_step(self, real: torch.Tensor, a: torch.Tensor, b: torch.Tensor, truth=None, edited=None) -> dict:
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
                       truth: torch.Tensor | None = None, edited: torch.Tensor | None = None) -> dict:
        """AttGAN's generator losses; given `truth`, each edit's true counterfactual (in [-1, 1]),
        and `edited`, the attribute each row edits, also the pair and change losses of
        sia_cli.backbone.counterfactuals."""
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
            errors, shown = change_errors(fake.float(), recon.float(), real, truth, c.change_threshold)
            change = self.focus(errors, shown, edited)
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


