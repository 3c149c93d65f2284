"""`sia synth`: write a procedural face dataset in CelebA layout."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table
from rich.text import Text

from sia_cli.cli import options as o
from sia_cli.cli.common import console, handle_errors, progress_enabled, rich_progress
from sia_cli.errors import SiaError
from sia_cli.inputs.faces import parse_correlation
from sia_cli.inputs.synth import make_dataset
from sia_cli.measures.validity import write_counterfactuals


@handle_errors
def synth(
    out: Optional[Path] = typer.Argument(None, help="Folder to write images/, list_attr.txt and list_landmarks.txt into."),
    out_option: Optional[Path] = typer.Option(None, "--out", help="The same folder, as an option (give one of the two)."),
    n: int = typer.Option(1000, "--n", help="Number of faces to generate.", show_default=True),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives identical files.", show_default=True),
    size: int = typer.Option(64, "--size", help="Image side in pixels (16 to 1024).", show_default=True),
    correlate: Optional[List[str]] = typer.Option(
        None, "--correlate", metavar="A:B:P", show_default="none",
        help="Spurious correlation: set attribute B equal to A with probability P, "
        "e.g. Eyeglasses:Bangs:0.99. Repeatable.",
    ),
    counterfactuals: bool = typer.Option(
        False, "--counterfactuals", show_default="off",
        help="Also write counterfactuals/<Attribute>/<name>.png: each face with only that attribute flipped "
        "(the truth a diagnosis can be checked against).",
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="Do not draw a progress bar.", show_default="off"),
    config_file: Optional[Path] = o.CONFIG,
) -> None:
    """Generate synthetic faces with CelebA attribute labels and landmarks."""
    if (out is None) == (out_option is None):
        raise SiaError("give the output folder once: as OUT or as --out")
    out = out or out_option
    correlations = [parse_correlation(spec) for spec in correlate or []]
    with rich_progress(progress_enabled(no_progress)) as progress:
        stats = make_dataset(out, n=n, seed=seed, size=size, correlations=correlations, progress=progress)
        if counterfactuals:
            write_counterfactuals(out, n=n, seed=seed, size=size, correlations=correlations, progress=progress)
    # A Table title is read as Rich markup: a path such as runs/exp[lr=0.1] must be shown as is.
    table = Table(title=Text(f"{stats['n']} faces written to {out}"))
    table.add_column("attribute")
    table.add_column("positive share", justify="right")
    for name, share in stats["positive_share"].items():
        table.add_row(name, f"{share:.3f}")
    for c in stats["correlations"]:
        table.add_row(f"{c['a']} -> {c['b']} (P={c['p']:g})", f"agreement {c['agreement']:.3f}", style="bold")
    console.print(table)
