"""`sia augment`: SIA adversaries written as an augmentation set in CelebA layout (paper 3.2).

Output image i is job i: source `i % m` of the m chosen sources, in round `i // m`. Round 0
is the paper's adversary (Algorithm 1 started at the source's own a0). Later rounds start
from a0 plus uniform jitter in the unprotected attributes, drawn from (seed + round, source
name), so they differ from round 0 and each (source, round) pair is reproducible whatever
batch it falls in.

The run's life (lock, resume, Ctrl-C, torchrun ranks) is `sia_cli.runs.lifecycle`'s: the journal
holds one entry per finished image, appended only after the image is renamed into place. A
rerun trusts the entries whose image exists and recomputes the rest; list_attr.txt,
labels.csv and augment.json (with every image's row) are written from the entries.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sia_cli import __version__
from sia_cli.engine.attack import METHODS, attack_batch
from sia_cli.engine.speed import AUTO
from sia_cli.errors import SiaError
from sia_cli.inputs.align import align_inputs
from sia_cli.inputs.images import ImageError, load_image, not_images
from sia_cli.progress import ProgressFn, silent
from sia_cli.reports.figures import save_png_atomic, to_uint8
from sia_cli.runs.distributed import agree, all_gather
from sia_cli.runs.files import format_list_attr, write_json_atomic, write_text_atomic
from sia_cli.runs.inputs import Inputs, RunConfig, batches, load_inputs, reference_pass
from sia_cli.runs.journal import RUN_STATE, refuse_changed
from sia_cli.runs.lifecycle import Context, Plan, execute, run_fingerprint
from sia_cli.runs.plan import one_by_one
from sia_cli.runs.records import describe_inputs, protected_names

IMAGES = "images"
ATTR_TABLE = "list_attr.txt"
LABEL_TABLE = "labels.csv"
MANIFEST = "augment.json"
SCHEMA_VERSION = 2  # 2: the rows of every image in augment.json; the journal is the lifecycle's


@dataclass(frozen=True)
class AugmentConfig(RunConfig):
    n: int | None = None  # None: one image per chosen source
    only_class: str | None = None  # class index or name from the model's sia.yaml
    auto_protect: bool = True
    jitter: float = 0.2  # start spread of rounds after the first; about the attack's own reach at T=200


@dataclass
class Source:
    file: Path
    a0: np.ndarray  # (K,) starting attributes in [0, 1]
    label: int  # reference label: clean prediction, or --labels


@dataclass(frozen=True)
class Job:
    index: int
    source: Source
    round: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.index:06d}.png"


# ---------------------------------------------------------------- the run

def augment(config: AugmentConfig, progress: ProgressFn = silent) -> dict | None:
    """Write (or finish writing) the augmentation set in `config.out`; return a summary on
    rank 0 (None on other torchrun ranks, which attack their share of the jobs)."""
    check_config(config)
    config = align_inputs(config, progress)
    return execute(config, AugmentPlan(config), progress)


class AugmentPlan(Plan):
    """The augmentation set as a lifecycle plan: units are fixed blocks of jobs (so an interrupted
    run resumes with the very batches it would have run, whatever the number of ranks), journal
    entries are the rows of finished images, the writer makes the tables and the manifest."""

    what = "sia augment"
    task = "augment"

    def __init__(self, config: AugmentConfig):
        self.config = config
        self.reason = ""
        self.jobs: list[Job] = []
        self.sources: list[Source] = []
        self.skipped: list[dict] = []
        self.digest = ""
        self.settings: dict = {}
        self.already = 0

    def check_out(self, out: Path, force: bool) -> None:
        if not (out / MANIFEST).exists() and not (out / RUN_STATE).exists():
            refuse_foreign(out)  # before anything is written there, the lock file included

    def load(self, config: AugmentConfig, device: str, progress: ProgressFn) -> Inputs:
        inputs = load_inputs(config, device, progress)
        if not inputs.target.task.writes_class_labels:
            raise SiaError(f"sia augment writes class labels; this model is {inputs.target.kind}, which has no classes")
        self.reason = apply_protection(config, inputs)
        return inputs

    def planned_images(self, config: AugmentConfig, inputs: Inputs) -> int:
        return max(len(inputs.files), config.n or 0)

    def begin(self, context: Context) -> dict | None:
        """Compare with a previous set (a finished one with the same settings is the result);
        label every source and plan the jobs."""
        config, out, inputs = self.config, context.out, context.inputs
        previous = agree(lambda: read_manifest(out), context.world)
        self.settings = run_fingerprint(config, inputs)
        resuming = previous is not None and not config.force
        if resuming:
            refuse_changed(out, previous["settings"], self.settings)
            if previous.get("complete") and "summary" in previous and \
                    all((out / IMAGES / row["file"]).is_file() for row in previous.get("images", [])):
                return {**previous["summary"], "already_complete": True, "written": 0}
        self.sources, self.skipped = scan_sources(inputs, context, config.images)
        chosen = choose_class(self.sources, config.only_class, inputs.target)
        self.jobs = plan_jobs(chosen, config.n or len(chosen), config.seed, config.jitter)
        self.digest = sources_digest(chosen)
        if resuming and previous.get("sources_digest") not in (None, self.digest):
            raise SiaError(f"the images in {config.images} changed since {out} was begun; "
                           "pass --force to start over or pick another --out")
        return None

    def clear(self, out: Path) -> None:
        clear_run(out)

    def fingerprint(self, context: Context) -> dict:
        return self.settings

    def total(self, context: Context) -> int:
        return len(self.jobs)

    def units(self, context: Context, done: dict[str, dict]):
        rows = finished_rows(context.out, self.jobs, done)
        self.already = len(rows)
        rows.update(failed_rows(self.jobs, done))  # a job the model raised on is not retried
        if context.world.main:
            for partial in (context.out / IMAGES).glob(".*.tmp"):  # left by a run killed mid-write; ours
                partial.unlink(missing_ok=True)
        size = context.batch_size
        for block, start in enumerate(range(0, len(self.jobs), size)):
            todo = [job for job in self.jobs[start:start + size] if job.index not in rows]
            if todo and context.world.owns(block):
                yield todo

    def work(self, context: Context, jobs: list["Job"]) -> list[dict]:
        def attack(part: list[Job]) -> list[dict]:
            state, fooled = attack_jobs(context.inputs, part, self.config, context.device)
            for i, job in enumerate(part):
                save_png_atomic(context.out / IMAGES / job.name,
                                Image.fromarray(to_uint8((state.adversary[i] + 1) / 2)))
            return [image_row(job, state.a[i], bool(fooled[i])) for i, job in enumerate(part)]

        rows, failed = one_by_one(attack, jobs, lambda i, j: jobs[i:j])
        return [row if i not in failed else {**job_row(jobs[i]), "error": failed[i]} for i, row in enumerate(rows)]

    def write(self, context: Context, entries: dict[str, dict], complete: bool) -> dict:
        rows = finished_rows(context.out, self.jobs, entries)
        write_tables(context.out, rows, list(context.inputs.backbone.attributes))
        failed = [row for _, row in sorted(failed_rows(self.jobs, entries).items())]
        summary = write_manifest(context.out, self, context.inputs, rows, complete, failed)
        return {**summary, "already_complete": False, "written": len(rows) - self.already}


def check_config(config: AugmentConfig) -> None:
    if config.n is not None and config.n < 1:
        raise SiaError(f"--n must be at least 1 (got {config.n})")
    if config.batch_size != AUTO and config.batch_size < 1:
        raise SiaError(f"--batch-size must be at least 1 (got {config.batch_size})")
    if config.seed < 0:
        raise SiaError(f"--seed must be non-negative (got {config.seed})")
    if not math.isfinite(config.jitter) or config.jitter < 0:
        raise SiaError(f"--jitter must be a finite non-negative number (got {config.jitter})")
    if Path(config.images).resolve() == (Path(config.out) / IMAGES).resolve():
        raise SiaError("--images is the output's own images/ folder; pick another --out")


# ---------------------------------------------------------------- protection and settings

def attributes_in_name(model: Path, attributes: list[str]) -> list[str]:
    """Backbone attributes whose name appears in the model file's stem (case-insensitive)."""
    stem = Path(model).stem.lower()
    return [name for name in attributes if name.lower() in stem]


def apply_protection(config: AugmentConfig, inputs: Inputs) -> str:
    """Protect the attribute the model predicts unless told otherwise; say why in the returned text.

    An augmentation set is labelled with the source's class: letting the attack edit the very
    attribute that class stands for would write wrong labels.
    """
    attributes = list(inputs.backbone.attributes)
    if config.protect:
        return "given with --protect"
    if not config.auto_protect:
        return "none (--no-protect)"
    named = attributes_in_name(config.model, attributes)
    if len(named) > 1:
        return f"none: the model file name mentions {', '.join(named)}; choose with --protect"
    if not named:
        return "none: no backbone attribute in the model file name; choose with --protect"
    inputs.protected = torch.tensor([name in named for name in attributes])
    return "named in the model file name; --no-protect turns this off"


# ---------------------------------------------------------------- sources and jobs

def scan_sources(inputs: Inputs, context: Context, images: Path) -> tuple[list[Source], list[dict]]:
    """Usable sources with their a0 and reference label, and the skipped files, before any
    attack: `--class` and the job numbering both need the whole list, so every rank scans its
    share and all get the whole. Images are reloaded per batch later, not kept."""
    sources: list[Source] = []
    skipped: list[dict] = []
    world, progress = context.world, context.progress
    for batch in batches(inputs, context.batch_size, context.device, skipped, world=world):
        labels, failed = one_by_one(lambda b: reference_pass(inputs, b)["reference"].tolist(), batch.files,
                                    batch.part)
        for i, (file, a0, label) in enumerate(zip(batch.files, batch.a0.cpu().numpy(), labels)):
            if i in failed:  # the model refuses the image itself: nothing to augment from it
                skipped.append({"file": file.name, "reason": failed[i]})
            else:
                sources.append(Source(file, a0, int(label)))
        progress("labels", (len(sources) + len(skipped)) * world.size, len(inputs.files))
    order = {file.name: i for i, file in enumerate(inputs.files)}
    parts = all_gather((sources, skipped), world)
    sources = sorted((s for part, _ in parts for s in part), key=lambda s: order[s.file.name])
    skipped = sorted((s for _, part in parts for s in part), key=lambda s: order[s["file"]])
    table = getattr(inputs.attributes, "path", None)  # an attributes file kept beside the images is no stray
    skipped += not_images(images, [table])
    if not sources:
        raise SiaError(f"no usable image in {images}: {skipped[0]['reason'] if skipped else 'none found'}")
    return sources, skipped


def class_index(text: str, target) -> int:
    names = list(target.task.class_labels or [])
    count = target.task.class_count
    if text in names:
        return names.index(text)
    if text.isdigit() and int(text) < count:
        return int(text)
    known = f" or one of {', '.join(names)}" if names else ""
    raise SiaError(f"--class {text!r}: expected a class index 0..{count - 1}{known}")


def choose_class(sources: list[Source], only_class: str | None, target) -> list[Source]:
    if only_class is None:
        return sources
    wanted = class_index(only_class, target)
    chosen = [source for source in sources if source.label == wanted]
    if not chosen:
        found = ", ".join(f"{label}: {count}" for label, count in sorted(Counter(s.label for s in sources).items()))
        raise SiaError(f"--class {only_class}: no source image has that label (labels found: {found})")
    return chosen


def plan_jobs(sources: list[Source], n: int, seed: int, jitter: float) -> list[Job]:
    if n > len(sources) and jitter == 0:
        raise SiaError(f"--n {n} exceeds the {len(sources)} source image(s) and --jitter is 0: "
                       "later rounds would repeat the first round's images")
    return [Job(i, sources[i % len(sources)], i // len(sources), seed + i // len(sources)) for i in range(n)]


def sources_digest(sources: list[Source]) -> str:
    text = "".join(f"{source.file.name}\t{source.label}\n" for source in sources)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- attacking a batch of jobs

def start_offsets(jobs: list[Job], jitter: float, k: int) -> torch.Tensor:
    """(B, K) offsets of the starting attributes: zero in round 0, else uniform in [-jitter, jitter]
    from a stream of its own per (seed + round, source name)."""
    rows = []
    for job in jobs:
        if job.round == 0:
            rows.append(np.zeros(k))
            continue
        stream = np.random.default_rng([job.seed, zlib.crc32(job.source.file.name.encode("utf-8"))])
        rows.append(stream.uniform(-jitter, jitter, k))
    return torch.from_numpy(np.stack(rows)).float()


def load_sources(jobs: list[Job], size: int) -> torch.Tensor:
    images = []
    for job in jobs:
        try:
            images.append(load_image(job.source.file, size))
        except ImageError as exc:
            raise SiaError(f"{job.source.file.name} became unusable during the run: {exc}") from None
    return torch.stack(images)


def attack_jobs(inputs: Inputs, jobs: list[Job], config: AugmentConfig, device: str):
    """Run SIA on a batch of jobs; return the final state and which adversaries fooled the model."""
    target = inputs.target
    x0 = load_sources(jobs, inputs.backbone.img_size).to(device)
    a0 = torch.from_numpy(np.stack([job.source.a0 for job in jobs])).float().to(device)
    reference = target.reference_from_labels(torch.tensor([job.source.label for job in jobs]))
    state = attack_batch(inputs.backbone, target, METHODS["sia"], x0, a0, reference, config.settings,
                         inputs.protected, start_offset=start_offsets(jobs, config.jitter, a0.shape[1]))
    return state, target.success(state.output, reference, config.settings.nme_threshold)


def job_row(job: Job) -> dict:
    return {"index": job.index, "file": job.name, "source": job.source.file.name, "round": job.round,
            "seed": job.seed, "label": job.source.label}


def image_row(job: Job, a_end: torch.Tensor, fooled: bool) -> dict:
    """An image's journal entry and its row in augment.json ("file" keys the journal)."""
    return {**job_row(job), "attrs": np.round(a_end.double().cpu().numpy(), 6).tolist(), "fooled": fooled}


# ---------------------------------------------------------------- rows and tables

def finished_rows(out: Path, jobs: list[Job], entries: dict[str, dict]) -> dict[int, dict]:
    """Journal entries of this plan's jobs whose image is on disk, by job index: an entry of
    another plan (other sources, a torn run) or without its image is recomputed."""
    rows = {}
    for job in jobs:
        row = entries.get(job.name)
        if _same_job(row, job) and "error" not in row and (out / IMAGES / job.name).is_file():
            rows[job.index] = row
    return rows


def failed_rows(jobs: list[Job], entries: dict[str, dict]) -> dict[int, dict]:
    """Journal entries of this plan's jobs that the model raised on, by job index."""
    return {job.index: entries[job.name] for job in jobs
            if _same_job(entries.get(job.name), job) and "error" in entries[job.name]}


def _same_job(row: dict | None, job: Job) -> bool:
    return row is not None and row.get("index") == job.index and row.get("source") == job.source.file.name \
        and row.get("round") == job.round


def write_tables(out: Path, rows: dict[int, dict], attributes: list[str]) -> None:
    """list_attr.txt (a_T thresholded at 0.5) and labels.csv, both in image order."""
    ordered = [rows[index] for index in sorted(rows)]
    signs = [[1 if v > 0.5 else -1 for v in row["attrs"]] for row in ordered]
    write_text_atomic(out / ATTR_TABLE, format_list_attr(attributes, [row["file"] for row in ordered], signs))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "label", "source", "seed"])
    writer.writerows([row["file"], row["label"], row["source"], row["seed"]] for row in ordered)
    write_text_atomic(out / LABEL_TABLE, buffer.getvalue())


# ---------------------------------------------------------------- the output folder

def read_manifest(out: Path) -> dict | None:
    path = Path(out) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SiaError(f"{path} is unreadable ({exc}); pass another --out") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("settings"), dict):
        raise SiaError(f"{path} was not written by sia augment; pass another --out")
    return manifest


def refuse_foreign(out: Path) -> None:
    """Without our manifest or run state, files with our names belong to someone else (a dataset, say)."""
    present = [name for name in (IMAGES, ATTR_TABLE, LABEL_TABLE) if (out / name).exists()]
    if present:
        raise SiaError(f"{out} already holds {', '.join(present)} but no {MANIFEST}: not an augmentation "
                       "set of sia augment; pick another --out")


def clear_run(out: Path) -> None:
    """--force: remove what a previous augmentation wrote, nothing else."""
    images = out / IMAGES
    if images.is_dir():
        for file in images.iterdir():
            if (file.suffix == ".png" and file.stem.isdigit()) or file.name.endswith(".tmp"):
                file.unlink()
    for name in (ATTR_TABLE, LABEL_TABLE, MANIFEST):
        (out / name).unlink(missing_ok=True)


def write_manifest(out: Path, plan: AugmentPlan, inputs: Inputs, rows: dict[int, dict], complete: bool,
                   failed: list[dict]) -> dict:
    """augment.json: the settings a rerun must match, every image's row, and the summary shown
    by a no-op rerun."""
    summary = {
        "out": str(out), "n": len(plan.jobs), "done": len(rows), "protected": protected_names(inputs),
        "protect_reason": plan.reason, "skipped": plan.skipped,
        "class_names": inputs.target.task.class_labels,
        "source_counts": _counts(source.label for source in plan.sources),
        "class_counts": _counts(row["label"] for row in rows.values()),
        "fooled": sum(bool(row.get("fooled")) for row in rows.values()),
        "failed": [{"file": row["file"], "source": row["source"], "error": row["error"]} for row in failed],
    }
    write_json_atomic(out / MANIFEST, {
        "schema_version": SCHEMA_VERSION, "version": __version__, "command": plan.config.command,
        "settings": plan.settings, "sources_digest": plan.digest, "n": len(plan.jobs),
        **describe_inputs(inputs), "complete": complete, "summary": summary,
        "images": [rows[index] for index in sorted(rows)],
    })
    return summary


def _counts(labels) -> dict[str, int]:
    return {str(label): count for label, count in sorted(Counter(labels).items())}
