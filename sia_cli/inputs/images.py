"""Images on disk and CelebA-layout attribute files."""

from __future__ import annotations

import errno
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

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
    # Symbolic links are kept even when dangling or looping: they are then skipped with the reason,
    # not dropped without a word.
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
                   and (p.is_symlink() or p.is_file()))
    if not files:
        raise SiaError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {folder}{_one_folder_down(folder)}")
    return files


def not_images(folder: Path, used: Sequence[Path | None] = ()) -> list[dict]:
    """`{file, reason}` for each visible file in `folder` that is not an image by its extension (a
    README, a CSV): never read, so a run lists it in `skipped` rather than dropping it without a
    word. `used` (an attributes file kept beside the images) is left out."""
    keep = {Path(p).resolve() for p in used if p}
    try:
        entries = sorted(Path(folder).iterdir())
    except OSError:
        return []
    kinds = ", ".join(sorted(IMAGE_EXTENSIONS))
    return [{"file": p.name, "reason": f"not an image file ({p.suffix or 'no extension'}; images are {kinds})"}
            for p in entries if p.is_file() and not p.name.startswith(".")
            and p.suffix.lower() not in IMAGE_EXTENSIONS and p.resolve() not in keep]


def _count_images(folder: Path) -> int:
    try:
        return sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    except OSError:
        return 0


def _one_folder_down(folder: Path) -> str:
    """`, but faces/images/ holds 24: pass --images faces/images` when the images sit one folder down."""
    try:
        subfolders = sorted(p for p in folder.iterdir() if p.is_dir())
    except OSError:
        return ""
    counts = [(sub, _count_images(sub)) for sub in subfolders]
    counts = [(sub, n) for sub, n in counts if n]
    if not counts:
        return ""
    sub, n = max(counts, key=lambda item: item[1])
    return f", but {sub}/ holds {n}: pass --images {sub}"


def _float_to_8bit(image: Image.Image) -> Image.Image:
    """32-bit float images (TIFF mode F): values in [0, 1] (the usual convention) or [0, 255] are
    scaled to 8 bits; Pillow would clip [0, 1] to black. Any other range is refused: guessing
    a scale (min-max, say) would change what the model sees without saying so."""
    values = np.asarray(image, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ImageError("float image holding NaN or inf values")
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= 1:
        scale = 255.0
    elif low >= 0 and high <= 255:
        scale = 1.0
    else:
        raise ImageError(f"float image with values in [{low:g}, {high:g}]; expected [0, 1] or [0, 255]: "
                         "save it as 8- or 16-bit, or rescale it")
    return Image.fromarray(np.clip(values * scale + 0.5, 0, 255).astype(np.uint8))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "F":
        image = _float_to_8bit(image)
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


def decode(path: Path) -> Image.Image:
    """The one place that decodes image files: upright (EXIF orientation applied) RGB, or ImageError."""
    try:
        if path.is_symlink() and not path.exists():
            raise ImageError(_broken_link(path))
        if path.stat().st_size == 0:
            # Pillow's "cannot identify image file" would hide the plain cause (an interrupted copy).
            raise ImageError("unreadable image: empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as opened:
                return _to_rgb(ImageOps.exif_transpose(opened))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"unreadable image: {exc}") from None


def _broken_link(path: Path) -> str:
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop (the link points back to itself)"
    try:
        return f"broken symbolic link: {os.readlink(path)} does not exist"
    except OSError:
        return "broken symbolic link"


def image_problem(path: Path) -> str | None:
    """Why the image file cannot be used (decoded in full), or None."""
    try:
        decode(Path(path))
    except ImageError as exc:
        return str(exc)
    return None


def load_image(path: Path, size: int) -> torch.Tensor:
    """Any readable image -> (3, size, size) float tensor in [0, 1], centre-cropped to a square."""
    return image_tensor(decode(Path(path)), size)


def image_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """An RGB image -> (3, size, size) float tensor in [0, 1], centre-cropped to a square."""
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

    def mismatch(self, files: list[Path]) -> str | None:
        """`list_attr.txt names 000001.jpg but the folder has 000001.png` when the file names its
        images with another extension than the folder holds, else None."""
        present = {file.name for file in files}
        by_stem = {Path(name).stem: name for name in self.rows if name not in present}
        pairs = [(by_stem[file.stem], file.name) for file in files
                 if file.name not in self.rows and file.stem in by_stem]
        if not pairs:
            return None
        listed, found = pairs[0]
        more = f" ({len(pairs)} images named with another extension)" if len(pairs) > 1 else ""
        return f"{self.path.name} names {listed} but the folder has {found}{more}"


def read_attributes(path: Path) -> AttributeTable:
    """Parse CelebA layout: count line, names line, then `file v1 v2 ...` with -1/1 (or 0/1)."""
    path = Path(path)
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the count line.
        lines = [line.split() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
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
            f"{path} line {number}: expected a file name and {len(names)} values, found "
            + (f"a file name and {len(fields) - 1} value{'' if len(fields) == 2 else 's'}" if fields else "nothing")
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
            hint = ""
            if images.is_dir():
                present = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
                found = table.mismatch(present)
                hint = f": {found}" if found else _one_folder_down(images)
            raise SiaError(
                f"{len(missing)} file(s) listed in {table.path} are missing from {images}, e.g. {missing[0]}{hint}"
            )
        if not files:
            raise SiaError(f"{table.path} lists no images")
        self.files, self.table, self.size = files, table, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        file = self.files[index]
        try:
            image = load_image(file, self.size)
        except ImageError as exc:  # found by the loader mid-training: name the file
            raise ImageError(f"{file.name}: {exc}") from None
        return image, torch.from_numpy(self.table.rows[file.name])
