"""Measure how well a backbone's attribute inputs control its images (README table).

    python examples/measure_backbone.py --gan synth-faces-64 --n 300 --write-card sia_cli/backbones/synth-faces-64/card.json

Fresh synthetic faces (a seed no training set used) are edited one attribute at a time;
`examples/targets/attribute_judge.pt`, a classifier of every synth attribute, says whether
the edit shows. Prints a Markdown table: edit success per attribute and reconstruction error.
`--write-card` also stores the figures as the backbone's card (`card.json` beside its
setting.txt): the edit success that names blind spots in every report, and the critic's domain
calibration behind `backbone_fit` (sia_cli.trust).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from sia_cli.data import load_image, read_attributes
from sia_cli.faces import make_dataset
from sia_cli.registry import load_backbone
from sia_cli.target import load_target
from sia_cli.training import edit_success
from sia_cli.trust import calibrate_domain


def measure(gan: str | None, judge_path: Path, n: int, seed: int) -> dict:
    backbone = load_backbone(gan)
    judge = load_target(judge_path, task="multiclass", probe_size=backbone.img_size)
    with tempfile.TemporaryDirectory() as tmp:
        make_dataset(Path(tmp), n, seed=seed, size=backbone.img_size)
        table = read_attributes(Path(tmp) / "list_attr.txt").select(backbone.attributes)
        images = torch.stack([load_image(Path(tmp) / "images" / f, backbone.img_size) for f in table.rows])
        attrs = torch.from_numpy(np.stack([table.rows[f] for f in table.rows]))
    with torch.no_grad():
        return {**edit_success(backbone, judge, images, attrs), "domain": calibrate_domain(backbone, images, attrs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gan", default=None)
    parser.add_argument("--judge", type=Path, default=Path(__file__).parent / "targets" / "attribute_judge.pt")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--seed", type=int, default=77)
    parser.add_argument("--write-card", type=Path, default=None, help="write the figures to this card.json")
    args = parser.parse_args()
    result = measure(args.gan, args.judge, args.n, args.seed)
    if args.write_card:
        card = {
            "edit_success": {name: round(rate, 3) for name, rate in result["edit_success"].items()},
            "reconstruction_l1": round(result["reconstruction_l1"], 4),
            "domain": result["domain"],
            "measured": f"examples/measure_backbone.py --n {args.n} --seed {args.seed}, judge {args.judge.name}",
        }
        args.write_card.write_text(json.dumps(card, indent=2) + "\n")
    print("| attribute | edit success |\n| --- | --- |")
    for name, rate in result["edit_success"].items():
        print(f"| {name} | {rate:.2f} |")
    mean = sum(result["edit_success"].values()) / len(result["edit_success"])
    print(f"| **mean** | **{mean:.2f}** |")
    print(f"\nreconstruction mean absolute error: {result['reconstruction_l1']:.3f} (images in [0, 1])")
    print(f"critic margin on these faces: median {result['domain'].get('critic_margin_median')}, "
          f"5th percentile {result['domain'].get('critic_margin_p05')}")


if __name__ == "__main__":
    main()
