"""`sia attack`: run one or several attack methods and write adversaries and reports."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from sia_cli.cli import options as o
from sia_cli.cli.common import console, handle_errors, main_process, print_warnings, progress_enabled, rich_progress
from sia_cli.jobs.attack import attack as run_attack
from sia_cli.runs.inputs import RunConfig


@handle_errors
@o.with_model_options
def attack(
    model: Path = o.MODEL, images: Path = o.IMAGES, out: Path = o.OUT, gan: str = o.GAN,
    attrs_file: Path = o.ATTRS_FILE,
    method: str = typer.Option(",".join(o.default(RunConfig, "methods")), "--method", help="sia, attr, image, pgd, fgsm, spt; several comma-separated give a comparison."),
    protect: list[str] = o.PROTECT, protect_eps: float = o.PROTECT_EPS, steps: int = o.STEPS, eps: str = o.EPS,
    step_size: str = o.STEP_SIZE, eps_attr: str = o.EPS_ATTR, seed: int = o.SEED, batch_size: int = o.BATCH_SIZE,
    compile: bool = o.COMPILE,
    device: str = o.DEVICE, amp: str = o.AMP, labels: Path = o.LABELS,
    nme_threshold: float = o.NME, force: bool = o.FORCE, keep_lost: bool = o.KEEP_LOST, align: bool = o.ALIGN, no_progress: bool = o.NO_PROGRESS,
    config_file: Path = o.CONFIG,
    model_options: dict = None,
):
    """Attack MODEL on every image in --images; write adversaries/, report.json and a summary table."""
    config = o.build(RunConfig, locals())
    with rich_progress(progress_enabled(no_progress)) as progress:
        result = run_attack(config, progress)
    if not main_process():
        return
    console.print(summary_table(result["reports"]))
    if result["reports"]:
        print_warnings(next(iter(result["reports"].values())))
    # File names and reasons are user text: escaped, `[red]` in a name is shown, not read as markup.
    for item in result["skipped"]:
        console.print(f"[yellow]skipped[/] {escape(item['file'])}: {escape(item['reason'])}", highlight=False)
    for name, report in result["reports"].items():
        for record in (r for r in report["images"] if "error" in r):
            console.print(f"[yellow]failed[/] {escape(record['file'])} ({name}): {escape(record['error'])}",
                          highlight=False)
    console.print(f"wrote {out}", markup=False, highlight=False, soft_wrap=True)  # a path may hold `[...]`


def summary_table(reports: dict) -> Table:
    table = Table(title="attack success rate (images lost in reconstruction left out for generator methods) "
                        "and image quality (adversary vs its starting image / vs the clean image)")
    for column in ("method", "images", "counted", "ASR", "lost in recon.", "PSNR (dB)", "SSIM", "PSNR vs clean"):
        table.add_column(column, justify="right" if column != "method" else "left")
    for name, report in reports.items():
        table.add_row(
            name, str(len(report["images"])), str(report.get("counted", "-")),
            f"{100 * report['attack_success_rate']:.1f} %", str(report.get("lost_in_reconstruction", "-")),
            _number(report["psnr"], ".2f"), _number(report["ssim"], ".3f"),
            _number(report.get("psnr_vs_clean"), ".2f"),
        )
    return table


def _number(value: float | None, spec: str) -> str:
    """A method whose every image failed (NaN) has no PSNR or SSIM: shown as a dash."""
    return "-" if value is None else format(value, spec)
