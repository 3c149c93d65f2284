"""What a run has finished, kept on disk so an interrupted run resumes where it stopped.

Each rank appends one JSON line per image it finished (or skipped) to a journal of its own,
after the image's files are in place, so a line never points at a missing adversary. A rerun
with the same settings reads every rank's journal and attacks only the rest, whatever the
number of processes this time. The lock keeps two runs out of one folder.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from sia_cli.errors import SiaError
from sia_cli.runs.distributed import World, agree, all_gather, barrier
from sia_cli.runs.files import write_json_atomic, write_text_atomic
from sia_cli.text import first_few

RUN_STATE = ".sia-run.json"  # the settings a resumed run must match
JOURNAL_PREFIX = ".sia-progress"


class OutputLock:
    """An advisory lock on a file in `out`, held by rank 0 for the whole run."""

    def __init__(self, out: Path, name: str, what: str):
        self.path, self.what, self.handle = Path(out) / name, what, None

    def acquire(self) -> "OutputLock":
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform: go on unguarded
            return self
        handle = open(self.path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise SiaError(f"another {self.what} is writing to {self.path.parent}; wait for it or pick another --out") from None
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing drops the lock
            self.handle = None


@contextlib.contextmanager
def locked(out: Path, name: str, what: str, world: World):
    """Hold the lock on rank 0; every rank fails alike when another run holds it."""
    lock = agree(lambda: OutputLock(out, name, what).acquire() if world.main else None, world)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def journal_files(out: Path) -> list[Path]:
    return sorted(Path(out).glob(f"{JOURNAL_PREFIX}.*.jsonl"))


def append_lines(path: Path, rows: list[dict]) -> None:
    """Append `rows` as JSON lines, on disk (fsync) before returning."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in rows))
        handle.flush()
        os.fsync(handle.fileno())


def read_lines(path: Path) -> list[dict]:
    """The JSON objects of a journal that names a file; a torn last line (the run died writing
    it) is dropped."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            if isinstance(row, dict) and isinstance(row.get("file"), str):
                rows.append(row)
    return rows


def read_entries(out: Path) -> dict[str, dict]:
    """Every journal's entries by file name."""
    return {entry["file"]: entry for path in journal_files(out) for entry in read_lines(path)}


class Journal:
    """This rank's journal, plus everything any rank finished before (`done`)."""

    def __init__(self, out: Path, world: World, done: dict[str, dict]):
        self.world = world
        self.path = Path(out) / f"{JOURNAL_PREFIX}.{world.rank}.jsonl"
        self.done = done
        self.new: dict[str, dict] = {}

    def append(self, entries: list[dict]) -> None:
        """Record finished images: one write and one fsync per batch, not per image."""
        if not entries:
            return
        append_lines(self.path, entries)
        self.new.update((entry["file"], entry) for entry in entries)

    def gather(self) -> dict[str, dict]:
        """Everything finished, by every rank, now and before: the same on every rank."""
        merged = dict(self.done)
        for part in all_gather(self.new, self.world):
            merged.update(part)
        return merged


def open_journal(out: Path, fingerprint: dict, world: World) -> Journal:
    """Check a partial run in `out` has these settings, record them, and load what it finished.

    Rank 0 first rewrites every rank's journal into its own, without a line torn by the
    interruption: a line appended after a torn one would be glued to it and lost."""

    def check() -> dict[str, dict]:
        state_path = Path(out) / RUN_STATE
        entries = read_entries(out)
        if entries:
            refuse_changed(out, _read_state(state_path), fingerprint)
        return entries

    done: dict[str, dict] = {}
    # Every rank must see the same `done`, even where the folder is not shared across nodes.
    for part in all_gather(agree(check, world), world):
        done.update(part)
    if world.main:
        write_json_atomic(Path(out) / RUN_STATE, fingerprint)
        _compact(out, done)
    barrier(world)  # no rank appends before the journals are rewritten
    return Journal(out, world, done)


def _compact(out: Path, entries: dict[str, dict]) -> None:
    paths = journal_files(out)
    if not paths:
        return
    write_text_atomic(Path(out) / f"{JOURNAL_PREFIX}.0.jsonl", "".join(json.dumps(e) + "\n" for e in entries.values()))
    for path in paths:
        if path.name != f"{JOURNAL_PREFIX}.0.jsonl":
            path.unlink(missing_ok=True)


def refuse_changed(out: Path, before: dict, now: dict) -> None:
    """One message for a rerun whose settings differ from the run it would continue; it names
    the first changed settings with their old and new values."""
    changed = sorted(key for key in before.keys() | now.keys() if before.get(key) != now.get(key))
    if changed:
        shown = first_few((f"{key}: {_short(before.get(key))} -> {_short(now.get(key))}" for key in changed), 3)
        raise SiaError(f"{out} holds a partial or finished run with other settings ({shown}); "
                       "rerun it with the same settings to resume, or pass --force to start over")


def _short(value) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def close_run(out: Path) -> None:
    """Once the final report is written the journals have served: remove them."""
    for path in journal_files(out):
        path.unlink(missing_ok=True)
    (Path(out) / RUN_STATE).unlink(missing_ok=True)
