"""`sia harden`'s before/after evaluation: full diagnose and attack reports of the model before
and after on held-out images, and the summary (paper Tables 4 and 5) they give."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from sia_cli import __version__
from sia_cli.engine.attribution import ExplanationSettings
from sia_cli.progress import ProgressFn
from sia_cli.runs.distributed import World, barrier
from sia_cli.runs.files import file_sha256, write_json_atomic
from sia_cli.runs.inputs import RunConfig

EVAL_METHODS = ("fgsm", "pgd", "sia")  # the paper's Table 4 columns


EVAL_EPS = (1.5 / 255, 4 / 255)  # and its two pixel budgets


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def evaluate(config, model: Path, folder: Path, world: World, progress: ProgressFn, explanations: bool = False) -> dict:
    """Clean accuracy, accuracy under FGSM, PGD and SIA at the paper's eps (Table 4), SDAR and
    the headline sensitivity (Table 5) of `model` on --eval-images, each from a full report
    (diagnose, attack) under `folder`. A report there from the same model and evaluation
    settings is read (or resumed), not redone; one from others is removed first."""
    from sia_cli.jobs.attack import attack
    from sia_cli.jobs.diagnose import DiagnoseConfig, diagnose

    steps = config.eval_steps or config.settings.steps
    base = {name: getattr(config, name) for name in (
        "gan", "protect", "batch_size", "device", "seed", "model_options", "keep_lost")}
    base.update(model=model, images=config.eval_images, attrs_file=config.eval_attrs_file, labels=config.eval_labels,
                command=config.command)
    settings = replace(config.settings, steps=steps)
    explanation = getattr(config, "explanation", None) or ExplanationSettings()
    _keep_if_same(folder, {**_evaluation_key(base, settings), "explanations": explanations and asdict(explanation)},
                  world)
    diagnosis = _finished_or(folder / "diagnosis" / "report.json", lambda: diagnose(
        DiagnoseConfig(**base, out=folder / "diagnosis", settings=settings, explanations=explanations,
                       explanation=explanation), progress))
    robust = {}
    clean_accuracy = None
    for eps in EVAL_EPS:
        name = f"{eps * 255:g}/255"
        where = folder / f"attack-eps{eps * 255:g}"
        reports = {}
        for method in EVAL_METHODS:
            reports[method] = _finished(where / method / "report.json")
        if any(report is None for report in reports.values()):
            result = attack(RunConfig(**base, out=where, methods=EVAL_METHODS, settings=replace(settings, eps=eps)),
                            progress)
            reports = (result or {}).get("reports") or {m: _read_json(where / m / "report.json") for m in EVAL_METHODS}
        for method, report in reports.items():
            if report is None:
                continue
            usable = [r for r in report["images"] if "error" not in r]
            robust.setdefault(method, {})[name] = (
                float(np.mean([not r["success_vs_label"] for r in usable])) if usable else None)
            if clean_accuracy is None and config.eval_labels and usable:
                clean_accuracy = float(np.mean([not r["already_wrong"] for r in usable]))
    return {
        "model": str(model), "model_sha256": file_sha256(model),
        "clean_accuracy": clean_accuracy,
        "accuracy_under_attack": robust,
        "reference": "--eval-labels" if config.eval_labels else "each model's own clean prediction",
        "sdar": diagnosis.get("sdar") if diagnosis else None,
        "headline": diagnosis.get("settings", {}).get("headline") if diagnosis else None,
        "sensitivity": _headline_shares(diagnosis),
        "stands_out": diagnosis.get("stands_out") if diagnosis else None,
        "backbone_fit_ok": (diagnosis.get("backbone_fit") or {}).get("ok") if diagnosis else None,
        "attributional": _attributional(diagnosis),
        "report": str(folder / "diagnosis" / "report.json"),
        "images": len(diagnosis["images"]) if diagnosis else 0,
    }


def _attributional(report: dict | None) -> dict | None:
    """The diagnosis's explanation measures (`--explanations`), where it has them."""
    section = (report or {}).get("explanations")
    if not section or not section.get("attack"):
        return None
    return {"top_k_intersection": section["attack"]["top_k_intersection"], "kendall_tau": section["attack"]["kendall_tau"],
            "images": section["attack"]["images"],
            # only attributes measured on enough faces (`ranking`): the rest would mean more than they do
            "explanation_sensitivity": {name: section["sensitivity"][name] for name in section.get("ranking") or []},
            "explanation_stands_out": section.get("stands_out")}


def _evaluation_key(base: dict, settings) -> dict:
    """What an evaluation folder's reports depend on: the model's and every input file's bytes,
    the options, the attack settings."""
    key = {name: str(value) for name, value in sorted(base.items())}
    for name in ("model", "attrs_file", "labels"):
        if base.get(name) is not None:
            key[f"{name}_sha256"] = file_sha256(Path(base[name]))
    key["images"] = str(Path(base["images"]).resolve())
    key["settings"] = json.loads(json.dumps(asdict(settings), default=str))
    return key


def _keep_if_same(folder: Path, key: dict, world: World) -> None:
    """Remove `folder` when it holds an evaluation made with other settings than `key` (a resumed
    hardening may change --eval-*), so that before/ and after/ always cover the same faces."""
    if world.main:
        record = folder / "evaluation.json"
        if folder.exists() and _read_json(record) != key:
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(record, key)
    barrier(world)


def _finished(path: Path) -> dict | None:
    report = _read_json(path)
    return report if report is not None and report.get("complete", True) is not False else None


def _finished_or(path: Path, run):
    """The finished report at `path`, or `run()`'s (None on other torchrun ranks: read it then)."""
    report = _finished(path)
    if report is not None:
        return report
    made = run()
    return made if made is not None else _read_json(path)


def _headline_shares(report: dict | None) -> dict | None:
    if not report:
        return None
    from sia_cli.measures.table import report_key

    return report.get(f"{report_key(report.get('settings', {}).get('headline'))}_normalized")


def _summary(config, trained: dict | None, before: dict | None, after: dict | None) -> dict:
    return {
        "version": __version__, "command": config.command, "complete": True,
        "model": str(config.model), "hardened_model": (trained or {}).get("model"),
        "method": config.methods[0], "epochs": config.epochs, "lr": config.lr, "mix": config.mix,
        "labels": (trained or {}).get("labels", "--labels" if config.labels else "the model's own predictions"),
        "mode": (trained or {}).get("mode"),
        "training": {k: (trained or {}).get(k) for k in ("steps", "losses", "resumed_from")},
        "eval_eps": [f"{eps * 255:g}/255" for eps in EVAL_EPS],
        "before": before, "after": after,
    }
