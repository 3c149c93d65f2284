"""`sia diagnose`: rank the attributes a model is sensitive to, with SDAR and reports."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from sia_cli.cli import options as o
from sia_cli.cli.common import (
    console,
    handle_errors,
    main_process,
    print_warnings,
    progress_enabled,
    rich_progress,
)
from sia_cli.jobs.diagnose import DiagnoseConfig
from sia_cli.jobs.diagnose import diagnose as run_diagnosis
from sia_cli.measures.sensitivity import shown_intervals
from sia_cli.measures.table import ATTRIBUTE_SHIFT, by_name
from sia_cli.reports.figures import edit_rate_text
from sia_cli.reports.html import explanation_sentence, headline_sentence, significant


@handle_errors
@o.with_model_options
def diagnose(
    model: Path = o.MODEL, images: Path = o.IMAGES, out: Path = o.OUT, gan: str = o.GAN,
    attrs_file: Path = o.ATTRS_FILE, protect: list[str] = o.PROTECT, protect_eps: float = o.PROTECT_EPS,
    mode: str = typer.Option(o.default(DiagnoseConfig, "mode"), "--mode", help="multi: SIA as in the paper; single: one attribute at a time (ZOOM-style)."),
    top_k: int = typer.Option(o.default(DiagnoseConfig, "top_k"), "--top-k", help="Attributes named in the summary."),
    group_by: list[str] = typer.Option(None, "--group-by", help="Repeat the sensitivity for images with and without this starting attribute."),
    bootstrap: int = typer.Option(o.default(DiagnoseConfig, "bootstrap"), "--bootstrap", help="Bootstrap resamples for confidence intervals (0: none)."),
    headline: str = typer.Option(None, "--headline", help="The measure that ranks: flip (multi mode's default), ablation or attribute_shift in multi mode; single in single mode."),
    steps: int = o.STEPS, eps: str = o.EPS, step_size: str = o.STEP_SIZE, eps_attr: str = o.EPS_ATTR,
    seed: int = o.SEED, batch_size: int = o.BATCH_SIZE, device: str = o.DEVICE, amp: str = o.AMP,
    compile: bool = o.COMPILE,
    labels: Path = o.LABELS, nme_threshold: float = o.NME,
    force: bool = o.FORCE, keep_lost: bool = o.KEEP_LOST, align: bool = o.ALIGN, no_progress: bool = o.NO_PROGRESS, config_file: Path = o.CONFIG,
    explanations: bool = o.EXPLANATIONS, explain_k: int = o.EXPLAIN_K, explain_epsilon: str = o.EXPLAIN_EPSILON,
    explain_steps: int = o.EXPLAIN_STEPS, explain_step_size: str = o.EXPLAIN_STEP_SIZE,
    explain_ig_steps: int = o.EXPLAIN_IG_STEPS,
    model_options: dict = None,
):
    """Find which attributes MODEL is sensitive to: report.json, sensitivity.png, grid.png, report.html."""
    config = o.build(DiagnoseConfig, locals())
    with rich_progress(progress_enabled(no_progress)) as progress:
        report = run_diagnosis(config, progress)
    if not main_process():
        return
    console.print(summary_table(report, top_k))
    console.print(headline_sentence(report), highlight=False, markup=False)
    if report.get("explanations"):
        console.print(explanation_sentence(report), highlight=False, markup=False)
    print_warnings(report)
    console.print("wrote", str(out / "report.html"), highlight=False, markup=False, soft_wrap=True)


def summary_table(report: dict, top_k: int) -> Table:
    headline = by_name(report["settings"]["headline"])
    key = headline.key
    shares, intervals = report[headline.normalized_key], shown_intervals(report)
    sdar_ci = intervals.get("sdar")
    lost = (report.get("backbone_fit") or {}).get("lost_in_reconstruction")
    title = (f"ASR {100 * report['attack_success_rate']:.1f} %   SDAR {report['sdar']:.4f}"
             + (f" [{sdar_ci['low']:.4f}, {sdar_ci['high']:.4f}]" if sdar_ci else "")
             + f"   ({report.get('measured_images', len(report['images']))} of {len(report['images'])} images measured"
             + (f"; {lost:.0%} lost in reconstruction" if lost else "") + ")")
    table = Table(title=title)
    edit = report.get("backbone", {}).get("edit_success") or {}
    blind = set(report.get("blind_spots") or [])
    headline_ci = intervals.get(key, {})
    total = sum(report[key].values()) or 1.0
    effect = report.get("effect") or {}
    unit = effect.get("unit") or "attribute units"
    floor = f", floor {significant(effect['floor'])} from the reconstruction alone" if effect.get("floor") is not None else ""
    withheld = report.get("ranking_withheld")
    table.caption = ((f"not ranked ({withheld}); listed by value. " if withheld else "")
                     + f"share: {key} (headline) as share of total, {_interval_caption(report, intervals)}; size: its raw "
                     f"value in {unit} (all attributes {significant(sum(report[key].values()))}{floor}); "
                     "edit: the backbone's edit success (* blind spot: a low value there means cannot tell)")
    for column in ("#", "attribute", "share", "interval", "size", ATTRIBUTE_SHIFT.label, "edit"):
        table.add_column(column, no_wrap=column != "attribute")
    # A withheld ranking (too few images, a model that hardly moves) lists by value, unnumbered.
    ranked = bool(report["ranking"])
    for rank, name in enumerate((report["ranking"] or report.get("by_value", []))[:top_k], start=1):
        ci = headline_ci.get(name)
        table.add_row(str(rank) if ranked else "-", name, f"{shares[name]:.3f}",
                      f"{ci['low'] / total:.2f}-{ci['high'] / total:.2f}" if ci else "",
                      significant(report[key][name]),
                      f"{report[ATTRIBUTE_SHIFT.normalized_key][name]:.3f}",
                      (edit_rate_text(edit[name]) if name in edit else "?") + ("*" if name in blind else ""))
    return table


def _interval_caption(report: dict, intervals: dict) -> str:
    if intervals:
        return "with its 95% BCa interval"
    evidence = report.get("evidence") or {}
    if evidence.get("enough") is False:
        return f"no interval below {evidence.get('minimum_images')} counted images"
    return "no interval (--bootstrap 0)"
