"""`sia diagnose`: which attributes the target is sensitive to, from SIA runs over a folder.

Multi mode runs SIA as in the paper and measures, per attribute, how far it moved (Eq. 2)
and how much its move mattered (counterfactual ablation); beside them, with no attack, how
much the model's output changes when the backbone draws each face again with one attribute
flipped (the headline). Single mode (ZOOM-style) lets one attribute move at a time and
measures the change in the model's output and flip rate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sia_cli.engine.attack import METHODS, ablation_effects, attack_batch, flip_effects
from sia_cli.engine.attribution import ExplanationSettings
from sia_cli.errors import SiaError
from sia_cli.inputs.align import align_inputs
from sia_cli.inputs.images import load_image
from sia_cli.jobs import explain
from sia_cli.measures import sensitivity as sens
from sia_cli.measures import table as measures_table
from sia_cli.progress import ProgressFn, silent
from sia_cli.reports.figures import grid_png, sensitivity_png, to_uint8
from sia_cli.reports.html import report_html
from sia_cli.runs.files import write_json_atomic
from sia_cli.runs.inputs import Batch, Inputs, RunConfig, clean_pass, load_inputs
from sia_cli.runs.lifecycle import Context, execute
from sia_cli.runs.plan import ImagePlan
from sia_cli.runs.records import REPORT, MethodRun, account_for_inputs, base_report, findings_trust


@dataclass(frozen=True)
class DiagnoseConfig(RunConfig):
    mode: str = "multi"
    top_k: int = 5
    group_by: tuple[str, ...] = ()
    bootstrap: int = 200
    headline: str | None = None  # a measure name (sia_cli.measures.table); None: the mode's default headline
    explanations: bool = False  # also measure how far the model's explanations move (sia_cli.jobs.explain)
    explanation: ExplanationSettings = field(default_factory=ExplanationSettings)

    def chosen_headline(self) -> str:
        return measures_table.headline_for(self.mode, self.headline)


def _multi(inputs: Inputs, batch, clean: dict, config: DiagnoseConfig):
    state = attack_batch(inputs.backbone, inputs.target, METHODS["sia"], batch.x0, batch.a0, clean["reference"],
                         config.settings, inputs.protected)
    effects = ablation_effects(inputs.backbone, inputs.target, state.x, state.a, batch.a0)
    return state, {"ablation": effects}


def _single(inputs: Inputs, batch, clean: dict, config: DiagnoseConfig):
    """All one-attribute attacks of a batch at once: row (i, k) may move attribute k only."""
    b, k = batch.a0.shape
    movable = torch.eye(k, dtype=torch.bool, device=batch.a0.device) & ~inputs.protected.to(batch.a0.device)
    a0 = batch.a0.repeat_interleave(k, dim=0)
    x0 = batch.x0.repeat_interleave(k, dim=0)
    reference = clean["reference"].repeat_interleave(k, dim=0)
    state = attack_batch(inputs.backbone, inputs.target, METHODS["attr"], x0, a0, reference, config.settings,
                         movable=movable.repeat(b, 1))
    # Measured against the reconstruction G(x, a0), not the clean image: otherwise the
    # reconstruction's own difference, the same for every k, swamps each attribute's effect.
    with torch.no_grad():
        start_out = inputs.target(clean["reconstruction"]).repeat_interleave(k, dim=0)
    start_label = inputs.target.reference(start_out)
    effect = inputs.target.distance(start_out, state.output).view(b, k) * movable.any(dim=1)
    flips = inputs.target.success(state.output, start_label, config.settings.nme_threshold).view(b, k)
    best = effect.argmax(dim=1) + torch.arange(b, device=effect.device) * k
    state.x, state.a, state.adversary, state.output = (t[best] for t in (x0, state.a, state.adversary, state.output))
    return state, {"single_effect": effect, "single_flip": flips & movable.any(dim=1)}


def _attach(records: list[dict], extras: dict) -> None:
    for key, values in extras.items():
        rows = values.detach().cpu()
        for record, row in zip(records, rows):
            if "error" in record:  # a failed image's numbers are NaN: they would only mislead
                continue
            record[key] = [bool(v) for v in row.tolist()] if row.dtype == torch.bool else [round(v, 6) for v in row.tolist()]


def diagnose(config: DiagnoseConfig, progress: ProgressFn = silent) -> dict | None:
    """Diagnose the model on the folder; write report.json, sensitivity.png, grid.png and report.html.
    Returns the report on rank 0 (None on other torchrun ranks)."""
    began = time.perf_counter()
    if config.mode not in measures_table.MODES:
        raise SiaError(f"--mode must be {' or '.join(measures_table.MODES)}, not {config.mode!r}")
    if not measures_table.may_rank(config.chosen_headline(), config.mode):
        raise SiaError(f"headline measure {config.chosen_headline()!r} does not fit --mode {config.mode}")
    if config.top_k < 1:
        raise SiaError(f"--top-k must be at least 1 (got {config.top_k})")
    if config.bootstrap < 0:
        raise SiaError(f"--bootstrap must be 0 (no intervals) or a positive number of resamples (got {config.bootstrap})")
    config = align_inputs(config, progress)
    return execute(config, DiagnosePlan(config, began), progress)


class DiagnosePlan(ImagePlan):
    """`sia diagnose`: SIA (multi) or one-attribute attacks (single) per batch, with the
    measures' raw material attached to each record; one report with the measures."""

    what = "sia diagnose"
    task = "diagnose"

    def __init__(self, config: DiagnoseConfig, began: float | None = None):
        super().__init__(config, began)
        self.run = MethodRun(METHODS["sia"] if config.mode == "multi" else METHODS["attr"], config.out)
        self.methods = (self.run.method.name,)

    def load(self, config: DiagnoseConfig, device: str, progress: ProgressFn) -> Inputs:
        inputs = load_inputs(config, device, progress)
        unknown = [g for g in config.group_by if g not in inputs.backbone.attributes]
        if unknown:
            raise SiaError(f"--group-by {', '.join(unknown)}: not a backbone attribute")
        if bool(inputs.protected.all()):  # before the attack, not after it: nothing would be left to measure
            raise SiaError(f"--protect names every attribute of the backbone ({len(inputs.protected)}): "
                           "nothing is left to measure; leave at least one unprotected")
        if config.explanations:
            explain.check_explainable(inputs.target, inputs.backbone.img_size, config.explanation, device)
        return inputs

    def rows_per_image(self, config: DiagnoseConfig, inputs: Inputs) -> int:
        return len(inputs.backbone.attributes) if config.mode == "single" else 1

    def attack_images(self, context: Context, batch: Batch) -> dict[str, list[dict]]:
        config, inputs = self.config, context.inputs
        clean = clean_pass(inputs, batch)
        state, extras = (_single if config.mode == "single" else _multi)(inputs, batch, clean, config)
        # The flip needs no attack: one computation for both modes.
        extras["flip"] = flip_effects(inputs.backbone, inputs.target, batch.x0, batch.a0, inputs.backbone.attributes)
        records = self.run.add(batch, inputs, clean, state, config.settings, config.keep_lost)
        _attach(records, extras)
        if config.explanations:
            fields, strips = explain.explain_batch(inputs.target, inputs.backbone, batch.x0, batch.a0,
                                                   clean["reference"], config.explanation, inputs.protected)
            for record, values in zip(records, fields):
                if "error" not in record:
                    record.update(values)
            explain.save_overlays(config.out, [inputs.adversary_names[f.name] for f in batch.files], strips)
        return {self.run.method.name: records}

    def write_reports(self, context: Context, records: dict[str, list[dict]], skipped: list[dict],
                      complete: bool) -> dict | None:
        self.run.records = records.get(self.run.method.name, [])
        if not any("error" not in r for r in self.run.records):
            return None
        report = _report(self.config, context, self.run, skipped, self.seconds(), complete)
        write_outputs(self.config, report, _telling(context.inputs, self.config.out, self.run.records), self.seconds)
        return report


def measures(records: list[dict], attributes: list[str], protected: list[str], mode: str) -> dict:
    """Every sensitivity measure of a set of records, raw and normalised."""
    found = measures_table.for_mode(mode)
    out = {measure.key: measure.function(records, attributes, protected) for measure in found}
    for measure in found:
        out[measure.normalized_key] = sens.normalize(out[measure.key])
    if mode == "single":
        out["flip_rate"] = sens.flip_rate(records, attributes, protected)
    out["sdar"] = sens.sdar(out[measures_table.ATTRIBUTE_SHIFT.key])  # SDAR is the paper's, on Eq. 2
    return out


def _report(config: DiagnoseConfig, context: Context, run: MethodRun, skipped: list, seconds: float,
            complete: bool) -> dict:
    inputs = context.inputs
    base = base_report(config, context)
    attributes, protected = base["attributes"], base["protected"]
    headline = config.chosen_headline()
    headline_key = measures_table.by_name(headline).key
    # The measures rest on the counted images (not lost in reconstruction, not already wrong);
    # when none is left they fall back to all, and a warning says so.
    counted = [r for r in run.records if "error" not in r and r.get("counted", True)]
    measured = counted or run.records
    found = measures(measured, attributes, protected, config.mode)
    report = {**base, **found, **run.summary()}
    report["settings"]["headline"] = headline
    report["settings"]["eq2_reference"] = "a0 (the starting attributes; the paper writes a_1)"
    report["settings"]["intervals"] = (f"BCa bootstrap over images, {config.bootstrap} resamples, 95% "
                                       "(bias-shifted percentile where the bias exceeds the interval)")
    report["measured_images"] = sum("error" not in r for r in measured)
    report["intervals"] = _intervals(measured, attributes, protected, config)
    report["evidence"] = {"counted_images": len(counted), "minimum_images": sens.MIN_COUNTED_IMAGES,
                          "enough": sens.enough_images(len(counted))}
    report["effect"] = _effect(measured, found, headline, inputs.target.task.effect_unit, (attributes, protected), config)
    # Too few images, or a model that hardly moves, ranks nobody: the order of the point values
    # stays in `by_value` for whoever draws the table, `ranking` is empty and says why.
    report["by_value"] = sens.ranking(found[headline_key])
    report["ranking_withheld"] = _ranking_withheld(report["evidence"], report["effect"])
    report["ranking"] = [] if report["ranking_withheld"] else report["by_value"]
    report["stands_out"] = None
    if not report["ranking_withheld"]:
        report["stands_out"] = sens.stands_out(found[headline_key], report["intervals"].get(headline_key),
                                               len(counted))
    report["groups"] = _groups(measured, attributes, protected, config)
    if config.explanations:
        size = inputs.backbone.img_size
        report["explanations"] = explain.explanation_report(run.records, attributes, protected, config.explanation,
                                                            size * size, config.bootstrap, config.seed)
    report.update(findings_trust(inputs, run.records, grouped=bool(config.group_by),
                                 measures_include_lost=not counted, aligned=config.align))
    report.update(images=run.records, skipped=skipped, timing={"total_s": round(seconds, 3)}, complete=complete)
    account_for_inputs(report, config)
    return report


def _ranking_withheld(evidence: dict, effect: dict) -> str | None:
    if not evidence["enough"]:
        return (f"too few images: {evidence['counted_images']} counted, a ranking needs "
                f"{evidence['minimum_images']}")
    if effect.get("moves") is False:
        if effect["largest"] > effect["floor"]:
            return "no edit moves the model clearly more than the reconstruction alone, within chance on these images"
        return "the model hardly moves under any edit: no edit moves it more than the reconstruction alone"
    return None


def _effect(records: list[dict], found: dict, headline: str, unit: str, columns: tuple, config: DiagnoseConfig) -> dict:
    """How much the headline measure moves the model, in its output units, against the floor
    the reconstruction alone sets (sensitivity.effect_size), beyond chance where intervals are
    drawn; Eq. 2 moves attributes, so it has neither a unit of the model nor a floor."""
    measure = measures_table.by_name(headline)
    if not measure.in_output_units:
        return {"measure": measure.name, "unit": "attribute units", "moves": None}
    excess = None
    if config.bootstrap > 0:
        attributes, protected = columns
        excess = sens.bootstrap(records, sens.excess_over_floor(
            lambda r: measure.function(r, attributes, protected)), n=config.bootstrap, seed=config.seed)
    size = sens.effect_size(found[measure.key], sens.reconstruction_floor(records), excess)
    return {"measure": measure.name, "unit": unit, **size,
            "floor_source": "mean change of the model's output under the reconstruction G(x0, a0) alone",
            "moves_rule": ("the largest clears the floor: the low end of the 95% interval of largest - floor above 0"
                           if "excess_interval" in size else "the largest clears the floor")}


def _intervals(records, attributes, protected, config: DiagnoseConfig) -> dict:
    if config.bootstrap <= 0:
        return {}
    out = {
        measure.key: sens.bootstrap(records, lambda r, function=measure.function: function(r, attributes, protected),
                                    n=config.bootstrap, seed=config.seed)
        for measure in measures_table.for_mode(config.mode)
    }
    shift = measures_table.ATTRIBUTE_SHIFT.function
    out["sdar"] = sens.bootstrap(records, lambda r: sens.sdar(shift(r, attributes, protected)),
                                 n=config.bootstrap, seed=config.seed)
    return out


def _groups(records, attributes, protected, config: DiagnoseConfig) -> dict:
    groups = {}
    headline = measures_table.by_name(config.chosen_headline())
    for attribute in config.group_by:
        for name, members in sens.group_split(records, attributes, attribute).items():
            if members:
                found = measures(members, attributes, protected, config.mode)
                groups[name] = {"images": len(members), "sdar": found["sdar"],
                                "sensitivity_normalized": found[headline.normalized_key]}
    return groups


@torch.no_grad()
def _telling(inputs: Inputs, out: Path, records: list[dict], count: int = 8) -> list[dict]:
    """Grid rows of the most telling images (fooled, then attributes moved furthest), rebuilt
    from the records and the saved adversaries, so a resumed or distributed run draws the same."""
    def score(record: dict) -> tuple:
        moved = max(abs(e - s) for e, s in zip(record["attrs_end"], record["attrs_start"]))
        return record["success"], moved

    best = sorted((r for r in records if "error" not in r), key=score, reverse=True)[:count]
    if not best:
        return []
    paths = {file.name: file for file in inputs.files}
    size = inputs.backbone.img_size
    x0 = torch.stack([load_image(paths[r["file"]], size) for r in best]).to(next(inputs.backbone.parameters()).device)
    a0 = torch.tensor([r["attrs_start"] for r in best], dtype=torch.float32, device=x0.device)
    reconstruction = (inputs.backbone(x0 * 2 - 1, a0) + 1) / 2
    rows = []
    for i, record in enumerate(best):
        strip_file = out / explain.OVERLAYS / inputs.adversary_names[record["file"]]
        overlays = {}
        if strip_file.is_file():
            with Image.open(strip_file) as strip:
                overlays = explain.overlay_panels(np.asarray(strip.convert("RGB")))
        with Image.open(out / "adversaries" / inputs.adversary_names[record["file"]]) as adversary:
            rows.append({
                **overlays,
                "explanation_caption": explain.overlay_caption(record),
                "file": record["file"],
                "original": to_uint8(x0[i].cpu()),
                "reconstruction": to_uint8(reconstruction[i].cpu()),
                "adversary": np.asarray(adversary.convert("RGB")),
                "caption": f"{_short(record['pred_clean'])} -> {_short(record['pred_adv'])}"
                           f"{' (success)' if record['success'] else ''}"
                           f"{' (lost in reconstruction)' if record.get('lost_in_reconstruction') else ''}",
            })
    return rows


def _short(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)[:24]


def write_outputs(config: DiagnoseConfig, report: dict, telling: list[dict], seconds=None) -> None:
    """report.json, the histogram, the grid of the most telling images and the HTML page.
    `seconds()`, when given, times the run once the figures are drawn, into report.json."""
    out = config.out
    headline = measures_table.by_name(report["settings"]["headline"])
    intervals = sens.shown_intervals(report).get(headline.key)
    sensitivity_png(out / "sensitivity.png", report[headline.normalized_key],
                    _normalised_intervals(intervals, report[headline.key]),
                    title=f"{headline.key} (share of total)" + ("; not ranked" if report.get("ranking_withheld") else ""),
                    edit_success=report["backbone"].get("edit_success"), blind_spots=report.get("blind_spots") or (),
                    leader=report.get("stands_out"))
    grid_png(out / "grid.png", telling)
    figures = explain.write_figures(out, report, telling) if report.get("explanations") else {}
    if seconds is not None:
        report["timing"]["total_s"] = round(seconds(), 3)
    write_json_atomic(out / REPORT, report)
    report_html(out / "report.html", report, out / "sensitivity.png", out / "grid.png", top_k=config.top_k,
                explanation_figures=figures)


def _normalised_intervals(intervals: dict | None, raw: dict) -> dict | None:
    """Bootstrap intervals of raw values, scaled like the bars (share of the point total)."""
    if not intervals:
        return None
    total = sum(raw.values()) or 1.0
    return {k: {"low": v["low"] / total, "high": v["high"] / total} for k, v in intervals.items() if k in raw}
