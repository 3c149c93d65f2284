"""`sia harden`: fine-tune a model on semantic adversaries and report it before and after."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from sia_cli.cli import options as o
from sia_cli.cli.common import console, handle_errors, main_process, progress_enabled, rich_progress
from sia_cli.engine.art import ArtSettings
from sia_cli.jobs.harden import HardenConfig
from sia_cli.jobs.harden import harden as run_harden
from sia_cli.jobs.harden_eval import EVAL_METHODS


@handle_errors
@o.with_model_options
def harden(
    model: Path = o.MODEL, images: Path = o.IMAGES,
    out: Path = typer.Option(..., "--out", help="Output folder: model.pt (or model.pt2), hardening.json, "
                             "hardening.html, before/, after/, checkpoint/."),
    labels: Path = o.LABELS, attrs_file: Path = o.ATTRS_FILE, gan: str = o.GAN,
    method: str = typer.Option(o.default(HardenConfig, "methods")[0], "--method",
                               help="Attack whose adversaries the model trains on: sia, attr, image, pgd, fgsm, spt; "
                                    "art (attributional robustness training), or METHOD+art (e.g. sia+art: its "
                                    "adversaries with ART's triplet term). With art the before/after report adds "
                                    "the attributional measures of `sia diagnose --explanations`."),
    art_weight: float = typer.Option(o.default(ArtSettings, "art_weight"), "--art-weight",
                                     help="ART: weight of the triplet term (the authors' 0.5)."),
    art_epsilon: str = typer.Option(o.fraction_text(o.default(ArtSettings, "art_epsilon")), "--art-epsilon",
                                    help="ART: L-inf radius of its training point (number or fraction)."),
    art_steps: int = typer.Option(o.default(ArtSettings, "art_steps"), "--art-steps",
                                  help="ART: PGD steps that pick its training point."),
    art_step_size: str = typer.Option(o.fraction_text(o.default(ArtSettings, "art_step_size")), "--art-step-size",
                                      help="ART: step of that PGD (number or fraction)."),
    epochs: int = typer.Option(o.default(HardenConfig, "epochs"), "--epochs", help="Passes over --images."),
    lr: float = typer.Option(o.default(HardenConfig, "lr"), "--lr", help="Adam learning rate."),
    mix: float = typer.Option(o.default(HardenConfig, "mix"), "--mix",
                              help="Weight of the clean images' loss in each step (the adversaries': 1 - mix)."),
    adversaries: Path = typer.Option(None, "--adversaries",
                                     help="Offline: train on this fixed set from `sia augment` (images/, labels.csv) "
                                          "instead of attacking the current weights every step."),
    eval_images: Path = typer.Option(None, "--eval-images",
                                     help="Held-out images for the before/after report (never the training images)."),
    eval_labels: Path = typer.Option(None, "--eval-labels", help="Labels CSV of --eval-images (accuracy against them; "
                                     "else against each model's own clean prediction)."),
    eval_attrs_file: Path = typer.Option(None, "--eval-attrs-file", help="Starting attributes of --eval-images."),
    eval_steps: int = typer.Option(None, "--eval-steps", help="Attack steps of the before/after report (default: --steps)."),
    save_every: int = typer.Option(None, "--save-every", help="Optimiser steps per checkpoint (default: one epoch)."),
    explain_k: int = o.EXPLAIN_K, explain_epsilon: str = o.EXPLAIN_EPSILON, explain_steps: int = o.EXPLAIN_STEPS,
    explain_step_size: str = o.EXPLAIN_STEP_SIZE, explain_ig_steps: int = o.EXPLAIN_IG_STEPS,
    protect: list[str] = o.PROTECT, protect_eps: float = o.PROTECT_EPS, steps: int = o.STEPS, eps: str = o.EPS,
    step_size: str = o.STEP_SIZE, eps_attr: str = o.EPS_ATTR, seed: int = o.SEED, batch_size: int = o.BATCH_SIZE,
    device: str = o.DEVICE, amp: str = o.AMP,
    nme_threshold: float = o.NME,
    force: bool = typer.Option(False, "--force", help="Redo a finished hardening in --out."), no_progress: bool = o.NO_PROGRESS, config_file: Path = o.CONFIG,
    model_options: dict = None,
):
    """Fine-tune MODEL on adversaries of its current weights (SIA adversarial training) and
    compare it before and after on --eval-images; a rerun of the same command resumes."""
    config = o.build(HardenConfig, locals())
    with rich_progress(progress_enabled(no_progress)) as progress:
        summary = run_harden(config, progress)
    if not main_process():
        return
    if summary.get("before") is None and summary.get("after") is None:
        console.print(not_compared(summary), markup=False, highlight=False, soft_wrap=True)
    else:
        console.print(summary_table(summary))
    console.print(f"hardened model: {summary['hardened_model']}", markup=False, highlight=False)
    console.print(f"wrote {out / 'hardening.html'}", markup=False, highlight=False, soft_wrap=True)


def not_compared(summary: dict) -> str:
    """What a hardening without --eval-images can say: how it trained, and that nothing was compared."""
    training = summary.get("training") or {}
    losses = ", ".join(f"{name.replace('_', ' ')} {value:.3g}" for name, value in (training.get("losses") or {}).items())
    return (f"trained {training.get('steps')} steps ({summary.get('mode')}; labels: {summary.get('labels')})"
            + (f"; last losses: {losses}" if losses else "")
            + ". Not compared before and after: pass --eval-images (held-out faces, never the training folder) "
            "to measure accuracy under attack and SDAR on both")


def summary_table(summary: dict) -> Table:
    before, after = summary.get("before") or {}, summary.get("after") or {}
    table = Table(title=f"before and after hardening ({summary['training'].get('steps')} steps, "
                        f"labels: {summary.get('labels')})")
    for column in ("", "before", "after"):
        table.add_column(column, justify="left" if not column else "right")

    def number(value) -> str:
        return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    table.add_row("clean accuracy", number(before.get("clean_accuracy")), number(after.get("clean_accuracy")))
    for method in EVAL_METHODS:
        for eps in summary.get("eval_eps") or []:
            table.add_row(f"accuracy under {method} {eps}",
                          number((before.get("accuracy_under_attack") or {}).get(method, {}).get(eps)),
                          number((after.get("accuracy_under_attack") or {}).get(method, {}).get(eps)))
    table.add_row("SDAR", number(before.get("sdar")), number(after.get("sdar")))
    if before.get("attributional") or after.get("attributional"):
        for key, name in (("top_k_intersection", "top-k intersection (attacked maps)"),
                          ("kendall_tau", "Kendall's tau (attacked maps)")):
            table.add_row(name, number((before.get("attributional") or {}).get(key)),
                          number((after.get("attributional") or {}).get(key)))
    table.add_row("stands out", number(before.get("stands_out")), number(after.get("stands_out")))
    return table
