"""`sia align`: find the faces in any photos and crop each the way a backbone's training faces
were framed.

An AttGAN edits only faces framed like its training faces: the public checkpoints were trained
on CelebA's aligned images (a similarity transform put the eyes and mouth corners at fixed
places of a 178x218 image) centre-cropped to 170x170; the shipped backbone on `sia synth`
faces. A centre crop of a holiday photo is neither. Each detected face here is mapped by the
similarity transform (rotation, uniform scale, shift) that brings its landmarks closest, in
least squares, to where the backbone's framing puts them, and written as a square crop that
`load_image` uses as it is.

The detector is a plug-in (`Detector`); `detectors.py` holds the one the command uses.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from skimage.transform import AffineTransform, SimilarityTransform
from skimage.transform import warp as skimage_warp

from sia_cli.errors import SiaError
from sia_cli.inputs.detectors import LANDMARKS, Detector, Face, RetinaFace
from sia_cli.inputs.images import ImageError, decode, list_images, not_images
from sia_cli.progress import ProgressFn, silent
from sia_cli.runs.files import write_bytes_atomic, write_text_atomic
from sia_cli.text import first_few

TABLE = "alignment.csv"
UNALIGNED = "unaligned.csv"
NO_FACE = "no face found"  # the reason unaligned.csv gives a readable photo without a face


@dataclass(frozen=True)
class Framing:
    """Where a backbone's training faces had their landmarks: fractions of the side of the
    square crop the backbone sees, and the side written."""

    name: str
    side: int
    points: tuple[tuple[float, float], ...]  # in LANDMARKS order
    source: str

    def target(self) -> np.ndarray:
        return np.asarray(self.points, dtype=np.float64) * self.side


def _celeba() -> Framing:
    # CelebA's aligned images (178x218) put the five points at these pixels on average (the
    # dataset's own alignment template); the public AttGAN code centre-crops 170x170, 4 px in from
    # the sides and 24 px from the top.
    template = ((69, 111), (108, 111), (88, 136), (72, 152), (105, 152))
    crop, left, top = 170, 4, 24
    return Framing("celeba", crop, tuple(((x - left) / crop, (y - top) / crop) for x, y in template),
                   "CelebA aligned template, centre 170x170 crop (public AttGAN)")


FRAMINGS = {
    "celeba": _celeba(),
    # The mean of the renderer's own landmarks over 400 faces (seed 77, `tests/test_align.py`
    # checks them against the renderer); written at 128 px, twice the shipped backbone's size.
    "synth": Framing("synth", 128, ((0.4056, 0.5075), (0.5908, 0.5060), (0.4990, 0.5984), (0.4171, 0.6766),
                                    (0.5822, 0.6753)), "mean landmarks of `sia synth` faces"),
}


def framing_named(name: str) -> Framing:
    if name not in FRAMINGS:
        raise SiaError(f"unknown framing {name!r} (known: {', '.join(sorted(FRAMINGS))})")
    return FRAMINGS[name]






def similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2x3 similarity transform (rotation, uniform scale, shift, no reflection) that maps
    `source` points closest to `target` in least squares (Umeyama's solution, as scikit-image
    estimates it)."""
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    if source.shape != target.shape or source.ndim != 2 or source.shape[1] != 2 or len(source) < 2:
        raise ValueError(f"need matching (N>=2, 2) point sets, got {source.shape} and {target.shape}")
    if ((source - source.mean(0)) ** 2).sum() <= 0:
        raise ValueError("the source points coincide")
    if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image 0.26 on; `estimate` is deprecated there
        transform = SimilarityTransform.from_estimate(source, target)
        fitted = bool(transform)
    else:
        transform = SimilarityTransform()
        fitted = transform.estimate(source, target)
    if not fitted:
        raise ValueError("no similarity transform fits these points")
    return transform.params[:2].copy()


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def transform_for(face: Face, framing: Framing) -> np.ndarray:
    """The photo -> crop transform of one face, from every landmark it has."""
    names = [name for name in LANDMARKS if face.points.get(name) is not None]
    index = [LANDMARKS.index(name) for name in names]
    return similarity(np.array([face.points[n] for n in names]), framing.target()[index])


def warp(photo: Image.Image, matrix: np.ndarray, side: int) -> Image.Image:
    """The square crop of `photo` under the photo -> crop transform `matrix` (pixel centres at
    integer coordinates), bicubic; outside the photo, its nearest edge pixel (scikit-image's
    `warp` with mode "edge")."""
    inverse = AffineTransform(matrix=np.linalg.inv(np.vstack([matrix, [0, 0, 1]])))
    pixels = np.asarray(photo.convert("RGB"), dtype=np.float64) / 255.0
    crop = skimage_warp(pixels, inverse, output_shape=(side, side), order=3, mode="edge")
    return Image.fromarray(np.clip(np.rint(crop * 255.0), 0, 255).astype(np.uint8))


def padding_share(matrix: np.ndarray, side: int, width: int, height: int) -> float:
    """The share of a crop's pixels that lie outside the photo (`warp` fills them with edge
    pixels: streaks, not face). A small face near a photo's border, or a photo upscaled from a
    small one, gives crops that are largely invented."""
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), axis=-1).reshape(-1, 2).astype(float)
    source = apply(inverse, grid)
    outside = ((source[:, 0] < -0.5) | (source[:, 0] > width - 0.5) | (source[:, 1] < -0.5)
               | (source[:, 1] > height - 0.5))
    return float(outside.mean())


@dataclass(frozen=True)
class AlignConfig:
    images: Path
    out: Path
    framing: Framing
    largest: bool = False  # only the largest face of each photo
    used: tuple[Path, ...] = ()  # files beside the photos that the run reads (--attrs-file, --labels)


@dataclass
class Aligned:
    """What one alignment wrote: rows of alignment.csv, the photos without a usable face, and
    each crop's source photo."""

    rows: list[dict] = field(default_factory=list)
    unaligned: list[dict] = field(default_factory=list)

    def source_of(self) -> dict[str, str]:
        return {row["file"]: row["source"] for row in self.rows}


def crop_names(photos: list[Path]) -> dict[Path, str]:
    """Each photo's crop-name stem: its own stem, or with its extension where two photos share a
    stem (face.jpg and face.png must not write the same crops)."""
    stems = [photo.stem for photo in photos]
    return {photo: photo.stem if stems.count(photo.stem) == 1 else f"{photo.stem}_{photo.suffix.lstrip('.')}"
            for photo in photos}


def align_folder(config: AlignConfig, detector: Detector, progress: ProgressFn = silent) -> Aligned:
    """Every face of every photo in `config.images`, framed, into `config.out`/images, with
    alignment.csv and unaligned.csv. A photo without a face, or unreadable, is listed, never fatal."""
    photos = list_images(Path(config.images))
    if not photos:
        raise SiaError(f"no images in {config.images}")
    images = Path(config.out) / "images"
    stems = crop_names(photos)
    earlier = refuse_foreign_files(images, Path(config.out), set(stems.values()))
    images.mkdir(parents=True, exist_ok=True)
    result = Aligned()
    result.unaligned += [{"source": item["file"], "reason": item["reason"]}
                         for item in not_images(Path(config.images), config.used)]
    for number, path in enumerate(photos, 1):
        try:
            photo = decode(path)
        except ImageError as exc:
            result.unaligned.append({"source": path.name, "reason": str(exc)})
            continue
        faces = [f for f in detector.detect(np.asarray(photo)) if f.points.get("lefteye") and f.points.get("righteye")]
        if not faces:
            result.unaligned.append({"source": path.name, "reason": NO_FACE})
        if config.largest and faces:
            faces = [max(faces, key=lambda f: f.area)]
        for index, face in enumerate(sorted(faces, key=lambda f: (f.box[0], f.box[1]))):
            matrix = transform_for(face, config.framing)
            crop = warp(photo, matrix, config.framing.side)
            name = f"{stems[path]}_{index}.png"
            buffer = io.BytesIO()
            crop.save(buffer, format="PNG")
            write_bytes_atomic(images / name, buffer.getbuffer())
            result.rows.append(_row(name, path.name, index, face, matrix,
                                    padding_share(matrix, config.framing.side, photo.width, photo.height)))
        progress("align", number, len(photos), {"faces": len(result.rows)})
    written = {row["file"] for row in result.rows}
    for name in earlier - written:  # crops of an earlier alignment into this folder, and only those
        (images / name).unlink(missing_ok=True)
    _write_tables(Path(config.out), result)
    return result


def refuse_foreign_files(images: Path, out: Path, stems: set[str]) -> set[str]:
    """The crops an earlier alignment wrote into `images` (listed in OUT/alignment.csv), which a
    rerun may replace or remove. Crops named as these photos' crops are named (`stems`) are an
    interrupted alignment's, which wrote them before its tables: rewritten. Any other file there
    is someone else's: refused before any work, because a crop would overwrite it or a later run
    would read it as a face."""
    earlier = set()
    if (out / TABLE).is_file():
        with open(out / TABLE, newline="") as handle:
            earlier = {row.get("file", "") for row in csv.DictReader(handle)}
    if not images.is_dir():
        return earlier

    def ours(name: str) -> bool:
        stem, _, rest = name.rpartition("_")
        return name in earlier or (stem in stems and rest.endswith(".png") and rest[:-4].isdigit())

    foreign = sorted(p.name for p in images.iterdir() if not p.name.startswith(".") and not ours(p.name))
    if foreign:
        raise SiaError(f"{images} holds files that no alignment into {out} wrote ({first_few(foreign, 3)}): "
                       "align into a new or empty folder (nothing was changed)")
    return earlier


ALIGNED = "aligned"  # --align: the crops and their tables, inside the run's --out
# A crop with more than this share of edge padding is flagged: a quarter of its pixels are
# streaks the backbone never saw (LFW's 25 px photos upscaled give about two thirds).
PADDED_SHARE = 0.25


def alignment_summary(folder: Path) -> dict | None:
    """What --align made of the photos, from the tables it wrote into `folder` (OUT/aligned):
    how many photos and faces, each photo skipped and why, and the crops that are mostly
    padding. None when nothing was aligned there."""
    if not (folder / TABLE).is_file():
        return None
    with open(folder / TABLE, newline="") as handle:
        rows = list(csv.DictReader(handle))
    skipped = []
    if (folder / UNALIGNED).is_file():
        with open(folder / UNALIGNED, newline="") as handle:
            skipped = [{"file": row["source"], "reason": f"--align: {row['reason']}"} for row in csv.DictReader(handle)]
    padded = [{"file": row["file"], "source": row["source"], "padding": float(row["padding"])}
              for row in rows if row.get("padding") and float(row["padding"]) > PADDED_SHARE]
    photos = len({row["source"] for row in rows}) + len(skipped)
    return {"photos": photos, "faces": len(rows), "skipped": skipped, "padded": padded,
            "padded_threshold": PADDED_SHARE}


def alignment_warnings(summary: dict | None) -> list[str]:
    if not summary:
        return []
    lines = []
    if summary["skipped"]:
        names = first_few((item["file"] for item in summary["skipped"]), 5)
        lines.append(f"--align skipped {len(summary['skipped'])} of {summary['photos']} photos "
                     f"(no face, unreadable, or not an image): {names}; see skipped in report.json")
    if summary["padded"]:
        worst = max(summary["padded"], key=lambda item: item["padding"])
        lines.append(f"{len(summary['padded'])} of {summary['faces']} aligned faces are more than "
                     f"{summary['padded_threshold']:.0%} edge padding (worst {worst['file']}: {worst['padding']:.0%}): "
                     "the face is small or near the photo's border; findings on them rest on invented pixels")
    return lines


def align_inputs(config, progress: ProgressFn = silent):
    """--align for diagnose, attack and augment: `config` with --images replaced by the aligned
    faces of its photos (written into OUT/aligned/ by the same alignment as `sia align`), and
    --attrs-file and --labels by copies whose rows follow each face's photo. Unchanged without
    --align. A rerun aligns again into the same folder: the same photos give the same crops, so
    the run resumes."""
    if not getattr(config, "align", False):
        return config
    from dataclasses import replace

    from sia_cli.backbone.registry import framing_of
    from sia_cli.runs.distributed import agree, join

    world, _ = join(config.device)
    folder = Path(config.out) / ALIGNED
    if Path(config.images).resolve() == (folder / "images").resolve():
        return replace(config, align=False)

    def run() -> None:
        if not world.main:
            return
        framing = framing_named(framing_of(config.gan))
        used = tuple(Path(p) for p in (config.attrs_file, config.labels) if p is not None)
        result = align_folder(AlignConfig(Path(config.images), folder, framing, used=used), RetinaFace(), progress)
        if not result.rows:
            raise SiaError(f"--align found no face in {config.images} (the photos are listed in {folder / UNALIGNED})")
        if config.attrs_file is not None:
            _aligned_attributes(Path(config.attrs_file), result.source_of(), folder / "list_attr.txt")
        if config.labels is not None:
            _aligned_labels(Path(config.labels), result.source_of(), folder / "labels.csv")

    agree(run, world)  # a collective: no rank goes on before rank 0 has written the crops
    return replace(config, images=folder / "images",
                   attrs_file=folder / "list_attr.txt" if config.attrs_file is not None else None,
                   labels=folder / "labels.csv" if config.labels is not None else None)


def _aligned_attributes(path: Path, sources: dict[str, str], dest: Path) -> None:
    """The photos' attribute rows, one per face (a face of an unlisted photo gets none: the run
    lists it as skipped, as it would the photo)."""
    from sia_cli.inputs.images import read_attributes
    from sia_cli.runs.files import format_list_attr

    table = read_attributes(path)
    faces = [face for face in sorted(sources) if sources[face] in table.rows]
    rows = [[1 if value > 0.5 else -1 for value in table.rows[sources[face]]] for face in faces]
    write_text_atomic(dest, format_list_attr(table.names, faces, rows))


def _aligned_labels(path: Path, sources: dict[str, str], dest: Path) -> None:
    """The photos' label rows, one per face. Class labels only: coordinates (keypoints) are in
    the photo's pixels, which the crop no longer has."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            table = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError) as exc:
        raise SiaError(f"cannot read --labels {path}: {exc}") from None
    if not table:
        raise SiaError(f"--labels {path} is empty")
    header, body = table[0], table[1:]
    if len(header) != 2:
        raise SiaError(f"--align carries class labels (file,label) only; {path} has {len(header)} columns "
                       "(coordinates of the photo would not fit the aligned crop)")
    by_photo = {row[0]: row[1] for row in body if len(row) == 2}
    lines = [header] + [[face, by_photo[sources[face]]] for face in sorted(sources) if sources[face] in by_photo]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(lines)
    write_text_atomic(dest, buffer.getvalue())


def _row(name: str, source: str, index: int, face: Face, matrix: np.ndarray, padding: float) -> dict:
    row = {"file": name, "source": source, "face": index, "score": round(float(face.score), 4),
           **{f"box_{k}": round(float(v), 1) for k, v in zip(("x0", "y0", "x1", "y1"), face.box)}}
    for landmark in LANDMARKS:
        point = face.points.get(landmark)
        row[f"{landmark}_x"] = "" if point is None else round(float(point[0]), 2)
        row[f"{landmark}_y"] = "" if point is None else round(float(point[1]), 2)
    row.update({f"m{i}": round(float(v), 6) for i, v in enumerate(matrix.ravel())})
    row["padding"] = round(padding, 3)
    return row


def _csv(rows: Sequence[dict], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def table_columns() -> list[str]:
    return (["file", "source", "face", "score", "box_x0", "box_y0", "box_x1", "box_y1"]
            + [f"{n}_{a}" for n in LANDMARKS for a in "xy"] + [f"m{i}" for i in range(6)] + ["padding"])


def _write_tables(out: Path, result: Aligned) -> None:
    write_text_atomic(out / TABLE, _csv(result.rows, table_columns()))
    write_text_atomic(out / UNALIGNED, _csv(result.unaligned, ["source", "reason"]))
