"""`sia align`: find, align and crop the faces in any photos the way the backbone was trained."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sia_cli.backbone.registry import framing_of
from sia_cli.cli import options as o
from sia_cli.cli.common import console, handle_errors, progress_enabled, rich_progress
from sia_cli.errors import SiaError
from sia_cli.inputs.align import FRAMINGS, NO_FACE, AlignConfig, align_folder, framing_named


@handle_errors
def align(
    images: Path = typer.Argument(..., metavar="PHOTOS", help="Folder of photos (any size, mode and format the other commands read)."),
    out: Path = typer.Argument(..., metavar="OUT", help="Output folder: images/ (one crop per face), alignment.csv, unaligned.csv."),
    gan: str = o.GAN,
    framing: Optional[str] = typer.Option(
        None, "--framing", help=f"Crop layout ({', '.join(sorted(FRAMINGS))}); default: the one --gan was trained on."),
    largest: bool = typer.Option(False, "--largest", help="Only the largest face of each photo."),
    min_score: float = typer.Option(0.5, "--min-score", help="Detector score below which a face is ignored."),
    no_progress: bool = o.NO_PROGRESS, config_file: Optional[Path] = o.CONFIG,
) -> None:
    """Detect the faces in PHOTOS and write each, aligned by its eyes, nose and mouth corners to
    the framing of the backbone's training faces, into OUT in CelebA layout."""
    if not Path(images).is_dir():
        raise SiaError(f"{images}: no such folder")
    if not 0 <= min_score <= 1:
        raise SiaError(f"--min-score must be within [0, 1] (got {min_score:g})")
    chosen = framing_named(framing or framing_of(gan))
    from sia_cli.inputs.detectors import RetinaFace  # onnxruntime only where faces are detected

    detector = RetinaFace(min_score=min_score)
    config = AlignConfig(images=images, out=out, framing=chosen, largest=largest)
    with rich_progress(progress_enabled(no_progress)) as progress:
        result = align_folder(config, detector, progress)
    sources = {row["source"] for row in result.rows}
    console.print(f"{len(result.rows)} faces from {len(sources)} photos written to {out / 'images'} "
                  f"({chosen.name} framing, {chosen.side}x{chosen.side}); {len(result.unaligned)} photos without "
                  f"a usable face listed in {out / 'unaligned.csv'}", markup=False, highlight=False, soft_wrap=True)
    if not result.rows:
        # Exit 1, as a gate that finds nothing: a script must not go on to diagnose an empty folder.
        faceless = sum(row["reason"] == NO_FACE for row in result.unaligned)
        unusable = len(result.unaligned) - faceless
        why = f"without a face: {faceless} (faces under about 20 pixels across are not found)"
        if unusable:
            why += f"; unreadable or not images: {unusable} (reasons in {out / 'unaligned.csv'})"
        raise SiaError(f"no face found in any of the {len(result.unaligned)} files of {images}: {why}", exit_code=1)
