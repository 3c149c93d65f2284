"""`ImagePlan`: the lifecycle plan that `sia attack` and `sia diagnose` share (batches of a
folder, one record per image and method, images a model raises on retried one by one)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from sia_cli.engine.attack import METHODS
from sia_cli.errors import ModelRaised, SiaError
from sia_cli.runs.inputs import Batch, RunConfig, batches
from sia_cli.runs.lifecycle import Context, Plan
from sia_cli.runs.records import COMPARISON, REPORT, plain


def one_by_one(work, items: list, part) -> tuple[list, dict[int, str]]:
    """`work(part(0, n))` for the n items, a list with one result per item; when the model raises
    (it checks its input, say), each item alone, so one image it refuses does not stop the run.
    Returns the results (None where it raised) and the model's message by item index."""
    try:
        return work(part(0, len(items))), {}
    except ModelRaised as exc:
        if len(items) == 1:
            return [None], {0: str(exc)}
    results, failed = [], {}
    for i in range(len(items)):
        try:
            results += work(part(i, i + 1))
        except ModelRaised as exc:
            results.append(None)
            failed[i] = str(exc)
    return results, failed


def _work_or_fail(work, batch: Batch, methods: tuple[str, ...]) -> dict[str, list[dict]]:
    """`work(batch)` through `one_by_one`: an image the model still raises on alone becomes a
    failed record with the model's message, like an image it returns NaN for: the rest of the
    run goes on, and a rerun does not retry it."""
    def per_image(part: Batch) -> list[dict[str, dict]]:
        rows = work(part)
        return [{name: rows[name][i] for name in rows} for i in range(len(part.files))]

    images, failed = one_by_one(per_image, batch.files, batch.part)
    results: dict[str, list[dict]] = {name: [] for name in methods}
    for i, image in enumerate(images):
        if i in failed:
            image = {name: {"file": batch.files[i].name, "attrs_start": plain(batch.a0[i]),
                            "attrs_source": batch.a0_source, "success": False, "error": failed[i]}
                     for name in methods}
        for name, record in image.items():
            results.setdefault(name, []).append(record)
    return results


def collect(entries: dict[str, dict], files: list[Path]) -> tuple[dict[str, list[dict]], list[dict]]:
    """Journal entries -> records per method and skipped files, in the order of `files`."""
    records: dict[str, list[dict]] = {}
    skipped = []
    for file in files:
        entry = entries.get(file.name)
        if entry is None:
            continue
        if "skipped" in entry:
            skipped.append({"file": file.name, "reason": entry["skipped"]})
        for method, record in entry.get("records", {}).items():
            records.setdefault(method, []).append(record)
    return records, skipped


def require_usable(records: dict[str, list[dict]], skipped: list[dict], images: Path) -> None:
    """Fail when no image came through: failed records (NaN or inf) count as unusable too, or
    a report of failures only would claim a run."""
    rows = [record for method in records.values() for record in method]
    if all("error" in record for record in rows):
        reason = rows[0]["error"] if rows else skipped[0]["reason"] if skipped else "none found"
        raise SiaError(f"no usable image in {images}: {reason}")


class ImagePlan(Plan):
    """A run over a folder of images in fixed batches, one record per image and method.

    Subclasses give `attack_images(context, batch) -> {method: records}` and
    `write_reports(context, records, skipped, complete)`.
    """

    what = "sia run"

    def __init__(self, config: RunConfig, began: float | None = None):
        self.config = config
        # The command's start (before --align), so report.json's timing covers the whole run;
        # `seconds` is read again just before report.json is written.
        self.began = time.perf_counter() if began is None else began
        self.methods: tuple[str, ...] = ()  # keys of attack_images' result

    def finished(self, out: Path) -> Path | None:
        """A report that marks `out` as a finished run: its own, or a comparison's. A report
        marked incomplete (an interrupted run) is not one: rerunning resumes it."""
        candidates = [out / REPORT, out / COMPARISON] + [out / name / REPORT for name in METHODS]
        return next((path for path in candidates if path.exists() and _complete(path)), None)

    def clear(self, out: Path) -> None:
        remove_run(out)

    def units(self, context: Context, done: dict[str, dict]):
        """Batches of this rank's blocks, each with the files skipped since the previous one."""
        skipped: list[dict] = []
        for batch in batches(context.inputs, context.batch_size, context.device, skipped, done, context.world):
            yield list(skipped), batch
            skipped.clear()
        if skipped:
            yield skipped, None

    def work(self, context: Context, unit) -> list[dict]:
        skipped, batch = unit
        entries = [{"file": item["file"], "skipped": item["reason"]} for item in skipped]
        if batch is not None:
            results = _work_or_fail(lambda b: self.attack_images(context, b), batch, self.methods)
            entries += [{"file": file.name, "records": {m: rows[i] for m, rows in results.items()}}
                        for i, file in enumerate(batch.files)]
        return entries

    def check_usable(self, context: Context, entries: dict[str, dict]) -> None:
        require_usable(*collect(entries, context.inputs.files), self.config.images)

    def write(self, context: Context, entries: dict[str, dict], complete: bool):
        records, skipped = collect(entries, context.inputs.files)
        return self.write_reports(context, records, skipped, complete)

    def seconds(self) -> float:
        return time.perf_counter() - self.began

    def attack_images(self, context: Context, batch: Batch) -> dict[str, list[dict]]:
        raise NotImplementedError

    def write_reports(self, context: Context, records: dict[str, list[dict]], skipped: list[dict], complete: bool):
        raise NotImplementedError


def _complete(report: Path) -> bool:
    try:
        return json.loads(report.read_text(encoding="utf-8")).get("complete", True) is not False
    except (OSError, ValueError, AttributeError):
        return True  # unreadable: never overwrite it without --force


def remove_run(out: Path) -> None:
    """`--force`: clear a previous run's outputs we own, nothing else.

    A stale adversary or report (an image since removed, a method not rerun) would otherwise
    sit next to the new report as if it belonged to it.
    """
    out = Path(out)
    for folder in [out] + [out / name for name in METHODS]:
        shutil.rmtree(folder / "adversaries", ignore_errors=True)
        (folder / REPORT).unlink(missing_ok=True)
    (out / COMPARISON).unlink(missing_ok=True)
