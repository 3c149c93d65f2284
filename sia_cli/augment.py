"""`sia augment`: SIA adversaries written as an augmentation set in CelebA layout (paper 3.2).

Output image i is job i: source `i % m` of the m chosen sources, in round `i // m`. Round 0
is the paper's adversary (Algorithm 1 started at the source's own a0). Later rounds start
from a0 plus uniform jitter in the unprotected attributes, drawn from (seed + round, source
name), so they differ from round 0 and each (source, round) pair is reproducible whatever
batch it falls in.

Resuming rests on a journal: one JSON line per finished image, appended (and fsynced) only
after the image has been renamed into place. A rerun trusts the journal lines whose image
exists and recomputes the rest; list_attr.txt and labels.csv are rebuilt from the journal.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sia_cli import __version__
from sia_cli.attack import METHODS, attribute_radius, run_loop
from sia_cli.data import ImageError, load_image
from sia_cli.distributed import World, agree, all_gather, join
from sia_cli.errors import INTERRUPTED, SiaError
from sia_cli.files import file_sha256, format_list_attr, write_json_atomic, write_text_atomic
from sia_cli.journal import append_lines, locked, read_lines
from sia_cli.progress import ProgressFn, silent
from sia_cli.reports import save_png_atomic, to_uint8
from sia_cli.speed import AUTO, tune
from sia_cli.runs import (
    Inputs, RunConfig, batches, describe_inputs, load_inputs, prepare_out, protected_names,
    reference_pass,
)

IMAGES = "images"
ATTR_TABLE = "list_attr.txt"
LABEL_TABLE = "labels.csv"
MANIFEST = "augment.json"
JOURNAL = ".augment-progress.jsonl"
LOCK = ".augment.lock"
SCHEMA_VERSION = 1


@dataclass
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

def augment(config: AugmentConfig, progress: ProgressFn = silent) -> dict:
    """Write (or finish writing) the augmentation set in `config.out`; return a summary.

    Under torchrun every rank attacks its share of the jobs; rank 0 writes the tables and
    the manifest.
    """
    check_config(config)
    world, config.device = join(config.device)
    out = Path(config.out)

    def prepare() -> None:
        if not (out / MANIFEST).exists():
            refuse_foreign(out)  # before anything is written there, the lock file included
        prepare_out(out, config.force)

    agree(prepare, world)
    with locked(out, LOCK, "sia augment", world):
        return _augment(config, out, agree(lambda: read_manifest(out), world), world,
                        progress if world.main else silent)


def _augment(config: AugmentConfig, out: Path, previous: dict | None, world: World, progress: ProgressFn) -> dict:
    torch.manual_seed(config.seed)
    inputs, reason, settings = agree(lambda: _load(config), world)
    tune(config, inputs, world)
    resuming = previous is not None and not config.force
    if resuming:
        refuse_changed(out, previous["settings"], settings)
        if previous.get("complete") and "summary" in previous and \
                len(finished_rows(out, previous["n"])) == previous["n"]:
            return {**previous["summary"], "already_complete": True, "written": 0}
    sources, skipped = scan_sources(inputs, config, world, progress)
    chosen = choose_class(sources, config.only_class, inputs.target)
    jobs = plan_jobs(chosen, config.n or len(chosen), config.seed, config.jitter)
    digest = sources_digest(chosen)
    if resuming and previous.get("sources_digest") not in (None, digest):
        raise SiaError(f"the images in {config.images} changed since {out} was begun; "
                       "pass --force to start over or pick another --out")
    context = {"config": config, "inputs": inputs, "reason": reason, "settings": settings, "digest": digest,
               "skipped": skipped, "sources": sources, "n": len(jobs)}
    rows = {}
    if world.main:
        if previous is not None and not resuming:
            clear_run(out)  # --force, and only now that every input checked out: a failing rerun keeps the old set
        rows = resume_rows(out, jobs) if resuming else {}
        write_manifest(out, context, rows, complete=False)
    rows = all_gather(rows, world)[0]
    already = len(rows)
    try:
        run_jobs(inputs, config, jobs, rows, out, world, progress)
    except KeyboardInterrupt:
        raise _interrupted(out, len(jobs), list(inputs.backbone.attributes), world) from None
    for part in all_gather(rows, world):
        rows.update(part)
    summary = None
    if world.main:
        rows = dict(sorted(rows.items()))
        merge_journals(out, rows)
        write_tables(out, rows, list(inputs.backbone.attributes))
        summary = write_manifest(out, context, rows, complete=True)
    summary = all_gather(summary, world)[0]
    return {**summary, "already_complete": False, "written": len(rows) - already}


def _interrupted(out: Path, n: int, attributes: list[str], world: World) -> SiaError:
    """After Ctrl-C: rank 0 brings the tables up to every rank's finished images (the other
    ranks' rows reach it only at the end otherwise); augment.json still says complete: false."""
    if not world.main:
        return SiaError("interrupted", INTERRUPTED)
    rows = finished_rows(out, n)
    write_tables(out, rows, attributes)
    return SiaError(f"interrupted with {len(rows)} of {n} images written to {out} (augment.json: complete false); "
                    "rerun the same command to resume", INTERRUPTED)


def _load(config: AugmentConfig) -> tuple[Inputs, str, dict]:
    inputs = load_inputs(config)
    if not inputs.target.task.writes_class_labels:
        raise SiaError(f"sia augment writes class labels; this model is {inputs.target.kind}, which has no classes")
    reason = apply_protection(config, inputs)
    return inputs, reason, fingerprint(config, inputs)


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


def fingerprint(config: AugmentConfig, inputs: Inputs) -> dict:
    """Every setting that changes what an image or a label holds (device and batch size do not)."""
    target, backbone = inputs.target, inputs.backbone
    values = {
        "model_sha256": target.sha256, "backbone": backbone.info.name, "backbone_sha256": backbone.info.sha256,
        "images": str(Path(config.images).resolve()),
        "attrs_file_sha256": file_sha256(config.attrs_file) if config.attrs_file else None,
        "labels_sha256": file_sha256(config.labels) if config.labels else None,
        **asdict(config.settings), "protect": protected_names(inputs), "seed": config.seed, "n": config.n,
        "class": config.only_class, "jitter": config.jitter, "task": target.kind, "input_size": target.input_size,
        "mean": target.mean, "std": target.std, "output_key": target.output_key,
        "label": target.describe()["label"],  # multilabel: the label under attack (None otherwise)
    }
    return json.loads(json.dumps(values))  # tuples become lists, as they come back from augment.json


def refuse_changed(out: Path, before: dict, now: dict) -> None:
    changed = sorted(key for key in before.keys() | now.keys() if before.get(key) != now.get(key))
    if changed:
        shown = ", ".join(f"{key}: {before.get(key)} -> {now.get(key)}" for key in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise SiaError(f"{out} holds an augmentation made with other settings ({shown}{more}); "
                       "pass --force to start over or pick another --out")


# ---------------------------------------------------------------- sources and jobs

def scan_sources(inputs: Inputs, config: AugmentConfig, world: World,
                 progress: ProgressFn) -> tuple[list[Source], list[dict]]:
    """Usable sources with their a0 and reference label, and the skipped files, before any
    attack: `--class` and the job numbering both need the whole list, so every rank scans its
    share and all get the whole. Images are reloaded per batch later, not kept."""
    sources: list[Source] = []
    skipped: list[dict] = []
    for batch in batches(inputs, config.batch_size, config.device, skipped, world=world):
        reference = reference_pass(inputs, batch)["reference"]
        for file, a0, label in zip(batch.files, batch.a0.cpu().numpy(), reference.tolist()):
            sources.append(Source(file, a0, int(label)))
        progress("labels", (len(sources) + len(skipped)) * world.size, len(inputs.files))
    order = {file.name: i for i, file in enumerate(inputs.files)}
    parts = all_gather((sources, skipped), world)
    sources = sorted((s for part, _ in parts for s in part), key=lambda s: order[s.file.name])
    skipped = sorted((s for _, part in parts for s in part), key=lambda s: order[s["file"]])
    if not sources:
        raise SiaError(f"no usable image in {config.images}: {skipped[0]['reason'] if skipped else 'none found'}")
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


def shifted_start(a0: torch.Tensor, radius: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A start inside a0's ball and a radius around it whose ball never leaves a0's ball.

    The attack loop centres its ball on its start, so a shifted start needs a new radius: one
    side of the box that ends at 0 or 1 is no constraint (the loop clips to [0, 1] anyway); a
    side inside (0, 1) limits the radius to the room left on that side.
    """
    low, high = (a0 - radius).clamp(0, 1), (a0 + radius).clamp(0, 1)
    start = torch.minimum(torch.maximum(a0 + offset, low), high)
    unbounded = torch.full_like(a0, math.inf)
    room_below = torch.where(low > 0, start - low, unbounded)
    room_above = torch.where(high < 1, high - start, unbounded)
    # Unmoved entries keep their radius exactly, so round 0 is bit for bit the paper's attack.
    return start, torch.where(start == a0, radius, torch.minimum(room_below, room_above).clamp(max=1.0))


def load_sources(jobs: list[Job], size: int) -> torch.Tensor:
    images = []
    for job in jobs:
        try:
            images.append(load_image(job.source.file, size))
        except ImageError as exc:
            raise SiaError(f"{job.source.file.name} became unusable during the run: {exc}") from None
    return torch.stack(images)


def attack_jobs(inputs: Inputs, jobs: list[Job], config: AugmentConfig):
    """Run SIA on a batch of jobs; return the final state and which adversaries fooled the model."""
    device, settings, target = config.device, config.settings, inputs.target
    x0 = load_sources(jobs, inputs.backbone.img_size).to(device)
    a0 = torch.from_numpy(np.stack([job.source.a0 for job in jobs])).float().to(device)
    reference = target.reference_from_labels(torch.tensor([job.source.label for job in jobs]))
    fixed = inputs.protected.to(device).expand_as(a0)
    offset = start_offsets(jobs, config.jitter, a0.shape[1]).to(device) * ~fixed
    a_start, radius = shifted_start(a0, attribute_radius(a0, settings, fixed), offset)
    state = run_loop(inputs.backbone, target, METHODS["sia"], x0, a_start, reference, settings, radius)
    return state, target.success(state.output, reference, settings.nme_threshold)


def run_jobs(inputs: Inputs, config: AugmentConfig, jobs: list[Job], rows: dict, out: Path, world: World,
             progress: ProgressFn) -> None:
    """Attack this rank's unfinished jobs in fixed blocks of --batch-size (so an interrupted run
    resumes with the very batches it would have run, whatever the number of ranks) and record
    each image once it is in place."""
    attributes = list(inputs.backbone.attributes)
    journal = journal_path(out, world.rank)
    for block, start in enumerate(range(0, len(jobs), config.batch_size)):
        todo = [job for job in jobs[start:start + config.batch_size] if job.index not in rows]
        if not todo or not world.owns(block):
            continue
        state, fooled = attack_jobs(inputs, todo, config)
        for i, job in enumerate(todo):
            save_png_atomic(out / IMAGES / job.name, Image.fromarray(to_uint8((state.adversary[i] + 1) / 2)))
            rows[job.index] = journal_row(job, state.a[i], bool(fooled[i]))
            append_lines(journal, [rows[job.index]])  # per image: Ctrl-C keeps every saved one
        if world.main:  # only rank 0 writes the tables; they hold its rows until the end
            write_tables(out, rows, attributes)
        progress("augment", min(len(rows) * world.size, len(jobs)), len(jobs))


def journal_row(job: Job, a_end: torch.Tensor, fooled: bool) -> dict:
    return {"index": job.index, "file": job.name, "source": job.source.file.name, "round": job.round,
            "seed": job.seed, "label": job.source.label,
            "attrs": np.round(a_end.double().cpu().numpy(), 6).tolist(), "fooled": fooled}


# ---------------------------------------------------------------- journal and tables

def journal_path(out: Path, rank: int) -> Path:
    """Rank 0 keeps the journal; other torchrun ranks append to their own, merged on resume."""
    return out / (JOURNAL if rank == 0 else f"{JOURNAL}.{rank}")


def journal_paths(out: Path) -> list[Path]:
    return [path for path in [out / JOURNAL, *sorted(out.glob(f"{JOURNAL}.*"))] if path.exists()]


def read_journal(out: Path) -> list[dict]:
    """Every rank's journal rows; a torn last line (the run died while writing it) is dropped."""
    rows = []
    for path in journal_paths(out):
        rows += _journal_rows(path)
    return rows


def _journal_rows(path: Path) -> list[dict]:
    return [row for row in read_lines(path) if isinstance(row.get("index"), int)]


def finished_rows(out: Path, n: int) -> dict[int, dict]:
    """Journal rows within 0..n-1 whose image is on disk; a later row for an index wins."""
    rows = {row["index"]: row for row in read_journal(out) if 0 <= row["index"] < n}
    return {index: row for index, row in sorted(rows.items()) if (out / IMAGES / row["file"]).is_file()}


def resume_rows(out: Path, jobs: list[Job]) -> dict[int, dict]:
    """Rows of a previous attempt that match this plan; the journal is rewritten to exactly those,
    which also removes a torn last line before anything is appended after it."""
    rows = {
        index: row for index, row in finished_rows(out, len(jobs)).items()
        if row["file"] == jobs[index].name and row.get("source") == jobs[index].source.file.name
        and row.get("round") == jobs[index].round
    }
    merge_journals(out, rows)
    for partial in (out / IMAGES).glob(".*.tmp"):  # left by a run killed mid-write; ours, never listed
        partial.unlink(missing_ok=True)
    return rows


def merge_journals(out: Path, rows: dict[int, dict]) -> None:
    """Rewrite rank 0's journal to exactly `rows` and drop the other ranks' journals; this also
    removes a torn last line before anything is appended after it."""
    write_text_atomic(out / JOURNAL, "".join(json.dumps(row) + "\n" for row in rows.values()))
    for other in journal_paths(out)[1:]:
        other.unlink()


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
    """Without our manifest, files with our names belong to someone else (a dataset, say)."""
    present = [name for name in (IMAGES, ATTR_TABLE, LABEL_TABLE, JOURNAL) if (out / name).exists()]
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
    for path in journal_paths(out):
        path.unlink()
    for name in (ATTR_TABLE, LABEL_TABLE, MANIFEST):
        (out / name).unlink(missing_ok=True)


def write_manifest(out: Path, context: dict, rows: dict, complete: bool) -> dict:
    """augment.json: the settings a rerun must match, and the summary shown by a no-op rerun."""
    config, inputs = context["config"], context["inputs"]
    summary = {
        "out": str(out), "n": context["n"], "done": len(rows), "protected": protected_names(inputs),
        "protect_reason": context["reason"], "skipped": context["skipped"],
        "class_names": inputs.target.task.class_labels,
        "source_counts": _counts(source.label for source in context["sources"]),
        "class_counts": _counts(row["label"] for row in rows.values()),
        "fooled": sum(bool(row.get("fooled")) for row in rows.values()),
    }
    write_json_atomic(out / MANIFEST, {
        "schema_version": SCHEMA_VERSION, "version": __version__, "command": config.command,
        "settings": context["settings"], "sources_digest": context["digest"], "n": context["n"],
        **describe_inputs(inputs), "complete": complete, "summary": summary,
    })
    return summary


def _counts(labels) -> dict[str, int]:
    return {str(label): count for label, count in sorted(Counter(labels).items())}
