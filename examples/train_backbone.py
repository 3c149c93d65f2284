"""Train the example AttGAN backbone shipped in sia_cli/backbone/builtin/synth-faces-64/ (synthetic faces, 64x64).

    python examples/train_backbone.py --device cuda --minutes 7 --export sia_cli/backbone/builtin/synth-faces-64

It draws a synthetic data set with `sia synth`'s generator, trains with `sia train-gan`'s
engine, and exports the generator and critic (no optimiser states, to keep the file small)
in the public checkpoint layout: setting.txt + checkpoint/weights.<step>.pth.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from sia_cli.backbone.attgan import SETTING_FILE, latest_checkpoint
from sia_cli.backbone.training import TrainConfig, train_gan
from sia_cli.inputs.faces import ATTRIBUTES, make_dataset


def export(run: Path, dest: Path) -> Path:
    checkpoint = latest_checkpoint(run)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    (dest / "checkpoint").mkdir(parents=True, exist_ok=True)
    shutil.copy(run / SETTING_FILE, dest / SETTING_FILE)
    target = dest / "checkpoint" / checkpoint.name
    torch.save({"G": state["G"], "D": state["D"], "sia": state["sia"]}, target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000, help="synthetic training images")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100000, help="generator steps at most")
    parser.add_argument("--minutes", type=float, default=7.0, help="training time limit")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-d", type=int, default=5, help="critic steps per generator step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sia-backbone"))
    parser.add_argument("--export", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    began = time.time()
    data = args.work / "data"
    if not (data / "list_attr.txt").exists():
        make_dataset(data, args.n, seed=1000 + args.seed, size=args.size)
    print(f"data ready in {time.time() - began:.0f} s", flush=True)

    def report(task, done, total, info=None):
        if done % 100 == 0:
            print(task, done, total, {k: round(v, 3) for k, v in (info or {}).items()}, flush=True)

    config = TrainConfig(
        images=data / "images", attrs_file=data / "list_attr.txt", attributes=list(ATTRIBUTES),
        out=args.work / "run", img_size=args.size, batch_size=args.batch_size, max_steps=args.steps,
        n_d=args.n_d, sample_every=100, save_every=100, device=args.device, seed=args.seed, preload=True,
        time_limit=args.minutes * 60, resume=True,
    )
    summary = train_gan(config, report)
    print(summary, flush=True)
    print("exported", export(config.out, args.export), flush=True)


if __name__ == "__main__":
    main()
