"""Measure what separates images a backbone knows from images it does not (README, "When not to trust").

    python examples/measure_fit.py --gan synth-faces-64

For fresh synth faces (in-domain), real faces and non-faces from scikit-image's LFW subset and
a few scikit-image photos (the astronaut, coffee, a cat, a rocket, ...), prints per set: the
reconstruction's mean absolute error and SSIM against the image, the critic's score of the image
and its margin (AttGAN.critic_scores: the score minus that of the reconstruction) and the
share of images that sia_cli.measures.trust counts as in the backbone's domain, and the share lost in
reconstruction under three example targets. The starting attributes come from the
discriminator, as they would for a user's unlabeled photos.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import skimage.data
import torch
from PIL import Image

from sia_cli.backbone.registry import load_backbone
from sia_cli.inputs.images import load_image
from sia_cli.inputs.synth import make_dataset
from sia_cli.measures import trust
from sia_cli.reports.figures import image_quality
from sia_cli.targets import load_target

TARGETS = Path(__file__).parent / "targets"
MODELS = ("mustache_confounded", "smiling_control", "landmarks")


def image_sets(root: Path, n: int, seed: int) -> dict[str, list[Path]]:
    make_dataset(root / "synth", n, seed=seed, size=64)
    lfw = skimage.data.lfw_subset()  # 100 faces, then 100 non-faces, 25x25 grey
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket(),
              skimage.data.camera(), skimage.data.immunohistochemistry(), skimage.data.hubble_deep_field(),
              skimage.data.retina()]
    arrays = {"LFW faces": [(x * 255).astype(np.uint8) for x in lfw[:n]],
              "LFW non-faces": [(x * 255).astype(np.uint8) for x in lfw[100:100 + n]],
              "scikit-image photos": photos, "astronaut, face crop": [skimage.data.astronaut()[0:300, 100:400]]}
    sets = {"synth faces": sorted((root / "synth" / "images").glob("*.png"))}
    for name, images in arrays.items():
        folder = root / name.replace(" ", "_").replace(",", "")
        folder.mkdir()
        for i, array in enumerate(images):
            Image.fromarray(array).save(folder / f"{i:04d}.png")
        sets[name] = sorted(folder.glob("*.png"))
    return sets


@torch.no_grad()
def measure(backbone, targets: dict, files: list[Path]) -> dict:
    x = torch.stack([load_image(f, backbone.img_size) for f in files]) * 2 - 1
    a0 = backbone.predict_attributes(x)
    reconstruction = backbone(x, a0)
    score, margin = backbone.critic_scores(x, reconstruction)
    _, ssim = image_quality((reconstruction + 1) / 2, (x + 1) / 2)
    lost = {}
    for name, target in targets.items():
        clean = target(x)
        lost[name] = float(target.success(target(reconstruction), target.reference(clean)).float().mean())
    inside = [trust.in_domain(float(m), backbone.info.card, float(c)) for m, c in zip(margin, score)]
    return {"images": len(files), "mae": float(((reconstruction - x).abs().mean(dim=(1, 2, 3)) / 2).mean()),
            "ssim": float(np.mean(ssim)), "margin": np.percentile(margin.numpy(), [0, 50, 100]),
            "score": np.percentile(score.numpy(), [0, 50, 100]),
            "in_domain": float(np.mean(inside)) if None not in inside else None, "lost": lost}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gan", default=None)
    parser.add_argument("--n", type=int, default=48, help="images per synth/LFW set")
    parser.add_argument("--seed", type=int, default=901)
    args = parser.parse_args()
    torch.manual_seed(0)
    backbone = load_backbone(args.gan)
    targets = {name: load_target(TARGETS / f"{name}.pt", probe_size=backbone.img_size) for name in MODELS}
    with tempfile.TemporaryDirectory() as tmp:
        sets = image_sets(Path(tmp), args.n, args.seed)
        rows = {name: measure(backbone, targets, files) for name, files in sets.items()}
    print("| images | n | recon. MAE | recon. SSIM | critic margin min / median / max | "
          "critic score min / median / max | in domain | " + " | ".join(f"lost: {name}" for name in MODELS) + " |")
    print("| --- " * (7 + len(MODELS)) + "|")
    for name, row in rows.items():
        margin = " / ".join(f"{v:.2f}" for v in row["margin"])
        score = " / ".join(f"{v:.2f}" for v in row["score"])
        inside = "unknown" if row["in_domain"] is None else f"{row['in_domain']:.2f}"
        lost = " | ".join(f"{row['lost'][m]:.2f}" for m in MODELS)
        print(f"| {name} | {row['images']} | {row['mae']:.3f} | {row['ssim']:.3f} | {margin} | {score} | {inside} | "
              f"{lost} |")
    domain = backbone.info.card.get("domain") or {}
    print(f"\ncalibrated median critic margin of the backbone: {domain.get('critic_margin_median')}; critic margin "
          f"floor: {domain.get('critic_margin_floor')}; critic score floor: {domain.get('critic_score_floor')}; "
          f"backbone fit is {trust.fit_rule(domain)}")


if __name__ == "__main__":
    main()
