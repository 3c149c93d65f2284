"""Images on disk and CelebA-layout attribute files."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from sia_cli.errors import SiaError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


class ImageError(SiaError):
    """One image cannot be used; callers skip it and list the reason."""


def list_images(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.exists():
        raise SiaError(f"image folder not found: {folder}")
    if not folder.is_dir():
        raise SiaError(f"not a folder: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise SiaError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {folder}")
    return files


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits instead of letting Pillow clip at 255.
        values = np.asarray(image, dtype=np.float64)
        # "I;16*" is 16-bit by definition (a dark image may stay below 256); only "I" needs a guess.
        peak = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def _decode(path: Path) -> Image.Image:
    """The one place that decodes image files: upright (EXIF orientation applied) RGB, or ImageError."""
    try:
        if path.stat().st_size == 0:
            # Pillow's "cannot identify image file" would hide the plain cause (an interrupted copy).
            raise ImageError("unreadable image: empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as opened:
                return _to_rgb(ImageOps.exif_transpose(opened))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"unreadable image: {exc}") from None


def load_image(path: Path, size: int) -> torch.Tensor:
    """Any readable image -> (3, size, size) float tensor in [0, 1], centre-cropped to a square."""
    image = _decode(Path(path))
    side = min(image.size)
    if side < 1:
        raise ImageError("empty image")
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.BICUBIC if side < size else Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@dataclass
class AttributeTable:
    """A CelebA `list_attr` file: attribute names and one 0/1 vector per image file name."""

    names: list[str]
    rows: dict[str, np.ndarray]
    path: Path

    def select(self, wanted: list[str]) -> "AttributeTable":
        missing = [name for name in wanted if name not in self.names]
        if missing:
            # The file's names that nobody asked for are usually the misspelt or renamed ones.
            unknown = [name for name in self.names if name not in wanted]
            instead = f"; it names {', '.join(unknown)} instead" if unknown else ""
            raise SiaError(
                f"attribute(s) {', '.join(missing)} not in {self.path}{instead} (it has: {', '.join(self.names)})"
            )
        index = [self.names.index(name) for name in wanted]
        return AttributeTable(list(wanted), {f: v[index] for f, v in self.rows.items()}, self.path)

    def vector(self, file: str | Path) -> np.ndarray | None:
        return self.rows.get(Path(file).name)


def read_attributes(path: Path) -> AttributeTable:
    """Parse CelebA layout: count line, names line, then `file v1 v2 ...` with -1/1 (or 0/1)."""
    path = Path(path)
    try:
        lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise SiaError(f"attribute file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SiaError(f"cannot read attribute file {path}: {exc}") from None
    if len(lines) < 2 or len(lines[0]) != 1 or not lines[0][0].isdigit():
        raise SiaError(f"{path} is not in CelebA list_attr layout (line 1: image count, line 2: attribute names)")
    names = lines[1]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise SiaError(f"{path}: attribute name(s) listed twice: {', '.join(duplicated)}")
    rows = {}
    for number, fields in enumerate(lines[2:], start=3):
        if fields[0] in rows:
            # Two rows for one image would silently keep the last: refuse rather than guess.
            raise SiaError(f"{path} line {number}: {fields[0]} is listed twice")
        rows[fields[0]] = _parse_row(fields, names, path, number)
    declared = int(lines[0][0])
    if declared != len(rows):
        raise SiaError(f"{path}: line 1 declares {declared} images but {len(rows)} rows follow")
    return AttributeTable(names, rows, path)


def _parse_row(fields: list[str], names: list[str], path: Path, number: int) -> np.ndarray:
    if len(fields) != len(names) + 1:
        raise SiaError(
            f"{path} line {number}: expected a file name and {len(names)} values, found {len(fields)} fields"
        )
    for name, value in zip(names, fields[1:]):
        if value not in ("-1", "0", "1"):
            # Name the image and the attribute: in a 40-column file a line number alone is hard to act on.
            raise SiaError(f"{path} line {number}: {fields[0]} has {name} = {value!r}; values must be -1, 0 or 1")
    return (np.array([int(v) for v in fields[1:]]) > 0).astype(np.float32)


class LabelledImages(torch.utils.data.Dataset):
    """Images of a CelebA-layout folder with their attribute vectors, for training."""

    def __init__(self, images: Path, table: AttributeTable, size: int):
        images = Path(images)
        files = [images / name for name in table.rows]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise SiaError(
                f"{len(missing)} file(s) listed in {table.path} are missing from {images}, e.g. {missing[0]}"
            )
        if not files:
            raise SiaError(f"{table.path} lists no images")
        self.files, self.table, self.size = files, table, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        file = self.files[index]
        return load_image(file, self.size), torch.from_numpy(self.table.rows[file.name])
