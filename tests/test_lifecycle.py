"""The run lifecycle (sia_cli.runs.lifecycle) with a plan of its own: no models, so every rule of a
run's life (resume, interruption, --force, lock, fingerprint) is checked in milliseconds. The
commands' own runs through it are tested end to end in test_cli_attack, test_augment,
test_reliability and test_distributed."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sia_cli.engine.speed import CPU_BATCH
from sia_cli.errors import INTERRUPTED, SiaError
from sia_cli.runs import lifecycle
from sia_cli.runs.inputs import RunConfig
from sia_cli.runs.journal import JOURNAL_PREFIX, RUN_STATE, OutputLock
from sia_cli.runs.lifecycle import LOCK, Context, Plan, execute

FILES = [f"{i:02d}.png" for i in range(10)]


class Counting(Plan):
    """Squares each file's number in units of `batch_size`; the output is result.json."""

    what = "test run"

    def __init__(self, stop_at: int | None = None, setting: str = "a", fail_load: bool = False):
        self.stop_at, self.setting, self.fail_load = stop_at, setting, fail_load
        self.worked: list[str] = []
        self.cleared = 0
        self.writes: list[bool] = []
        self.context: Context | None = None

    def finished(self, out: Path) -> Path | None:
        path = out / "result.json"
        return path if path.exists() and json.loads(path.read_text())["complete"] else None

    def load(self, config, device, progress):
        if self.fail_load:
            raise SiaError("bad input")
        return SimpleNamespace(backbone=torch.nn.Identity(), target=torch.nn.Identity(), files=FILES)

    def fingerprint(self, context: Context) -> dict:
        return {"setting": self.setting}

    def clear(self, out: Path) -> None:
        self.cleared += 1
        (out / "result.json").unlink(missing_ok=True)

    def units(self, context: Context, done: dict[str, dict]):
        self.context = context
        todo = [name for name in FILES if name not in done]
        for start in range(0, len(todo), context.batch_size):
            yield todo[start:start + context.batch_size]

    def work(self, context: Context, unit: list[str]) -> list[dict]:
        if self.stop_at is not None and len(self.worked) >= self.stop_at:
            raise KeyboardInterrupt
        self.worked += unit
        return [{"file": name, "value": int(name[:2]) ** 2} for name in unit]

    def write(self, context: Context, entries: dict[str, dict], complete: bool):
        self.writes.append(complete)
        values = {name: entry["value"] for name, entry in sorted(entries.items())}
        (context.out / "result.json").write_text(json.dumps({"values": values, "complete": complete}))
        return values


def config(tmp_path: Path, **changes) -> RunConfig:
    base = RunConfig(model=Path("model.pt"), images=tmp_path / "images", out=tmp_path / "out", batch_size=3)
    return replace(base, **changes)


def result(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "result.json").read_text())


def test_a_run_works_every_unit_writes_once_and_leaves_no_journal(tmp_path):
    plan = Counting()
    values = execute(config(tmp_path), plan)
    assert values == {name: int(name[:2]) ** 2 for name in FILES}
    assert plan.worked == FILES and plan.writes == [True]
    out = tmp_path / "out"
    assert not list(out.glob(f"{JOURNAL_PREFIX}*")) and not (out / RUN_STATE).exists()


def test_the_config_stays_as_built_and_the_context_holds_what_the_run_decided(tmp_path):
    built = config(tmp_path, batch_size="auto")
    plan = Counting()
    execute(built, plan)
    assert built.batch_size == "auto" and built.device == "cpu"
    assert plan.context.batch_size == min(CPU_BATCH, len(FILES)) and plan.context.device == "cpu"
    with pytest.raises(AttributeError):
        built.batch_size = 4  # frozen: a run cannot write back into it


def test_ctrl_c_writes_what_is_finished_and_a_rerun_does_only_the_rest(tmp_path):
    interrupted = Counting(stop_at=6)
    with pytest.raises(SiaError) as caught:
        execute(config(tmp_path), interrupted)
    assert caught.value.exit_code == INTERRUPTED
    assert "interrupted after 6 of 10" in str(caught.value) and "rerun the same command" in str(caught.value)
    assert interrupted.writes == [False] and result(tmp_path)["complete"] is False
    assert list(result(tmp_path)["values"]) == FILES[:6]

    rerun = Counting()
    execute(config(tmp_path), rerun)
    assert rerun.worked == FILES[6:]
    assert result(tmp_path) == {"values": {name: int(name[:2]) ** 2 for name in FILES}, "complete": True}


def test_a_torn_journal_line_is_dropped_without_losing_the_lines_after_it(tmp_path):
    with pytest.raises(SiaError):
        execute(config(tmp_path), Counting(stop_at=3))
    journal = tmp_path / "out" / f"{JOURNAL_PREFIX}.0.jsonl"
    with open(journal, "a") as handle:
        handle.write('{"file": "03.png", "val')  # the process died writing this line
    second = Counting(stop_at=3)
    with pytest.raises(SiaError):
        execute(config(tmp_path), second)
    assert second.worked == FILES[3:6]  # 03 again: its line was torn
    third = Counting()
    execute(config(tmp_path), third)
    assert third.worked == FILES[6:]  # 04 and 05, appended after the torn line, were kept


def test_a_rerun_with_other_settings_is_refused_and_force_starts_over(tmp_path):
    with pytest.raises(SiaError):
        execute(config(tmp_path), Counting(stop_at=3))
    with pytest.raises(SiaError, match=r"other settings \(setting: a -> b\).*--force"):
        execute(config(tmp_path), Counting(setting="b"))
    forced = Counting(setting="b")
    execute(config(tmp_path, force=True), forced)
    assert forced.cleared == 1 and forced.worked == FILES


def test_a_finished_run_is_refused_and_a_failing_forced_rerun_keeps_it(tmp_path):
    execute(config(tmp_path), Counting())
    before = result(tmp_path)
    with pytest.raises(SiaError, match="holds a finished run .*--force"):
        execute(config(tmp_path), Counting())
    failing = Counting(fail_load=True)
    with pytest.raises(SiaError, match="bad input"):
        execute(config(tmp_path, force=True), failing)
    assert failing.cleared == 0 and result(tmp_path) == before


def test_a_second_run_into_a_locked_out_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    held = OutputLock(tmp_path / "out", LOCK, "other run").acquire()
    try:
        plan = Counting()
        with pytest.raises(SiaError, match="another test run is writing to"):
            execute(config(tmp_path), plan)
        assert plan.worked == []
    finally:
        held.release()


def test_a_bad_batch_size_fails_before_out_is_made(tmp_path):
    with pytest.raises(SiaError, match="--batch-size must be at least 1"):
        execute(config(tmp_path, batch_size=0), Counting())
    assert not (tmp_path / "out").exists()


def test_an_early_result_from_begin_ends_the_run_before_anything_is_cleared(tmp_path):
    class Done(Counting):
        def begin(self, context):
            return "nothing to do"

    plan = Done()
    assert execute(config(tmp_path, force=True), plan) == "nothing to do"
    assert plan.cleared == 0 and plan.worked == [] and not (tmp_path / "out" / RUN_STATE).exists()


def test_finish_runs_under_the_lock_after_the_writer_and_after_an_early_result(tmp_path):
    """`finish` (harden's before/after evaluation) sees what the writer returned, while the lock
    is still held, and runs too when `begin` found the work done."""
    class Finishing(Counting):
        def finish(self, context, result):
            with pytest.raises(SiaError, match="another test run is writing to"):
                OutputLock(context.out, LOCK, "test run").acquire()
            return {"finished": result}

    first = execute(config(tmp_path), Finishing())
    assert first == {"finished": result(tmp_path)["values"]}

    class Done(Finishing):
        def begin(self, context):
            return "nothing to do"

    assert execute(config(tmp_path, force=True), Done()) == {"finished": "nothing to do"}


def test_run_fingerprint_names_settings_flat_and_leaves_out_where_and_how_fast(tmp_path):
    attributes = ["Bangs", "Smiling"]
    target = SimpleNamespace(sha256="abc", describe=lambda: {"path": "m.pt", "kind": "binary", "sources": {}})
    backbone = SimpleNamespace(attributes=attributes, info=SimpleNamespace(name="bb", sha256="def"))
    inputs = SimpleNamespace(target=target, backbone=backbone, protected=torch.tensor([True, False]))
    slow = lifecycle.run_fingerprint(config(tmp_path), inputs)
    fast = lifecycle.run_fingerprint(config(tmp_path, batch_size=64, device="cuda", force=True), inputs)
    assert slow == fast
    assert slow["steps"] == 200 and slow["protect"] == ["Bangs"] and slow["model_sha256"] == "abc"
    assert slow["target"] == {"kind": "binary"}
    longer = lifecycle.run_fingerprint(config(tmp_path, settings=replace(config(tmp_path).settings, steps=5)), inputs)
    assert longer["steps"] == 5
