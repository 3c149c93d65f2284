"""`sia sdar`: the bias score as a CI gate (exit 0 at or under --max, 1 above, 2 on errors,
4 when the report's backbone does not fit its images and --allow-unfit is not given, 5 when it
counted too few images for a finding and --allow-few-images is not given)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer
from rich.table import Table

from sia_cli.cli import options as o
from sia_cli.cli.common import console, handle_errors, print_warnings, progress_enabled, rich_progress
from sia_cli.errors import FEW_IMAGES, UNFIT, SiaError
from sia_cli.jobs.diagnose import DiagnoseConfig, diagnose
from sia_cli.measures.sensitivity import attribute_shift, compare, paired_difference
from sia_cli.measures.sensitivity import sdar as sdar_of
from sia_cli.measures.table import report_key


def read_report(path: Path) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SiaError(f"report not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SiaError(f"cannot read {path} as a JSON report: {exc}") from None
    if not isinstance(report, dict) or "sdar" not in report:
        raise SiaError(f"{path} has no 'sdar': not a report written by `sia diagnose`")
    if report.get("complete") is False:
        raise SiaError(f"{path} is an incomplete run; finish it before gating on it")
    if not _finite(report.get("sdar")):
        raise SiaError(f"{path} holds no finite SDAR ({report.get('sdar')!r}): nothing to gate on")
    return report


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def refuse_unfit(report: dict, path: Path | str) -> None:
    """A gate fails closed: a report whose backbone does not fit its images (or never said) cannot pass."""
    fit = report.get("backbone_fit")
    if not isinstance(fit, dict):
        raise SiaError(f"{path} has no backbone_fit (written by an older sia?): rerun `sia diagnose`, "
                       "or pass --allow-unfit to gate on it anyway", UNFIT)
    if fit.get("ok") is not True:
        why = "; ".join(fit.get("reasons") or []) or "backbone fit not ok"
        raise SiaError(f"the backbone does not fit the images of {path} ({why}): SDAR there describes the "
                       "backbone as much as the model; pass --allow-unfit to gate on it anyway", UNFIT)


def refuse_few(report: dict, path: Path | str) -> None:
    """Nor can a report whose SDAR rests on too few images (or that never said how many)."""
    evidence = report.get("evidence")
    if not isinstance(evidence, dict):
        raise SiaError(f"{path} does not say how many images it counted (written by an older sia?): rerun "
                       "`sia diagnose`, or pass --allow-few-images to gate on it anyway", FEW_IMAGES)
    if evidence.get("enough") is not True:
        raise SiaError(f"{path} counted {evidence.get('counted_images')} image(s), fewer than the "
                       f"{evidence.get('minimum_images')} a finding needs: diagnose more images, or pass "
                       "--allow-few-images to gate on it anyway", FEW_IMAGES)


@handle_errors
@o.with_model_options
def sdar(
    source: Path = typer.Argument(..., help="A report.json from `sia diagnose`, or a model to diagnose now."),
    max_sdar: float = typer.Option(None, "--max", help="Exit 1 when SDAR is above this."),
    baseline: Path = typer.Option(
        None, "--baseline",
        help="Another report.json: print the per-attribute change and, on the same images, the paired SDAR "
             "difference with its interval."),
    allow_unfit: bool = typer.Option(
        False, "--allow-unfit",
        help=f"Gate even when the report's backbone_fit is not ok (otherwise exit {UNFIT})."),
    allow_few_images: bool = typer.Option(
        False, "--allow-few-images",
        help=f"Gate even when the report counted fewer images than a finding needs (otherwise exit {FEW_IMAGES})."),
    images: Path = typer.Option(None, "--images", help="With a model: images to diagnose."),
    out: Path = o.OUT, gan: str = o.GAN, attrs_file: Path = o.ATTRS_FILE, protect: list[str] = o.PROTECT,
    protect_eps: float = o.PROTECT_EPS, steps: int = o.STEPS, eps: str = o.EPS, step_size: str = o.STEP_SIZE,
    eps_attr: str = o.EPS_ATTR, batch_size: int = o.BATCH_SIZE, device: str = o.DEVICE, amp: str = o.AMP,
    compile: bool = o.COMPILE, seed: int = o.SEED, labels: Path = o.LABELS, nme_threshold: float = o.NME,
    keep_lost: bool = o.KEEP_LOST, align: bool = o.ALIGN, force: bool = o.FORCE,
    no_progress: bool = o.NO_PROGRESS, config_file: Path = o.CONFIG,
    model_options: dict = None,
):
    """Print SDAR (standard deviation of attribute sensitivity, paper 4.4.1) and gate on --max."""
    if max_sdar is not None and not (math.isfinite(max_sdar) and max_sdar >= 0):  # before any diagnosis
        raise SiaError(f"--max must be a finite non-negative number (got {max_sdar})")
    if source.suffix.lower() == ".json":
        report = read_report(source)
    else:
        if images is None:
            raise SiaError("a model needs --images to diagnose (or pass a report.json)")
        config = o.build(DiagnoseConfig, locals())
        with rich_progress(progress_enabled(no_progress)) as progress:
            report = diagnose(config, progress)
        # From here the gate speaks of the report, which a retry reads instead of diagnosing again
        # (a rerun into the same --out is refused as a finished run).
        source = Path(out) / "report.json"
        console.print(f"diagnosis written to {source}", markup=False, highlight=False, soft_wrap=True)
    interval = report.get("intervals", {}).get("sdar")
    text = f"SDAR {report['sdar']:.5f}" + (f" (95% interval {interval['low']:.5f} to {interval['high']:.5f})" if interval else "")
    if baseline is not None:
        before = read_report(baseline)
        refuse_incomparable(before, report, baseline)
        console.print(change_table(before, report))
        console.print(paired_text(before, report), highlight=False, markup=False)
    print_warnings(report)
    if max_sdar is None:
        console.print(text)
        return
    if not allow_unfit:
        refuse_unfit(report, source)
    if not allow_few_images:
        refuse_few(report, source)
    above = report["sdar"] > max_sdar
    console.print(f"{text} {'>' if above else '<='} max {max_sdar}: {'FAIL' if above else 'ok'}", highlight=False)
    raise typer.Exit(1 if above else 0)


# What makes two SDARs comparable: the same backbone editing the same attributes, attacked alike.
# amp is left out: bf16 changes the arithmetic, not the attack.
ATTACK_SETTINGS = ("steps", "eps", "step_size", "eps_attr", "attr_step_size", "protect_eps", "nme_threshold")


def comparison_basis(report: dict) -> dict:
    settings = report.get("settings") or {}
    attack = settings.get("settings") or {}
    basis = {"backbone": (report.get("backbone") or {}).get("sha256"), "attributes": report.get("attributes"),
             "protected": report.get("protected"), "methods": settings.get("methods"), "mode": settings.get("mode")}
    return {**basis, **{name: attack.get(name) for name in ATTACK_SETTINGS}}


def refuse_incomparable(before: dict, after: dict, path: Path | str) -> None:
    """A comparison fails closed as the gate does: SDAR scales with the attack's budget and
    depends on the backbone, so a difference between runs that differ there is no finding."""
    old, new = comparison_basis(before), comparison_basis(after)
    differ = [name for name in new if old[name] != new[name]]
    if differ:
        shown = "; ".join(f"{name} {_short(old[name])} -> {_short(new[name])}" for name in differ[:3])
        raise SiaError(f"cannot compare with the baseline {path}: the runs differ in {shown}"
                       f"{' and more' if len(differ) > 3 else ''}; SDARs compare only under the same backbone, "
                       "attributes and attack settings")


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str) and len(value) > 12:
        return value[:12] + "..."
    return str(value)


def paired_text(before: dict, after: dict) -> str:
    """The SDAR change between two reports on the same images, with a paired bootstrap interval."""
    attributes = after.get("attributes") or []
    protected = after.get("protected") or []

    def statistic(records):
        return sdar_of(attribute_shift(records, attributes, protected))

    try:
        counted = [[r for r in report.get("images") or [] if r.get("counted", True)] for report in (before, after)]
        result = paired_difference(*counted, statistic,
                                   seed=int(after.get("settings", {}).get("seed", 0) or 0))
    except SiaError as exc:
        return f"paired SDAR difference: not computed ({exc})"
    verdict = "significant" if result["significant"] else "not significant (the interval contains 0)"
    return (f"paired SDAR difference (this - baseline) on {result['images']} shared images: "
            f"{result['difference']:+.5f}, 95% interval [{result['low']:+.5f}, {result['high']:+.5f}]: {verdict}")


def change_table(before: dict, after: dict) -> Table:
    key = report_key(after.get("settings", {}).get("headline"))
    table = Table(title=f"{key} share: baseline -> this report   (SDAR {before['sdar']:.5f} -> {after['sdar']:.5f})")
    for column in ("attribute", "baseline", "now", "change"):
        table.add_column(column)
    rows = compare(before.get(f"{key}_normalized", {}), after.get(f"{key}_normalized", {}))
    for name, old, new, delta in sorted(rows, key=lambda r: -abs(r[3]) if r[3] == r[3] else 0):
        table.add_row(name, f"{old:.3f}", f"{new:.3f}", f"{delta:+.3f}")
    return table
