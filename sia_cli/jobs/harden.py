"""`sia harden`: fine-tune a target so that semantic edits stop moving it, and measure it before
and after on held-out images.

Each step attacks the batch with the model's *current* weights (iterative adversarial
training, SIA paper 4.4; any engine method) and takes one optimiser step on a mix of the clean
images and their adversaries, both labelled with the reference label: `--labels`, or the
model's own prediction on the clean image made once, before training, with the original
weights (counterfactual training, thesis 3.3.5: the attack searches for edits that move the
prediction while the label stays, and the model learns not to move). `--adversaries DIR`
trains on a fixed set of adversaries instead (the paper's offline variant, e.g. from
`sia augment`).

Training keeps the model in eval mode: batch-norm statistics and dropout stay as the file
has them. An exported program cannot switch mode at all, and frozen statistics make a
torchrun run the same model as one process (each rank sees a slice of every batch; the
gradients are summed across ranks) and keep adversaries out of the population statistics.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from sia_cli import __version__
from sia_cli.engine.art import ArtSettings, art_terms, training_point
from sia_cli.engine.attack import Method, attack_batch, get_method, quantize
from sia_cli.engine.attribution import ExplanationSettings
from sia_cli.errors import SiaError
from sia_cli.inputs.images import load_image
from sia_cli.jobs.harden_eval import _read_json, _summary, evaluate
from sia_cli.progress import ProgressFn, silent
from sia_cli.runs.distributed import World, all_gather, barrier
from sia_cli.runs.files import write_bytes_atomic, write_json_atomic
from sia_cli.runs.inputs import Batch, Inputs, RunConfig, batches, load_batch, load_inputs, reference_pass
from sia_cli.runs.journal import refuse_changed
from sia_cli.runs.lifecycle import Context, Plan, execute, run_fingerprint
from sia_cli.targets.export import export_model

SUMMARY = "hardening.json"
PAGE = "hardening.html"
TRAINING = "training.json"
CHECKPOINTS = "checkpoint"
# Settings of the before/after report, not of the training: changing them must not refuse a resume.
EVALUATION_ONLY = ("eval_images", "eval_labels", "eval_attrs_file", "eval_steps", "explanation")


@dataclass(frozen=True)
class HardenConfig(RunConfig):
    epochs: int = 3
    lr: float = 1e-4
    mix: float = 0.5  # weight of the clean images' loss in each step; the adversaries' is 1 - mix
    adversaries: Path | None = None  # offline: a `sia augment` set (images/, labels.csv) to train on
    eval_images: Path | None = None  # held-out images of the before/after report
    eval_labels: Path | None = None
    eval_attrs_file: Path | None = None
    eval_steps: int | None = None  # attack steps of the evaluation (default: --steps)
    save_every: int | None = None  # optimiser steps per checkpoint (default: one epoch)
    art: ArtSettings = field(default_factory=ArtSettings)  # --method art / METHOD+art (sia_cli.engine.art)
    explanation: ExplanationSettings = field(default_factory=ExplanationSettings)  # the evaluation's, with art


ART = "art"


def training_methods(name: str) -> tuple[Method | None, bool]:
    """--method as (the attack whose adversaries enter the task loss, whether ART's triplet term
    is added): `art` (ART alone: the task loss at ART's own training point), `sia+art` (SIA-Adv with
    the triplet term), or any engine method alone."""
    if name == ART:
        return None, True
    if name.endswith("+" + ART):
        return get_method(name[:-len(ART) - 1]), True
    return get_method(name), False


def check_config(config: HardenConfig) -> None:
    """The options, before any work."""
    if len(config.methods) != 1:
        raise SiaError(f"--method takes one method for hardening (got {','.join(config.methods)})")
    _, with_art = training_methods(config.methods[0])
    if with_art and config.adversaries is not None:
        raise SiaError("--method art trains at points it picks from the current weights: it takes no --adversaries")
    if with_art and config.art.art_steps < 0:  # weight, radius and step are checked as they are parsed
        raise SiaError(f"--art-steps must be 0 or more (got {config.art.art_steps})")
    if config.epochs < 1:
        raise SiaError(f"--epochs must be at least 1 (got {config.epochs})")
    if not math.isfinite(config.lr) or config.lr <= 0:
        raise SiaError(f"--lr must be a finite positive number (got {config.lr:g})")
    if not math.isfinite(config.mix) or not 0 <= config.mix <= 1:
        raise SiaError(f"--mix must be within [0, 1] (got {config.mix:g})")
    if config.save_every is not None and config.save_every < 1:
        raise SiaError(f"--save-every must be at least 1 (got {config.save_every})")
    if config.eval_steps is not None and config.eval_steps < 1:
        raise SiaError(f"--eval-steps must be at least 1 (got {config.eval_steps})")
    if config.eval_images is not None:
        if not Path(config.eval_images).is_dir():
            raise SiaError(f"--eval-images {config.eval_images}: no such folder")
        if Path(config.eval_images).resolve() == Path(config.images).resolve():
            raise SiaError("--eval-images is the training folder: the before/after report must use held-out images")
    if config.adversaries is not None and not (Path(config.adversaries) / "labels.csv").is_file():
        raise SiaError(f"--adversaries {config.adversaries} holds no labels.csv: give the --out of `sia augment`")
    if Path(config.out).resolve() == Path(config.model).resolve().parent and \
            Path(config.model).name in ("model.pt", "model.pt2"):
        raise SiaError("--out holds the input model's file name: pick another --out (the input is never overwritten)")


def harden(config: HardenConfig, progress: ProgressFn = silent) -> dict | None:
    """Fine-tune, then evaluate the model before and after; write hardening.json and
    hardening.html into --out. Returns the summary on rank 0 (None on other torchrun ranks)."""
    check_config(config)
    return execute(config, HardenPlan(config), progress)


def _complete(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("complete") is True
    except (OSError, ValueError, AttributeError):
        return True  # unreadable: never overwrite it without --force


# ---------------------------------------------------------------- training


@dataclass(frozen=True)
class Step:
    number: int  # 1-based over the whole run
    epoch: int
    files: tuple[str, ...]  # the global batch, in order; each rank takes its slice

    @property
    def key(self) -> str:
        return f"step-{self.number:07d}"


class HardenPlan(Plan):
    """The fine-tuning as a lifecycle plan: units are blocks of optimiser steps, each ending with
    a checkpoint, so the journal never records a step the saved weights do not hold. Every
    rank works every unit (on its slice of each batch)."""

    what = "sia harden"
    task = "harden"
    shared_units = True

    def __init__(self, config: HardenConfig):
        self.config = config
        self.method, self.with_art = training_methods(config.methods[0])
        self.labels: dict[str, torch.Tensor] = {}  # file name -> reference label made before training
        self.steps: list[Step] = []
        self.offline: list[tuple[Path, int]] = []  # (adversary image, label) of --adversaries
        self.optimizer: torch.optim.Optimizer | None = None
        self.settings: dict = {}
        self.resumed_from = 0

    def load(self, config: HardenConfig, device: str, progress: ProgressFn) -> Inputs:
        inputs = load_inputs(config, device, progress)
        if self.with_art:  # a model without class scores refuses before any step (one line)
            inputs.target.check_class_scores(inputs.backbone.img_size, device)
        trainable = [p for p in inputs.target.model.parameters() if p.is_floating_point()]
        if not trainable:
            raise SiaError(f"{config.model} has no trainable parameters (its weights are constants of the graph): "
                           "it cannot be fine-tuned; export it with its weights as parameters")
        if config.adversaries is not None:
            self.offline = read_adversaries(Path(config.adversaries), inputs)
        return inputs

    def begin(self, context: Context):
        config, out = self.config, context.out
        self.settings = {k: v for k, v in run_fingerprint(config, context.inputs).items() if k not in EVALUATION_ONLY}
        previous = _read_json(out / TRAINING)
        if previous is not None and previous.get("complete") and not config.force:
            refuse_changed(out, previous.get("settings", {}), self.settings)
            if previous.get("unusable"):
                raise SiaError(_unusable_message(previous) + "; pass --force to train again")
            if Path(previous.get("model", "")).is_file():
                return {"model": previous["model"], "steps": previous["steps"], "losses": previous["losses"],
                        "already_trained": True}
        self.labels = reference_labels(context)
        files = sorted(self.labels)
        if not files:
            raise SiaError(f"no usable image in {config.images}")
        self.steps = schedule(files, context.batch_size, config.epochs, config.seed)
        self.optimizer = torch.optim.Adam(trainable(context.inputs.target), lr=config.lr)
        return None

    def check_out(self, out: Path, force: bool) -> None:
        summary = out / SUMMARY
        if summary.exists() and _complete(summary) and not force:
            raise SiaError(f"{out} holds a finished hardening ({SUMMARY}); pass --force to redo it or pick another --out")

    def clear(self, out: Path) -> None:
        """--force: what an earlier hardening wrote into `out`, nothing else."""
        for name in ("before", "after", CHECKPOINTS):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (SUMMARY, PAGE, TRAINING, "model.pt", "model.pt2"):
            (out / name).unlink(missing_ok=True)

    def fingerprint(self, context: Context) -> dict:
        return self.settings

    def total(self, context: Context) -> int:
        return len(self.steps)

    def units(self, context: Context, done: dict[str, dict]):
        per_unit = self.config.save_every or math.ceil(len(self.steps) / self.config.epochs)
        blocks = [self.steps[i:i + per_unit] for i in range(0, len(self.steps), per_unit)]
        finished = 0
        for block in blocks:
            if all(step.key in done for step in block):
                finished = block[-1].number
            else:
                break
        if finished:
            load_checkpoint(context.out, finished, context.inputs.target, self.optimizer)
            self.resumed_from = finished
        for block in blocks:
            if block[-1].number > finished:
                yield block

    def work(self, context: Context, block: list[Step]) -> list[dict]:
        entries = [{"file": step.key, "epoch": step.epoch, **self.train_step(context, step)} for step in block]
        if context.world.main:
            save_checkpoint(context.out, block[-1].number, context.inputs.target, self.optimizer)
        barrier(context.world)  # the checkpoint is on disk before any rank journals the block
        return entries

    def train_step(self, context: Context, step: Step) -> dict:
        """One optimiser step on this rank's slice of the batch; gradients summed over ranks."""
        config, inputs, world = self.config, context.inputs, context.world
        target = inputs.target
        mine = step.files[world.rank::world.size]  # empty on some ranks when the last batch is short
        parameters = trainable(target)
        self.optimizer.zero_grad(set_to_none=True)
        losses = torch.zeros(3, device=context.device)
        if mine:
            clean = training_batch(inputs, mine, context.device, step.number)
            reference = torch.stack([self.labels[name] for name in mine]).to(context.device)
            adversaries = point = None
            if self.offline:
                adversaries, adversary_reference = offline_batch(self.offline, step, len(step.files), world,
                                                                 inputs.backbone.img_size, target, context.device)
            elif self.method is not None:
                state = attack_batch(inputs.backbone, target, self.method, clean.x0, clean.a0, reference,
                                     config.settings, inputs.protected, seed=config.seed + step.number)
                adversaries, adversary_reference = quantize(state.adversary).detach(), reference
            if self.with_art:
                noise = torch.Generator().manual_seed(config.seed * 1_000_003 + step.number)
                point = training_point(target, clean.x0 * 2 - 1, reference, config.art, noise)
            for parameter in parameters:
                parameter.requires_grad_(True)
            try:
                total = len(step.files)  # the global batch: the sum over ranks is the one-process mean
                clean_loss = target.loss(target(clean.x0 * 2 - 1), reference).float().sum() / total
                triplet_loss = torch.zeros((), device=context.device)
                if point is not None:
                    terms = art_terms(target, clean.x0 * 2 - 1, point, reference)
                    triplet_loss = terms["triplet"].sum() / total
                if adversaries is not None:
                    adversary_loss = target.loss(target(adversaries), adversary_reference).float().sum() / total
                else:  # ART alone: its own training point is the adversary
                    adversary_loss = terms["point_loss"].sum() / total
                (config.mix * clean_loss + (1 - config.mix) * adversary_loss
                 + config.art.art_weight * triplet_loss).backward()
            finally:
                for parameter in parameters:
                    parameter.requires_grad_(False)  # the attack needs input gradients only
            losses = torch.stack([clean_loss.detach(), adversary_loss.detach(), triplet_loss.detach()])
        if world.size > 1:
            for parameter in parameters:  # every rank reduces every parameter, used or not, in one order
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
                dist.all_reduce(parameter.grad)
        self.optimizer.step()
        if world.size > 1:
            dist.all_reduce(losses)
        entry = {"clean_loss": round(float(losses[0]), 6), "adversary_loss": round(float(losses[1]), 6)}
        if self.with_art:
            entry["triplet_loss"] = round(float(losses[2]), 6)
        return entry

    def write(self, context: Context, entries: dict[str, dict], complete: bool):
        out = context.out
        done = sorted(entries)
        losses = entries[done[-1]] if done else {}
        record = {"version": __version__, "settings": self.settings, "complete": complete, "steps": len(done),
                  "of": len(self.steps), "resumed_from": self.resumed_from,
                  "losses": {k: losses.get(k) for k in ("clean_loss", "adversary_loss", "triplet_loss") if k in losses},
                  "labels": "--labels" if self.config.labels else "the model's own predictions before hardening",
                  "mode": "offline (--adversaries)" if self.offline else _mode(self.method, self.with_art)}
        if complete:
            record["model"] = str(export_model(context.inputs.target, Path(self.config.model), out))
            problem = unusable(context.inputs.target)
            if problem:
                record["unusable"] = problem  # `harden` stops on it, on every rank
        write_json_atomic(out / TRAINING, record)
        return record

    def finish(self, context: Context, result):
        """The before/after evaluation on --eval-images (collective: every rank attacks its share)
        and the summary. The input model's file is never changed, so evaluating it after the
        training gives what evaluating it first would; both reports resume like any run."""
        config, out, world = self.config, context.out, context.world
        trained = all_gather(result, world)[0]  # rank 0's, on every rank
        if trained.get("unusable"):
            raise SiaError(_unusable_message(trained))  # on every rank at once: none waits for the others
        before = after = None
        if config.eval_images:
            before = evaluate(config, Path(config.model), out / "before", world, context.progress, self.with_art)
            after = evaluate(config, Path(trained["model"]), out / "after", world, context.progress, self.with_art)
        summary = None
        if world.main:
            summary = _summary(config, trained, before, after)
            write_json_atomic(out / SUMMARY, summary)
            from sia_cli.reports.html import hardening_html  # matplotlib and the page only where written

            hardening_html(out / PAGE, summary, out)
        barrier(world)
        return summary


def _mode(method: Method | None, with_art: bool) -> str:
    if method is None:
        return "ART: the triplet term and the task loss at ART's own training points of the current weights"
    return f"adversaries of the current weights ({method.name})" + (", with ART's triplet term" if with_art else "")


def unusable(target) -> str | None:
    """Why the trained model fails the checks every model passes on loading (a model whose output
    no longer depends on its input, NaN outputs: training diverged), or None."""
    from sia_cli.targets.probe import probe

    try:
        probe(target, target.probe_size, target.output_key)
    except SiaError as exc:
        return str(exc)
    return None


def _unusable_message(record: dict) -> str:
    return (f"the hardened model fails the model checks ({record['unusable']}): the training diverged; it is kept as "
            f"{record.get('model')} but no report was made; try a lower --lr or fewer --epochs")


def trainable(target) -> list[torch.nn.Parameter]:
    return [p for p in target.model.parameters() if p.is_floating_point()]


def reference_labels(context: Context) -> dict[str, torch.Tensor]:
    """Every training image's reference label, with the weights the run started from: --labels,
    or the model's own prediction on the clean image (counterfactual training)."""
    found: dict[str, torch.Tensor] = {}
    skipped: list[dict] = []
    for batch in batches(context.inputs, context.batch_size, context.device, skipped, world=context.world):
        reference = reference_pass(context.inputs, batch)["reference"].cpu()
        found.update(zip((file.name for file in batch.files), reference))
    merged: dict[str, torch.Tensor] = {}
    for part in all_gather(found, context.world):
        merged.update(part)
    return merged


def schedule(files: list[str], batch_size: int, epochs: int, seed: int) -> list[Step]:
    """Every step of the run: per epoch a seeded permutation in batches (the last may be short),
    the same whatever the number of processes and wherever a run resumes."""
    steps = []
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(files))
        for start in range(0, len(files), batch_size):
            steps.append(Step(len(steps) + 1, epoch, tuple(files[i] for i in order[start:start + batch_size])))
    return steps


def training_batch(inputs: Inputs, names: tuple[str, ...], device: str, index: int) -> Batch:
    """The named training images as a batch; an image that became unusable since the run began
    stops it (its label was made when it was usable)."""
    by_name = {file.name: file for file in inputs.files}
    skipped: list[dict] = []
    batch = load_batch(inputs, [by_name[name] for name in names], device, index, skipped)
    if skipped:
        raise SiaError(f"a training image became unusable during the run: {skipped[0]['file']}: "
                       f"{skipped[0]['reason']}")
    return batch


def read_adversaries(folder: Path, inputs: Inputs) -> list[tuple[Path, int]]:
    """`sia augment`'s set: each adversary with its label (the source's, as labels.csv says)."""
    rows = []
    with open(folder / "labels.csv", newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            path = folder / "images" / row.get("file", "")
            if not path.is_file():
                raise SiaError(f"--adversaries {folder}: labels.csv names {row.get('file')!r}, which is not in images/")
            try:
                rows.append((path, int(row["label"])))
            except (KeyError, TypeError, ValueError):
                raise SiaError(f"--adversaries {folder}: labels.csv row {row} has no whole-number label") from None
    if not rows:
        raise SiaError(f"--adversaries {folder}: labels.csv lists no image")
    if not inputs.target.task.writes_class_labels:
        raise SiaError(f"--adversaries holds class labels; this model is {inputs.target.kind}")
    return rows


def offline_batch(adversaries: list[tuple[Path, int]], step: Step, size: int, world: World, img_size: int,
                  target, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of a batch of the fixed adversaries, cycling through them in step order."""
    picks = [adversaries[((step.number - 1) * size + i) % len(adversaries)] for i in range(size)][world.rank::world.size]
    images = torch.stack([load_image(path, img_size) for path, _ in picks]).to(device) * 2 - 1
    labels = target.reference_from_labels(torch.tensor([label for _, label in picks])).to(device)
    return images, labels


def save_checkpoint(out: Path, step: int, target, optimizer) -> None:
    buffer = io.BytesIO()
    torch.save({"model": target.model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, buffer)
    folder = out / CHECKPOINTS
    write_bytes_atomic(folder / f"step-{step:07d}.pt", buffer.getbuffer())
    for old in sorted(folder.glob("step-*.pt"))[:-2]:  # the newest two: one may be ahead of the journal
        old.unlink(missing_ok=True)


def load_checkpoint(out: Path, step: int, target, optimizer) -> None:
    path = out / CHECKPOINTS / f"step-{step:07d}.pt"
    if not path.is_file():
        raise SiaError(f"{out} records step {step} but holds no checkpoint of it; pass --force to start over")
    state = torch.load(path, map_location="cpu", weights_only=True)
    target.model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])


# ---------------------------------------------------------------- before and after


