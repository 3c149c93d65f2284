"""Report figures and images: sensitivity.png, grid.png, adversary PNGs, image quality (PSNR, SSIM).

Every file is written atomically (temp file in the same directory, fsync,
rename) so a reader, a CI gate or a resumed run never sees half a report.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sia_cli.errors import SiaError
from sia_cli.measures.sensitivity import ranking
from sia_cli.runs.files import write_bytes_atomic

PSNR_CAP_DB = 100.0


# ---------------------------------------------------------------- PNG files

def _png_bytes(pil_image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    pil_image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_png_atomic(path: str | os.PathLike, pil_image: Image.Image) -> None:
    write_bytes_atomic(path, _png_bytes(pil_image))


# ---------------------------------------------------------------- image conversion and quality

def _as_float_array(images: Any) -> np.ndarray:
    if hasattr(images, "detach"):  # a torch tensor; .float() because numpy has no bfloat16
        images = images.detach().float().cpu().numpy()
    return np.asarray(images, dtype=np.float64)


def to_uint8(img: Any) -> np.ndarray:
    """(3,H,W) or (1,H,W) float tensor/array in [0,1] -> HxWx3 uint8 (rounded, clipped, NaN -> 0)."""
    array = _as_float_array(img)
    if array.ndim != 3 or array.shape[0] not in (1, 3):
        raise SiaError(f"expected a (3,H,W) image, got shape {array.shape}")
    array = np.nan_to_num(array, nan=0.0)
    pixels = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels


def _psnr(mse: float) -> float:
    if mse <= 0.0:
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, 10.0 * math.log10(1.0 / mse))


def _ssim(adversary: np.ndarray, reference: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    smallest_side = min(adversary.shape[1:])
    window = min(7, smallest_side if smallest_side % 2 else smallest_side - 1)
    if window < 3:
        return math.nan  # SSIM is undefined below a 3x3 window
    return float(structural_similarity(adversary.transpose(1, 2, 0), reference.transpose(1, 2, 0),
                                       channel_axis=2, data_range=1.0, win_size=window))


def image_quality(adversaries: Any, references: Any) -> tuple[list[float], list[float]]:
    """Per-image PSNR (dB, data range 1.0) and SSIM between two (N,3,H,W) batches in [0,1].

    PSNR of identical images is infinite; it is reported as PSNR_CAP_DB (100 dB), and
    larger values are capped too, so report.json stays valid JSON. SSIM uses
    scikit-image with a 7x7 window (smaller for images under 7 px; NaN under 3 px).
    """
    adversary, reference = _as_float_array(adversaries), _as_float_array(references)
    if adversary.shape != reference.shape or adversary.ndim != 4:
        raise SiaError("image_quality needs two (N,C,H,W) batches of one shape, "
                       f"got {adversary.shape} and {reference.shape}")
    mse = ((adversary - reference) ** 2).reshape(len(adversary), -1).mean(axis=1)
    psnr = [_psnr(float(m)) for m in mse]
    ssim = [_ssim(a, r) for a, r in zip(adversary, reference)]
    return psnr, ssim


# ---------------------------------------------------------------- sensitivity histogram

def _bar_label(value: float) -> str:
    # Two decimals, unless that would print a non-zero value as 0.00.
    return f"{value:.2f}" if value == 0 or abs(value) >= 0.005 else f"{value:.1e}"


def _error_extents(names: list[str], values: dict[str, float], intervals: dict[str, dict]) -> np.ndarray:
    """(2, K) distances below/above each bar; matplotlib rejects negative extents, so clip at 0."""
    extents = np.zeros((2, len(names)))
    for column, name in enumerate(names):
        interval = intervals.get(name)
        if interval:
            extents[0, column] = max(0.0, values[name] - interval["low"])
            extents[1, column] = max(0.0, interval["high"] - values[name])
    return extents


def edit_rate_text(rate: float) -> str:
    """An edit success rate in two decimals, rounded down: 0.497 must not read 0.50 beside a
    blind-spot mark whose floor is 0.5."""
    return f"{math.floor(round(rate * 100, 6)) / 100:.2f}"


def sensitivity_png(path: str | os.PathLike, values: dict[str, float],
                    intervals: dict[str, dict] | None = None, title: str = "",
                    edit_success: dict[str, float] | None = None, blind_spots: Sequence[str] = (),
                    leader: str | None = None) -> None:
    """Horizontal bar chart, most sensitive on top, value printed beside each bar; `leader`, the
    attribute that stands out (if any), in red.

    With `edit_success` each label carries the backbone's edit success for that attribute, and
    blind spots are drawn hatched and pale: their short bars mean "cannot tell".
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend, no display needed

    if not values:
        raise SiaError("no sensitivity values to plot")
    names = ranking(values)
    heights = np.array([values[name] for name in names])
    extents = _error_extents(names, values, intervals) if intervals else None
    bar_ends = heights + (extents[1] if extents is not None else 0.0)

    figure = Figure(figsize=(8, max(4.0, 0.32 * len(names) + 1.2)), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colours = ["#c0392b" if name == leader else "#2e6da4" for name in names]
    colours = ["#b8c4d0" if name in blind_spots else colour for name, colour in zip(names, colours)]
    rows = np.arange(len(names))
    bars = axes.barh(rows, heights, xerr=extents, color=colours, ecolor="#444444", capsize=3, height=0.7)
    for bar, name in zip(bars, names):
        if name in blind_spots:
            bar.set_hatch("//")
    span = float(bar_ends.max()) if bar_ends.max() > 0 else 1.0
    for row, (value, end) in enumerate(zip(heights, bar_ends)):
        axes.text(end + 0.01 * span, row, _bar_label(value), va="center", fontsize=9)
    edit_success = edit_success or {}
    labels = [f"{name} (edit {edit_rate_text(edit_success[name])})" if name in edit_success else name
              for name in names]
    axes.set_yticks(rows, labels)
    axes.invert_yaxis()
    axes.set_xlim(0, span * 1.15)
    axes.set_xlabel("sensitivity" + (" (bars: 95% bootstrap interval)" if intervals else "")
                    + ("; hatched: blind spot of the backbone" if blind_spots else ""))
    axes.grid(axis="x", alpha=0.3)
    axes.set_axisbelow(True)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    if title:
        axes.set_title(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_bytes_atomic(path, buffer.getvalue())


# ---------------------------------------------------------------- example grid

GRID_COLUMNS = ("original", "reconstruction", "adversary")
_MIN_CELL, _MAX_CELL, _PAD, _LINE = 128, 256, 8, 18


def _font(size: int = 14) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _as_rgb(image: Any) -> np.ndarray | None:
    """HxWx3 uint8 from HxW, HxWx3 or HxWx4 input; floats are taken as [0,1]."""
    if image is None:
        return None
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise SiaError(f"grid images must be HxWx3 arrays, got shape {array.shape}")
    array = array[:, :, :3]
    if array.dtype != np.uint8:
        array = np.clip(np.rint(np.nan_to_num(array.astype(np.float64)) * 255.0), 0, 255).astype(np.uint8)
    return array


def _cell_size(panels: list[np.ndarray]) -> tuple[int, int]:
    """(width, height) of one cell: small images upscaled by a whole factor so nearest stays crisp."""
    height = max(p.shape[0] for p in panels)
    width = max(p.shape[1] for p in panels)
    longest = max(height, width)
    scale = max(1, math.ceil(_MIN_CELL / longest)) if longest < _MIN_CELL else min(1.0, _MAX_CELL / longest)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _paste_cell(canvas: Image.Image, draw: ImageDraw.ImageDraw, panel: np.ndarray | None,
                box: tuple[int, int], size: tuple[int, int], font) -> None:
    if panel is None:  # e.g. pixel-space attacks have no reconstruction
        draw.rectangle([box, (box[0] + size[0] - 1, box[1] + size[1] - 1)], fill=(225, 225, 225))
        centre = (box[0] + size[0] // 2, box[1] + size[1] // 2)
        draw.text(centre, "n/a", fill=(90, 90, 90), font=font, anchor="mm")
        return
    # A thin frame keeps images with white borders apart from the white canvas.
    draw.rectangle([(box[0] - 1, box[1] - 1), (box[0] + size[0], box[1] + size[1])], outline=(190, 190, 190))
    image = Image.fromarray(panel)
    enlarging = size[0] >= image.width
    canvas.paste(image.resize(size, Image.Resampling.NEAREST if enlarging else Image.Resampling.LANCZOS), box)


def grid_png(path: str | os.PathLike, rows: Sequence[dict], columns: Sequence[str] = GRID_COLUMNS) -> None:
    """One row per image: its `columns` (original | reconstruction | adversary), file name and
    caption below."""
    if not rows:
        raise SiaError("the example grid needs at least one image")
    panels = [[_as_rgb(row.get(column)) for column in columns] for row in rows]
    present = [p for row in panels for p in row if p is not None]
    if not present:
        raise SiaError("the example grid has no images")
    cell_w, cell_h = _cell_size(present)
    header_h, row_h = _LINE + _PAD, cell_h + 2 * _LINE + _PAD
    canvas = Image.new("RGB", (_PAD + len(columns) * (cell_w + _PAD), header_h + len(rows) * row_h + _PAD), "white")
    draw, font = ImageDraw.Draw(canvas), _font()
    for column, title in enumerate(columns):
        centre = _PAD + column * (cell_w + _PAD) + cell_w // 2
        draw.text((centre, _PAD // 2), title, fill="black", font=font, anchor="ma")
    text_width = canvas.width - 2 * _PAD
    for index, (row, row_panels) in enumerate(zip(rows, panels)):
        top = header_h + index * row_h
        for column, panel in enumerate(row_panels):
            _paste_cell(canvas, draw, panel, (_PAD + column * (cell_w + _PAD), top), (cell_w, cell_h), font)
        for line, (key, colour) in enumerate([("file", (0, 0, 0)), ("caption", (60, 60, 60))]):
            text = _fit_text(draw, str(row.get(key, "")), font, text_width)
            draw.text((_PAD, top + cell_h + 2 + line * _LINE), text, fill=colour, font=font)
    save_png_atomic(path, canvas)


# ---------------------------------------------------------------- self-contained HTML report


def attribution_overlay(image: Any, importance: Any) -> np.ndarray:
    """HxWx3 uint8: the image in grey, each pixel's importance (HxW, any scale) laid over it in
    red to yellow. Importance is scaled by its own 99th percentile, so a map's few brightest
    pixels do not wash out the rest; a map of zeros leaves the grey image."""
    grey = _as_rgb(image).astype(np.float64).mean(axis=2, keepdims=True) / 255.0
    heat = np.abs(np.asarray(importance, dtype=np.float64))
    if heat.shape != grey.shape[:2]:
        raise SiaError(f"an importance map must be HxW like its image {grey.shape[:2]}, got {heat.shape}")
    scale = np.percentile(heat, 99)
    heat = np.clip(heat / scale, 0.0, 1.0)[..., None] if scale > 0 else np.zeros_like(grey)
    colour = np.concatenate([np.ones_like(heat), heat, np.zeros_like(heat)], axis=2)  # red -> yellow
    blended = grey * 0.6 * (1 - heat) + colour * heat
    return np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)
