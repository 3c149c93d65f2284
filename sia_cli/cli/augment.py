"""`sia augment`: write SIA adversaries as a labelled augmentation set (CelebA layout), resumably."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from sia_cli.cli import options as o
from sia_cli.cli.common import console, handle_errors, main_process, progress_enabled, rich_progress
from sia_cli.errors import SiaError
from sia_cli.jobs.augment import AugmentConfig
from sia_cli.jobs.augment import augment as run_augment


@handle_errors
@o.with_model_options
def augment(
    model: Path = o.MODEL, images: Path = o.IMAGES,
    out: Path = typer.Option(..., "--out", help="Output folder: images/, list_attr.txt, labels.csv, augment.json."),
    n: int = typer.Option(None, "--n", "--count", help="Images to write (default: one per source); beyond the "
                          "sources, further rounds with seed + round. Under torchrun write --count: torchrun takes "
                          "--n for an abbreviation of its own options."),
    only_class: str = typer.Option(None, "--class", help="Augment only sources whose reference label is this "
                                   "class (index, or a class name from the model's sia.yaml)."),
    jitter: float = typer.Option(o.default(AugmentConfig, "jitter"), "--jitter", help="Rounds after the first start from a0 plus uniform noise "
                                 "of this size in the unprotected attributes, so they differ from round 0."),
    gan: str = o.GAN, attrs_file: Path = o.ATTRS_FILE, protect: list[str] = o.PROTECT,
    no_protect: bool = typer.Option(not o.default(AugmentConfig, "auto_protect"), "--no-protect", help="Do not protect the attribute named in the "
                                    "model file name (e.g. Eyeglasses for eyeglasses_confounded.pt)."),
    protect_eps: float = o.PROTECT_EPS, steps: int = o.STEPS, eps: str = o.EPS, step_size: str = o.STEP_SIZE,
    eps_attr: str = o.EPS_ATTR, seed: int = o.SEED, batch_size: int = o.BATCH_SIZE, device: str = o.DEVICE,
    compile: bool = o.COMPILE,
    amp: str = o.AMP,
    labels: Path = o.LABELS,
    force: bool = typer.Option(o.default(AugmentConfig, "force"), "--force", help="Start over in an --out that holds another augmentation."), align: bool = o.ALIGN, no_progress: bool = o.NO_PROGRESS,
    config_file: Path = o.CONFIG,
    model_options: dict = None,
):
    """Write SIA adversaries of the images in --images as an augmentation set labelled with each
    source's class; a rerun of the same command continues where it stopped."""
    if no_protect and protect:
        raise SiaError("--protect and --no-protect contradict each other; give one")
    config = o.build(AugmentConfig, locals())
    with rich_progress(progress_enabled(no_progress)) as progress:
        summary = run_augment(config, progress)
    if not main_process():
        return
    print_summary(summary)


def class_text(label: str, class_names: list[str] | None) -> str:
    if class_names and label.isdigit() and int(label) < len(class_names):
        return f"{label} ({class_names[int(label)]})"
    return label


def counts_text(counts: dict, class_names: list[str] | None) -> str:
    return ", ".join(f"{class_text(label, class_names)}: {count}" for label, count in counts.items()) or "none"


def say(text: str) -> None:
    console.print(text, highlight=False)


def print_summary(summary: dict) -> None:
    names = summary["class_names"]
    protected = ", ".join(summary["protected"]) or "nothing"
    say(f"protected: {escape(protected)} ({escape(summary['protect_reason'])})")
    if summary["already_complete"]:
        say(f"{escape(summary['out'])} is already complete ({summary['n']} images); nothing to do "
            "(--force starts over)")
        return
    say(f"wrote {summary['written']} image(s), {summary['done'] - summary['written']} already there: "
        f"{summary['done']} of {summary['n']} in {escape(summary['out'])}")
    say(f"sources per class: {escape(counts_text(summary['source_counts'], names))}")
    say(f"augmentation per class: {escape(counts_text(summary['class_counts'], names))}")
    say(f"adversaries that changed the model's prediction: {summary['fooled']} of {summary['done']}")
    for item in summary["skipped"]:
        say(f"[yellow]skipped[/] {escape(item['file'])}: {escape(item['reason'])}")
    for item in summary.get("failed", []):
        say(f"[yellow]failed[/] {escape(item['file'])} (from {escape(item['source'])}): {escape(item['error'])}")
