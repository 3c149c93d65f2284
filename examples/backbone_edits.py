"""Draw a backbone's edits: each row a fresh synth face, then its reconstruction and each
attribute flipped in turn, as a diagnosis flips it (attgan.edited: turning a hair colour on
turns the others off). docs/backbone_edits.png is

    python examples/backbone_edits.py docs/backbone_edits.png

(the default backbone, 6 faces of seed 4242, a seed no training used).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from measure_backbone import fresh_faces  # this folder's: the faces the card is measured on, drawn alike
from torchvision.utils import make_grid, save_image

from sia_cli.backbone.attgan import edited
from sia_cli.backbone.registry import load_backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--gan", default=None, help="backbone name or folder (default: the default backbone)")
    parser.add_argument("--n", type=int, default=6, help="faces, one per row")
    parser.add_argument("--seed", type=int, default=4242)
    args = parser.parse_args()
    backbone = load_backbone(args.gan)
    names = list(backbone.attributes)
    images, attrs = fresh_faces(args.n, args.seed, backbone.info.img_size, names)
    x = images * 2 - 1
    with torch.no_grad():
        columns = [x, backbone(x, attrs)] + [backbone(x, edited(attrs, k, names)[0]) for k in range(len(names))]
    grid = torch.stack(columns, dim=1).flatten(0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(grid, nrow=len(columns), normalize=True, value_range=(-1, 1)), args.out)
    print(f"{args.out}: columns original, reconstruction, {', '.join(names)}")


if __name__ == "__main__":
    main()
