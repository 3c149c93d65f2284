"""Measure `sia align` on photos whose true landmarks are known (README, "Real photos: `sia align`").

    python examples/measure_alignment.py

Synth faces (`sia synth`'s renderer, which knows each face's five landmarks) are placed into
640x480 photos with known transforms: scaled, rotated, one or three per photo, some grayscale,
on a real scikit-image photo as background. `sia align` (the RetinaFace detector) runs on them.
Printed, as Markdown:

- detection rate (faces found / faces placed), false detections (a found face matching no
  placed face), and the same on scikit-image's real photos (astronaut: one face; cat, coffee:
  none) and its LFW subset (25x25 faces, as shipped and upscaled x4);
- landmark error: the detected eyes (and nose, mouth corners) against the true points, in units
  of the true inter-ocular distance; and alignment error: the true eyes mapped by the alignment
  transform against where the framing puts them, in units of the framing's inter-ocular distance;
- with the shipped backbone, its fit (sia_cli.measures.trust: the share of images in its domain by the
  critic margin, and the reconstruction error) on the aligned crops against the centre crops of
  the same photos that the other commands would take without `--align`.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sia_cli.inputs.align import LANDMARKS, AlignConfig, align_folder, apply, framing_named
from sia_cli.inputs.faces import face_labels, render_index
from sia_cli.inputs.images import load_image
from sia_cli.measures import trust

CANVAS = (640, 480)


def place(canvas: Image.Image, face: Image.Image, points: np.ndarray, scale: float, angle: float,
          centre: tuple[float, float]) -> np.ndarray:
    """Paste `face` scaled by `scale`, rotated by `angle` degrees (counter-clockwise) about its
    centre, centred at `centre`; returns its landmarks in canvas pixels."""
    side = face.width
    t = math.radians(angle)
    rotation = np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]]) * scale
    middle = (side - 1) / 2
    # canvas = rotation @ (face - middle) + centre; PIL wants canvas -> face, pixel centres at +0.5.
    inverse = np.linalg.inv(rotation)
    offset = np.array([middle, middle]) - inverse @ np.asarray(centre)
    shift = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
    forward = np.vstack([np.hstack([inverse, offset[:, None]]), [0, 0, 1]])
    coefficients = (shift @ forward @ np.linalg.inv(shift))[:2].ravel()
    mask = Image.new("L", face.size, 255).transform(canvas.size, Image.Transform.AFFINE, tuple(coefficients),
                                                    resample=Image.Resampling.BILINEAR)
    moved = face.transform(canvas.size, Image.Transform.AFFINE, tuple(coefficients), resample=Image.Resampling.BICUBIC)
    canvas.paste(moved, (0, 0), mask)
    return (points - middle) @ rotation.T + np.asarray(centre)


def make_photos(folder: Path, photos: int, seed: int, face_side: int = 128) -> dict[str, list[list[list[float]]]]:
    """`photos` 640x480 photos of synth faces with known transforms; returns each photo's true
    landmarks (a list per face of five [x, y])."""
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    backgrounds = [skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    rng = np.random.default_rng(seed)
    truth = {}
    for number in range(photos):
        background = Image.fromarray(backgrounds[number % len(backgrounds)]).convert("RGB").resize(CANVAS)
        several = number % 4 == 3  # one photo in four holds three faces
        count = 3 if several else 1
        faces = []
        for k in range(count):
            index = number * 3 + k
            image, points = render_index(face_labels(seed, index), seed, index, face_side)
            scale = rng.uniform(0.6, 1.0) if several else rng.uniform(0.5, 3.0)
            angle = rng.uniform(-20, 20)
            half = face_side * scale / 2 * 1.42  # the rotated square's reach
            if several:
                centre = (CANVAS[0] * (k + 0.5) / 3, rng.uniform(half, CANVAS[1] - half))
            else:
                centre = (rng.uniform(half, max(half + 1, CANVAS[0] - half)),
                          rng.uniform(min(half, CANVAS[1] / 2), max(CANVAS[1] / 2, CANVAS[1] - half)))
            faces.append(place(background, image, points, scale, angle, centre).tolist())
        if number % 4 == 1:
            background = background.convert("L")
        name = f"photo{number:03d}.png"
        background.save(folder / name)
        truth[name] = faces
    return truth


def match(rows: list[dict], truth: dict[str, list]) -> list[tuple[dict, np.ndarray]]:
    """Each alignment row with the placed face it found (nearest eye centre within one
    inter-ocular distance); unmatched rows are false detections."""
    matched = []
    for row in rows:
        eyes = np.array([[row["lefteye_x"], row["lefteye_y"]], [row["righteye_x"], row["righteye_y"]]], float)
        best, distance = None, math.inf
        for face in truth.get(row["source"], []):
            face = np.asarray(face)
            gap = np.linalg.norm(eyes.mean(0) - face[:2].mean(0))
            if gap < distance:
                best, distance = face, gap
        if best is not None and distance < np.linalg.norm(best[1] - best[0]):
            matched.append((row, best))
    return matched


def errors(matched: list[tuple[dict, np.ndarray]], framing) -> dict:
    """Landmark and alignment errors in inter-ocular units (mean, median, max)."""
    landmark, aligned = [], []
    target = framing.target()
    framing_iod = np.linalg.norm(target[1] - target[0])
    for row, face in matched:
        found = np.array([[row[f"{n}_x"], row[f"{n}_y"]] for n in LANDMARKS], float)
        iod = np.linalg.norm(face[1] - face[0])
        landmark.append(np.linalg.norm(found - face, axis=1).max() / iod)
        matrix = np.array([row[f"m{i}"] for i in range(6)], float).reshape(2, 3)
        aligned.append(np.linalg.norm(apply(matrix, face[:2]) - target[:2], axis=1).max() / framing_iod)

    def summary(values):
        return {"mean": float(np.mean(values)), "median": float(np.median(values)), "max": float(np.max(values))} \
            if values else None

    return {"landmarks": summary(landmark), "eyes_aligned": summary(aligned)}


@torch.no_grad()
def fit(backbone, files: list[Path]) -> dict:
    """The backbone's fit on these images (centre-cropped to a square, as every command loads them)."""
    x = torch.stack([load_image(f, backbone.img_size) for f in files]) * 2 - 1
    a0 = backbone.predict_attributes(x)
    reconstruction = backbone(x, a0)
    score, margin = backbone.critic_scores(x, reconstruction)
    inside = [trust.in_domain(float(m), backbone.info.card, float(c)) for m, c in zip(margin, score)]
    return {"images": len(files), "in_domain": float(np.mean(inside)) if None not in inside else None,
            "mae": float(((reconstruction - x).abs().mean(dim=(1, 2, 3)) / 2).mean())}


def real_photos(folder: Path) -> dict[str, int]:
    """scikit-image's photos with the number of faces each holds."""
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, array, faces in (("astronaut.png", skimage.data.astronaut(), 1), ("cat.png", skimage.data.chelsea(), 0),
                               ("coffee.png", skimage.data.coffee(), 0)):
        Image.fromarray(array).save(folder / name)
        counts[name] = faces
    return counts


def lfw(folder: Path, n: int, upscale: int) -> list[str]:
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, face in enumerate(skimage.data.lfw_subset()[:n]):
        image = Image.fromarray((face * 255).astype(np.uint8))
        if upscale > 1:
            image = image.resize((25 * upscale, 25 * upscale), Image.Resampling.BICUBIC)
            canvas = Image.new("L", (200, 200), 128)
            canvas.paste(image, (100 - image.width // 2, 100 - image.height // 2))
            image = canvas
        image.save(folder / f"lfw{i:03d}.png")
        names.append(f"lfw{i:03d}.png")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=40)
    parser.add_argument("--seed", type=int, default=5100)
    parser.add_argument("--min-score", type=float, default=0.5)
    parser.add_argument("--gan", default=None)
    args = parser.parse_args()
    from sia_cli.backbone.registry import framing_of, load_backbone
    from sia_cli.inputs.detectors import RetinaFace

    detector = RetinaFace(min_score=args.min_score)
    framing = framing_named(framing_of(args.gan))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        truth = make_photos(root / "photos", args.photos, args.seed)
        result = align_folder(AlignConfig(root / "photos", root / "aligned", framing), detector)
        matched = match(result.rows, truth)
        placed = sum(len(faces) for faces in truth.values())
        found = errors(matched, framing)
        real = real_photos(root / "real")
        real_rows = align_folder(AlignConfig(root / "real", root / "real-aligned", framing), detector).rows
        per_photo = {name: sum(r["source"] == name for r in real_rows) for name in real}
        lfw_found = {}
        for upscale in (1, 4):
            names = lfw(root / f"lfw{upscale}", 20, upscale)
            rows = align_folder(AlignConfig(root / f"lfw{upscale}", root / f"lfw{upscale}-aligned", framing),
                                detector).rows
            lfw_found[upscale] = len({r["source"] for r in rows}) / len(names)
        backbone = load_backbone(args.gan)
        photos = sorted((root / "photos").glob("*.png"))
        crops = sorted((root / "aligned" / "images").glob("*.png"))
        fit_centre, fit_aligned = fit(backbone, photos), fit(backbone, crops)
    figures = {
        "detector": f"{detector.name} {detector.version}", "min_score": args.min_score, "framing": framing.name,
        "synth": {"placed": placed, "found": len(matched), "rate": len(matched) / placed,
                  "false": len(result.rows) - len(matched), **found},
        "real": per_photo, "lfw_found": lfw_found,
        "fit": {"centre_crop": fit_centre, "aligned": fit_aligned},
    }
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
