"""The life of a long run, the same for every command that writes into --out (attack, diagnose,
augment, harden, train-gan):

    check --out -> lock -> seed -> load -> tune -> begin -> --force clears -> journal
    -> sweep the units (Ctrl-C: partial output) -> gather -> write -> close -> finish

A command supplies a `Plan`: how it loads its inputs, its units of work (batches of images,
blocks of augmentation jobs), the work of one unit as journal entries, and the writer of its
outputs from journal entries. This module owns the rest, once: the lock on --out, the refusal
to overwrite a finished run, the resume fingerprint, when --force clears (only after every
input checked out, so a failing rerun keeps the old results), Ctrl-C and SIGTERM (what is
finished is written, marked incomplete), torchrun ranks (each its share of the units, entries
gathered at the end) and atomic writes through the plan's writer.

What a run decides (the device of a torchrun rank, the batch size) lives in its `Context`;
the command's config stays as the command built it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from sia_cli.engine.speed import AUTO, tune
from sia_cli.errors import INTERRUPTED, SiaError
from sia_cli.progress import ProgressFn, silent
from sia_cli.runs.distributed import World, agree, barrier, join
from sia_cli.runs.files import file_sha256
from sia_cli.runs.inputs import load_inputs
from sia_cli.runs.journal import close_run, locked, open_journal, read_entries

LOCK = ".sia.lock"
# Config fields that say where and how fast a run goes, not what it finds: they may change
# between an interrupted attempt and its resumption.
NOT_RESULTS = ("out", "force", "command", "device", "batch_size", "compile", "trust_pickle")


@dataclass(frozen=True)
class Context:
    """One run as it goes: the command's config, the loaded inputs and what the run decided."""

    config: Any  # the command's frozen config (a sia_cli.runs.RunConfig)
    inputs: Any  # sia_cli.runs.Inputs
    world: World
    device: str  # this rank's device
    batch_size: int  # `auto` settled
    progress: ProgressFn

    @property
    def out(self) -> Path:
        return Path(self.config.out)


class Plan:
    """What a command supplies to `execute`. Subclasses override `units`, `work` and `write`;
    the other hooks have defaults that fit a run over a folder of images."""

    what = "sia run"  # how the lock message names the command
    task = "run"  # the progress bar's name
    shared_units = False  # True: every rank works every unit (training), not its own share

    def check_out(self, out: Path, force: bool) -> None:
        """Before the lock: refuse what --out holds that this run must not touch."""
        marker = self.finished(out)
        if marker is not None and not force:
            raise SiaError(f"{out} holds a finished run ({marker.relative_to(out)}); "
                           "pass --force to overwrite or pick another --out")

    def finished(self, out: Path) -> Path | None:
        """The output that marks --out as a finished run of this command, if any."""
        return None

    def load(self, config, device: str, progress: ProgressFn):
        """Every input, checked, on every rank, before anything is cleared or attacked."""
        return load_inputs(config, device, progress)

    def rows_per_image(self, config, inputs) -> int:
        """Attack rows one image costs (single-attribute diagnosis attacks K at once)."""
        return 1

    def planned_images(self, config, inputs) -> int:
        """Images the run will attack: `--batch-size auto` never picks more."""
        return len(inputs.files)

    def batch_size(self, config, inputs, device: str, world: World) -> int:
        """Prepare the models for the run (layout, compilation) and settle `--batch-size auto`."""
        return tune(config, inputs, torch.device(device), world, self.rows_per_image(config, inputs),
                    self.planned_images(config, inputs))

    def begin(self, context: Context):
        """After loading, before --force clears: a collective step every rank runs. A result
        other than None ends the run with it (nothing left to do)."""
        return None

    def clear(self, out: Path) -> None:
        """--force: remove what a previous run of this command wrote, nothing else."""

    def fingerprint(self, context: Context) -> dict:
        return run_fingerprint(context.config, context.inputs)

    def total(self, context: Context) -> int:
        """Units of progress (images or jobs) the whole run has."""
        return len(context.inputs.files)

    def progress_of(self, context: Context, entries: dict[str, dict]) -> int:
        """How much of `total` the journal entries so far stand for."""
        return len(entries)

    def units(self, context: Context, done: dict[str, dict]) -> Iterable:
        """This rank's share of the work not in `done` (journal entries by key)."""
        raise NotImplementedError

    def work(self, context: Context, unit) -> list[dict]:
        """Do one unit; return its journal entries (each a dict with a "file" key), written
        after the unit's files are in place."""
        raise NotImplementedError

    def check_usable(self, context: Context, entries: dict[str, dict]) -> None:
        """After the sweep, on every rank: fail when the entries make no result at all."""

    def write(self, context: Context, entries: dict[str, dict], complete: bool):
        """Rank 0: the command's outputs from every entry so far (atomic writes); the run's
        result. Called with complete=False after an interruption; return None when nothing
        could be written."""
        raise NotImplementedError

    def kept(self, context: Context, result) -> str:
        """After an interruption, where what `write(complete=False)` returned (not None) is."""
        return f"what is finished is written to {context.out} (complete: false)"

    def finish(self, context: Context, result):
        """On every rank, still under the lock, once the units are written (or `begin` found
        them done): a collective step on what was written (`sia harden` evaluates the model
        before and after). Returns the run's result (rank 0's; None on the others)."""
        return result


def execute(config, plan: Plan, progress: ProgressFn = silent):
    """Run `plan` into `config.out`; return its writer's result (rank 0; None on other ranks).

    The lock is held from before anything is written until the end. Loading runs on every
    rank and every rank fails alike (distributed.agree); --force clears only after loading
    and `plan.begin`, so a rerun that fails validation keeps the previous results.
    """
    if config.batch_size != AUTO and config.batch_size < 1:  # before --out is made
        raise SiaError(f"--batch-size must be at least 1 (got {config.batch_size})")
    if getattr(config, "seed", 0) < 0:  # numpy's seeding refuses it, after the whole attack
        raise SiaError(f"--seed must be non-negative (got {config.seed})")
    world, device = join(config.device)
    out = Path(config.out)
    agree(lambda: (plan.check_out(out, config.force), prepare_out(out)), world)
    with locked(out, LOCK, plan.what, world):
        torch.manual_seed(config.seed)
        shown = progress if world.main else silent
        inputs = agree(lambda: plan.load(config, device, shown), world)
        batch_size = plan.batch_size(config, inputs, device, world)
        context = Context(config, inputs, world, device, batch_size, shown)
        early = plan.begin(context)
        if early is not None:
            return plan.finish(context, early)
        if config.force and world.main:
            plan.clear(out)
            close_run(out)
        barrier(world)
        journal = open_journal(out, plan.fingerprint(context), world)
        total = plan.total(context)
        finished = plan.progress_of(context, journal.done)
        try:
            for unit in plan.units(context, journal.done):
                entries = plan.work(context, unit)
                journal.append(entries)
                # rank 0 speaks for all: shares differ by a unit at most
                finished += len(entries) * (1 if plan.shared_units else world.size)
                shown(plan.task, min(finished, total), total)
        except KeyboardInterrupt:
            raise interrupted(context, plan) from None
        entries = journal.gather()
        plan.check_usable(context, entries)
        result = plan.write(context, entries, complete=True) if world.main else None
        barrier(world)
        if world.main:
            close_run(out)
        return plan.finish(context, result)


def interrupted(context: Context, plan: Plan) -> SiaError:
    """After Ctrl-C or SIGTERM: rank 0 writes what every rank finished, marked incomplete."""
    if not context.world.main:
        return SiaError("interrupted", INTERRUPTED)
    entries = read_entries(context.out)  # every rank's journal: the others may not answer a gather now
    wrote = plan.write(context, entries, complete=False) if entries else None
    where = f"{plan.kept(context, wrote)}; " if wrote is not None else ""
    return SiaError(f"interrupted after {plan.progress_of(context, entries)} of {plan.total(context)}: {where}"
                    "rerun the same command to resume", INTERRUPTED)


def prepare_out(out: Path) -> None:
    """Fail before any work when `out` cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".sia-write-test.{os.getpid()}"  # per process: torchrun ranks probe at once
        try:
            probe.write_bytes(b"ok")
        finally:
            probe.unlink(missing_ok=True)  # also when the write failed (a full disk) after creating it
    except OSError as exc:
        raise SiaError(f"cannot write to --out {out}: {exc.strerror or exc}") from None


def run_fingerprint(config, inputs) -> dict:
    """What decides a run's results, flat so a refusal can name each changed setting: a resumed
    run must match it. The files' contents count, not only their paths."""
    data = json.loads(json.dumps(config.describe(), default=str))
    for key in NOT_RESULTS:
        data.pop(key, None)
    data.update(data.pop("settings", {}))
    target = inputs.target.describe()
    data.update({
        "model_sha256": inputs.target.sha256,
        "backbone": inputs.backbone.info.name, "backbone_sha256": inputs.backbone.info.sha256,
        "attrs_file_sha256": file_sha256(config.attrs_file) if config.attrs_file else None,
        "labels_sha256": file_sha256(config.labels) if config.labels else None,
        "images": str(Path(config.images).resolve()),
        # as resolved, whatever the source (sia.yaml, options, probing); where they came from may change
        "target": {k: v for k, v in target.items() if k not in ("path", "sources", "assumptions", "static_batch")},
        "protect": [name for name, kept in zip(inputs.backbone.attributes, inputs.protected.tolist()) if kept],
    })
    return json.loads(json.dumps(data, default=str))  # tuples become lists, as they come back from disk
