"""Train the default backbone shipped in sia_cli/backbone/builtin/synth-faces-64/ (64x64 synth
faces, supervised with the renderer's true counterfactuals; docs/backbone.md). Three stages
train the whole generator:

    python examples/train_backbone.py --work /tmp/sia-backbone --export /tmp/stage-1
    python examples/train_backbone.py --work /tmp/sia-backbone-2 --from /tmp/stage-1 --steps 22000 \\
        --lambda-change 300 --export /tmp/stage-2
    python examples/train_backbone.py --work /tmp/sia-backbone-3 --from /tmp/stage-2 --steps 29000 \\
        --lr 8e-4 --lambda-change 300 --refine-layers 1 --change-focus 2 --export /tmp/stage-3

a fourth, tried and replaced by the fifth (docs/backbone.md, "A fourth stage: detail at full
resolution"), trained every weight with a detail block added:

    python examples/train_backbone.py --work /tmp/sia-backbone-4 --from /tmp/stage-3 \\
        --steps 33000 --lr 1.6e-3 --lambda-change 300 --refine-layers 1 --detail-layers 1 --change-focus 2 \\
        --export /tmp/stage-4

and the fifth, which gives the shipped weights (docs/backbone.md, "A gate on the detail block"),
trains the detail block alone, every other weight the third stage's; the run trains a critic
beside it, and the export keeps the third stage's critic instead, whose scores backbone fit
reads, and sets the block's gate (trained without one: see the docs):

    python examples/train_backbone.py --work /tmp/sia-backbone-5 --from /tmp/stage-3 \\
        --steps 33000 --lr 1.6e-3 --lambda-change 300 --refine-layers 1 --detail-layers 1 --change-focus 2 \\
        --detail-only --critic-from-start --export-gate 0.03 --export sia_cli/backbone/builtin/synth-faces-64

The third stage's export is in git history (`git show
4151215:sia_cli/backbone/builtin/synth-faces-64/checkpoint/weights.29000.pth` with that
commit's setting.txt beside it), so the fifth runs alone from the repository.

The first stage runs, and prints, the `sia` commands of the whole recipe:

    sia synth WORK/data --n 6000 --seed 1000
    sia train-gan --images WORK/data/images --attrs WORK/data/list_attr.txt --out WORK/run \\
        --max-steps 14000 --batch-size 32 --n-d 1 --shortcut-layers 3 --inject-layers 3 \\
        --lr 4e-4 --lr-schedule cosine --lambda-change 100 --save-every 1000 --sample-every 1000 \\
        --judge examples/targets/attribute_judge.pt

The second continues from the first's export (`--from`: its weights without optimiser states
become step 14,000 of a run to 22,000, a warm restart of the cosine schedule at 1.3e-4) with
three times the weight on the change loss, on the same faces drawn again (the same seed). The
third adds a refine block (as the identity) and weighs the change loss toward the edits the
generator does worst by its own loss, for 7,000 more steps. The fourth and fifth add a detail
block at the image's own resolution that reads the input image (attgan.Detail, as the
identity). Each stage also starts from the weights the repository keeps (git history holds the
earlier stages' files).

`sia train-gan` supervises every one-attribute edit with the renderer's true counterfactual (the
folder is a `sia synth` set), beside AttGAN's own losses. Run again after an interruption: it
resumes from the last checkpoint in WORK/run. The export keeps the generator and critic (no
optimiser states: the file stays under 5 MB) in the public checkpoint layout, setting.txt +
checkpoint/weights.<step>.pth. `--judge` only measures the finished backbone for its training
card; the shipped card.json is measured afterwards on fresh faces by
`examples/measure_backbone.py --write-card`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from sia_cli.backbone.attgan import SETTING_FILE, Generator, GeneratorConfig, checkpoint_number, latest_checkpoint
from sia_cli.backbone.registry import read_setting

JUDGE = Path(__file__).resolve().parent / "targets" / "attribute_judge.pt"


def recipe(work: Path, faces: int, steps: int, lambda_change: float, lr: float = 4e-4, refine_layers: int = 0,
           change_focus: float = 0.0, detail_layers: int = 0, detail_only: bool = False,
           detail_gate: float = 0.0) -> list[list[str]]:
    data = work / "data"
    synth = ["synth", str(data), "--n", str(faces), "--seed", "1000", "--no-progress"]
    train = ["train-gan", "--images", str(data / "images"), "--attrs", str(data / "list_attr.txt"),
             "--out", str(work / "run"), "--max-steps", str(steps), "--batch-size", "32", "--n-d", "1",
             "--shortcut-layers", "3", "--inject-layers", "3", "--refine-layers", str(refine_layers),
             "--detail-layers", str(detail_layers), "--lr", f"{lr:g}", "--lr-schedule", "cosine",
             "--lambda-change", f"{lambda_change:g}", "--change-focus", f"{change_focus:g}", "--save-every", "1000", "--sample-every", "1000",
             "--detail-gate", f"{detail_gate:g}", "--judge", str(JUDGE), "--no-progress"] + (
                 ["--detail-only"] if detail_only else [])
    last = latest_checkpoint(work / "run")
    if last is not None and checkpoint_number(last) >= steps:
        train = None  # done: `sia train-gan` refuses a finished run without --force
    return ([] if (data / "list_attr.txt").is_file() else [synth]) + ([train] if train else [])


def warm_start(backbone: Path, run: Path, refine_layers: int = 0, detail_layers: int = 0) -> None:
    """Continue from a backbone folder (setting.txt + checkpoint/weights.N.pth, no optimiser
    states): its weights become the run's first checkpoint, and training resumes at step N with
    fresh Adam moments and the learning rate the schedule gives step N of the new --steps.
    Refine and detail blocks the backbone lacks are added as built (attgan.Refine and
    attgan.Detail start as the identity), so the warm-started generator draws exactly what the
    backbone drew."""
    if latest_checkpoint(run) is not None:
        return  # already started: resume the run itself
    source = latest_checkpoint(backbone)
    if source is None:
        raise SystemExit(f"--from {backbone}: no checkpoint/weights.N.pth there")
    (run / "checkpoint").mkdir(parents=True, exist_ok=True)
    shutil.copy(backbone / SETTING_FILE, run / SETTING_FILE)
    state = torch.load(source, map_location="cpu", weights_only=True)
    setting = {**read_setting(backbone / SETTING_FILE), "refine_layers": refine_layers, "detail_layers": detail_layers}
    generator = Generator(GeneratorConfig.from_setting(setting))
    missing, unexpected = generator.load_state_dict(state["G"], strict=False)
    if unexpected or any(not key.startswith(("refine.", "detail.")) for key in missing):
        raise SystemExit(f"--from {backbone}: its generator does not fit --refine-layers {refine_layers} "
                         f"--detail-layers {detail_layers}")
    state["G"] = generator.state_dict()
    torch.save(state, run / "checkpoint" / source.name)


def export(run: Path, dest: Path, critic_from: Path | None = None, detail_gate: float | None = None) -> Path:
    """The run's last generator and critic, without optimiser states; with `critic_from` (a
    backbone folder) that backbone's critic instead of the run's; with `detail_gate` that gate
    in the exported setting.txt (attgan.Detail: it has no weights, so a block trained without
    it can be exported with it)."""
    checkpoint = latest_checkpoint(run)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if critic_from is not None:
        state["D"] = torch.load(latest_checkpoint(critic_from), map_location="cpu", weights_only=True)["D"]
    folder = dest / "checkpoint"
    if folder.is_dir():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    setting = read_setting(run / SETTING_FILE)
    if detail_gate is not None:
        setting["detail_gate"] = detail_gate
    (dest / SETTING_FILE).write_text(json.dumps(setting, indent=4) + "\n")
    target = folder / checkpoint.name
    torch.save({"G": state["G"], "D": state["D"], "sia": state["sia"]}, target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sia-backbone"))
    parser.add_argument("--faces", type=int, default=6000, help="synthetic training faces")
    parser.add_argument("--steps", type=int, default=14000, help="generator steps")
    parser.add_argument("--lambda-change", type=float, default=100.0, help="weight of the change loss")
    parser.add_argument("--lr", type=float, default=4e-4, help="peak learning rate of the cosine schedule")
    parser.add_argument("--refine-layers", type=int, default=0, help="residual blocks before the image layer")
    parser.add_argument("--detail-layers", type=int, default=0,
                        help="blocks at the image's resolution that read the input image")
    parser.add_argument("--detail-only", action="store_true",
                        help="train the detail blocks alone: the rest of the generator keeps the --from weights")
    parser.add_argument("--detail-gate", type=float, default=0.0,
                        help="fade the detail blocks where the decoder's image departs this far from the input "
                             "(sia train-gan --detail-gate)")
    parser.add_argument("--change-focus", type=float, default=0.0,
                        help="weigh the change loss of the edits the generator does worst (sia train-gan --change-focus)")
    parser.add_argument("--from", dest="start", type=Path, default=None,
                        help="continue from this backbone folder (the second stage: see docs/backbone.md)")
    parser.add_argument("--export", type=Path, default=None, help="write the backbone here when done")
    parser.add_argument("--critic-from-start", action="store_true",
                        help="export the --from backbone's critic with the new generator (a detail stage: the "
                             "critic that scores photos for backbone fit stays the one it was)")
    parser.add_argument("--export-gate", type=float, default=None,
                        help="the detail gate the exported setting.txt gives (default: the run's own); the "
                             "candidate's block was trained without one and is exported with it")
    args = parser.parse_args()
    if args.critic_from_start and args.start is None:
        parser.error("--critic-from-start needs --from")
    if args.start is not None:
        warm_start(args.start, args.work / "run", args.refine_layers, args.detail_layers)
    for command in recipe(args.work, args.faces, args.steps, args.lambda_change, args.lr, args.refine_layers,
                          args.change_focus, args.detail_layers, args.detail_only, args.detail_gate):
        print("sia", shlex.join(command), flush=True)
        subprocess.run([sys.executable, "-m", "sia_cli", *command], check=True)
    if args.export:
        critic_from = args.start if args.critic_from_start else None
        print("exported", export(args.work / "run", args.export, critic_from, args.export_gate), flush=True)


if __name__ == "__main__":
    main()
