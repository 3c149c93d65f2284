"""`sia attack`'s engine: every requested method on every batch, one report per method (and a
comparison), run by `sia_cli.runs.lifecycle` as an `ImagePlan`."""

from __future__ import annotations

import time

from sia_cli.engine.attack import METHODS, attack_batch, get_method
from sia_cli.errors import SiaError
from sia_cli.inputs.align import align_inputs
from sia_cli.progress import ProgressFn, silent
from sia_cli.runs.files import write_json_atomic
from sia_cli.runs.inputs import Batch, RunConfig, clean_pass
from sia_cli.runs.lifecycle import Context, execute
from sia_cli.runs.plan import ImagePlan
from sia_cli.runs.records import COMPARISON, REPORT, MethodRun, account_for_inputs, base_report, findings_trust


class AttackPlan(ImagePlan):
    """`sia attack`: every requested method on every batch, one report per method."""

    what = "sia attack"
    task = "attack"

    def __init__(self, config: RunConfig, began: float | None = None):
        super().__init__(config, began)
        # Each method once: `sia,sia` would otherwise record every image twice.
        self.chosen = [get_method(name) for name in dict.fromkeys(config.methods)]
        if not self.chosen:
            raise SiaError("--method names no method: choose from " + ", ".join(METHODS))
        self.methods = tuple(m.name for m in self.chosen)
        single = len(self.chosen) == 1
        self.runs = {m.name: MethodRun(m, config.out if single else config.out / m.name) for m in self.chosen}

    def attack_images(self, context: Context, batch: Batch) -> dict[str, list[dict]]:
        config, inputs = self.config, context.inputs
        clean = clean_pass(inputs, batch)  # once for every method
        results = {}
        for method in self.chosen:
            state = attack_batch(inputs.backbone, inputs.target, method, batch.x0, batch.a0, clean["reference"],
                                 config.settings, inputs.protected, seed=config.seed + batch.index)
            results[method.name] = self.runs[method.name].add(batch, inputs, clean, state, config.settings,
                                                              config.keep_lost)
        return results

    def write_reports(self, context: Context, records: dict[str, list[dict]], skipped: list[dict], complete: bool):
        for name, run in self.runs.items():
            run.records = records.get(name, [])
        reports = {name: _method_report(self.config, context, run, skipped, self.seconds(), complete)
                   for name, run in self.runs.items() if run.records}
        for name, report in reports.items():
            write_json_atomic(self.runs[name].folder / REPORT, report)
        if len(self.runs) > 1 and complete:
            comparison = {name: {k: r[k] for k in ("attack_success_rate", "psnr", "ssim")}
                          for name, r in reports.items()}
            images = len(next(iter(self.runs.values())).records)
            write_json_atomic(self.config.out / COMPARISON, {"methods": comparison, "images": images})
        return {"reports": reports, "skipped": skipped, "seconds": self.seconds()} if reports else None


def attack(config: RunConfig, progress: ProgressFn = silent) -> dict:
    """Run every requested method over the folder; write adversaries and reports into `out`.
    Returns the reports on rank 0 (None on other torchrun ranks)."""
    began = time.perf_counter()
    config = align_inputs(config, progress)
    return execute(config, AttackPlan(config, began), progress)


def _method_report(config: RunConfig, context: Context, run: MethodRun, skipped: list, seconds: float,
                   complete: bool = True) -> dict:
    inputs = context.inputs
    report = {
        **base_report(config, context),
        "method": run.method.name,
        "method_summary": run.method.summary,
        **run.summary(),
        **findings_trust(inputs, run.records, aligned=config.align),
        "images": run.records,
        "skipped": skipped,
        "timing": {"total_s": round(seconds, 3)},
        "complete": complete,
    }
    account_for_inputs(report, config)
    return report
