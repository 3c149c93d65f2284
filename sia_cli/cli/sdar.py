"""`sia sdar`: the bias score as a CI gate (exit 0 at or under --max, 1 above, 2 on errors)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.table import Table

from sia_cli.cli import options as o
from sia_cli.cli.common import console, handle_errors, progress_enabled, rich_progress
from sia_cli.devices import pick_device
from sia_cli.diagnosis import MEASURES, DiagnoseConfig, diagnose
from sia_cli.errors import SiaError
from sia_cli.sensitivity import compare


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
    return report


@handle_errors
def sdar(
    source: Path = typer.Argument(..., help="A report.json from `sia diagnose`, or a model to diagnose now."),
    max_sdar: float = typer.Option(None, "--max", help="Exit 1 when SDAR is above this."),
    baseline: Path = typer.Option(None, "--baseline", help="Another report.json: print the per-attribute change."),
    images: Path = typer.Option(None, "--images", help="With a model: images to diagnose."),
    out: Path = o.OUT, gan: str = o.GAN, attrs_file: Path = o.ATTRS_FILE, protect: list[str] = o.PROTECT,
    steps: int = o.STEPS, batch_size: int = o.BATCH_SIZE, device: str = o.DEVICE, seed: int = o.SEED,
    force: bool = o.FORCE, no_progress: bool = o.NO_PROGRESS, config_file: Path = o.CONFIG,
):
    """Print SDAR (standard deviation of attribute sensitivity, paper 4.4.1) and gate on --max."""
    if source.suffix.lower() == ".json":
        report = read_report(source)
    else:
        if images is None:
            raise SiaError("a model needs --images to diagnose (or pass a report.json)")
        config = DiagnoseConfig(
            model=source, images=images, out=out, gan=gan, attrs_file=attrs_file, protect=o.names(protect),
            settings=o.attack_settings(steps, "1.5/255", "0.25/255", "1.0", 0.0, None, 0.1),
            batch_size=batch_size, device=pick_device(device), seed=seed, force=force,
            command=" ".join(["sia"] + sys.argv[1:]),
        )
        with rich_progress(progress_enabled(no_progress)) as progress:
            report = diagnose(config, progress)
    interval = report.get("intervals", {}).get("sdar")
    text = f"SDAR {report['sdar']:.5f}" + (f" (95% interval {interval['low']:.5f} to {interval['high']:.5f})" if interval else "")
    if baseline is not None:
        console.print(change_table(read_report(baseline), report))
    if max_sdar is None:
        console.print(text)
        return
    above = report["sdar"] > max_sdar
    console.print(f"{text} {'>' if above else '<='} max {max_sdar}: {'FAIL' if above else 'ok'}", highlight=False)
    raise typer.Exit(1 if above else 0)


def change_table(before: dict, after: dict) -> Table:
    key = MEASURES.get(after.get("settings", {}).get("headline", "attribute_shift"), "sensitivity")
    table = Table(title=f"{key} share: baseline -> this report   (SDAR {before['sdar']:.5f} -> {after['sdar']:.5f})")
    for column in ("attribute", "baseline", "now", "change"):
        table.add_column(column)
    rows = compare(before.get(f"{key}_normalized", {}), after.get(f"{key}_normalized", {}))
    for name, old, new, delta in sorted(rows, key=lambda r: -abs(r[3]) if r[3] == r[3] else 0):
        table.add_row(name, f"{old:.3f}", f"{new:.3f}", f"{delta:+.3f}")
    return table
