"""Measure how well a backbone's attribute inputs control its images (README table).

    python examples/measure_backbone.py --gan synth-faces-64 --n 300 --write-card sia_cli/backbone/builtin/synth-faces-64/card.json

Fresh synthetic faces (a seed no training set used) are edited one attribute at a time;
`examples/targets/attribute_judge.pt`, a classifier of every synth attribute, says whether
the edit shows. Prints Markdown tables:

- the judge's own accuracy per attribute on these faces, as drawn (edit success is only as
  right as its judge);
- per attribute: edit success (the judged attribute changes), its off-target change rate
  (the share of faces on which the judge sees any other attribute change between the
  reconstruction and the edit; an edit that changes what it should not is a failure), the
  mean over the other attributes of each one's change rate, the one that changes most, and
  clean edit success (the edit shows and nothing else changes);
- the reconstruction error and the critic's margin.

`--truth` judges the renderer's own counterfactuals (the same faces drawn again with each
edit: a perfect backbone) the same way: the ceiling of each figure under this judge.

`--write-card` also stores the figures as the backbone's card (`card.json` beside its
setting.txt): the edit success that names blind spots in every report, the off-target rates
and judge accuracy behind it, and the critic's domain calibration behind `backbone_fit`
(sia_cli.measures.trust).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from sia_cli.backbone.judging import edit_success, judge_accuracy, judged_card
from sia_cli.backbone.registry import load_backbone
from sia_cli.inputs.faces import render_index
from sia_cli.inputs.images import image_tensor, load_image, read_attributes
from sia_cli.inputs.synth import make_dataset
from sia_cli.measures.trust import calibrate_domain
from sia_cli.targets import load_target


def fresh_faces(n: int, seed: int, size: int, attributes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """n synthetic faces in [0, 1] and their attributes, drawn with `seed`."""
    with tempfile.TemporaryDirectory() as tmp:
        make_dataset(Path(tmp), n, seed=seed, size=size)
        table = read_attributes(Path(tmp) / "list_attr.txt").select(attributes)
        images = torch.stack([load_image(Path(tmp) / "images" / f, size) for f in table.rows])
        attrs = torch.from_numpy(np.stack([table.rows[f] for f in table.rows]))
    return images, attrs


class Renderer:
    """The renderer as a perfect backbone of the faces `fresh_faces` drew: asked for attributes
    `a`, it draws the same face with them (faces.render_index), and given a face's own
    attributes it returns the face itself. Judged like a backbone, it gives the ceiling of the
    measure: what the judge makes of the true edits (a true edit may change what the judge sees
    of another attribute: hair gone with Bald leaves no hair colour to see)."""

    def __init__(self, attributes: list[str], images: torch.Tensor, seed: int):
        self.attributes = attributes
        self.seed, self.size = seed, images.shape[-1]
        self.index = {self._key(image * 2 - 1): i for i, image in enumerate(images)}

    @staticmethod
    def _key(x: torch.Tensor) -> bytes:
        return (x * 127.5 + 127.5).round().to(torch.uint8).numpy().tobytes()

    def __call__(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        faces = []
        for image, row in zip(x, a):
            index = self.index[self._key(image)]
            drawn = render_index(dict(zip(self.attributes, (row > 0.5).tolist())), self.seed, index, self.size)[0]
            faces.append(image_tensor(drawn, self.size) * 2 - 1)
        return torch.stack(faces)


def measure_truth(gan: str | None, judge_path: Path, n: int, seed: int) -> dict:
    """`edit_success` of the renderer's own counterfactuals (the ceiling of every figure)."""
    attributes = load_backbone(gan).attributes
    judge = load_target(judge_path, task="multiclass", probe_size=64)
    images, attrs = fresh_faces(n, seed, 64, attributes)
    with torch.no_grad():
        return edit_success(Renderer(attributes, images, seed), judge, images, attrs)


def measure(gan: str | None, judge_path: Path, n: int, seed: int) -> dict:
    backbone = load_backbone(gan)
    judge = load_target(judge_path, task="multiclass", probe_size=backbone.img_size)
    images, attrs = fresh_faces(n, seed, backbone.img_size, backbone.attributes)
    with torch.no_grad():
        return {**edit_success(backbone, judge, images, attrs),
                "judge": judge_accuracy(judge, backbone.attributes, images, attrs),
                "domain": calibrate_domain(backbone, images, attrs)}


def markdown(result: dict, n: int) -> str:
    judged = result["judge"]
    lines = [f"Judge accuracy on the {n} faces as drawn:\n",
             "| attribute | accuracy | balanced accuracy | faces with it |", "| --- | --- | --- | --- |"]
    for name, accuracy in judged["accuracy"].items():
        lines.append(f"| {name} | {accuracy:.3f} | {judged['balanced_accuracy'][name]:.3f} | "
                     f"{judged['positive_share'][name]:.2f} |")
    lines.append(f"| **lowest** | **{min(judged['accuracy'].values()):.3f}** | "
                 f"**{min(judged['balanced_accuracy'].values()):.3f}** | |")
    lines += ["", "Edits, one attribute at a time:\n",
              "| attribute | edit success | off-target change (any other) | mean over others | "
              "most changed other | clean edit success |", "| --- | --- | --- | --- | --- | --- |"]
    columns = ("edit_success", "off_target_change", "off_target_change_mean", "clean_edit_success")
    for name in result["edit_success"]:
        by_other = result["off_target_by_attribute"][name]
        worst = max(by_other, key=by_other.get) if by_other else None
        most = f"{worst} {by_other[worst]:.2f}" if worst else "-"
        success, any_other, mean_other, clean = (result[c][name] for c in columns)
        lines.append(f"| {name} | {success:.2f} | {any_other:.2f} | {mean_other:.3f} | {most} | {clean:.2f} |")
    means = [sum(result[c].values()) / len(result[c]) for c in columns]
    lines.append(f"| **mean** | **{means[0]:.2f}** | **{means[1]:.2f}** | **{means[2]:.3f}** | | **{means[3]:.2f}** |")
    lines.append(f"\nreconstruction mean absolute error: {result['reconstruction_l1']:.3f} (images in [0, 1])")
    lines.append(f"critic margin on these faces: median {result['domain'].get('critic_margin_median')}, "
                 f"5th percentile {result['domain'].get('critic_margin_p05')}; critic score median "
                 f"{result['domain'].get('critic_score_median')}, floor (1st percentile) "
                 f"{result['domain'].get('critic_score_floor')}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gan", default=None)
    parser.add_argument("--judge", type=Path, default=Path(__file__).parent / "targets" / "attribute_judge.pt")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--seed", type=int, default=77)
    parser.add_argument("--write-card", type=Path, default=None, help="write the figures to this card.json")
    parser.add_argument("--truth", action="store_true",
                        help="judge the renderer's true counterfactuals instead of a backbone's edits: the "
                             "ceiling of edit success and clean edit success under this judge")
    args = parser.parse_args()
    if args.truth:
        result = measure_truth(args.gan, args.judge, args.n, args.seed)
        columns = ("edit_success", "off_target_change", "clean_edit_success")
        print("| attribute | true edit success | true off-target change | true clean edit success |")
        print("| --- | --- | --- | --- |")
        for name in result["edit_success"]:
            print(f"| {name} | " + " | ".join(f"{result[c][name]:.2f}" for c in columns) + " |")
        means = [sum(result[c].values()) / len(result[c]) for c in columns]
        print("| **mean** | " + " | ".join(f"**{m:.2f}**" for m in means) + " |")
        return
    result = measure(args.gan, args.judge, args.n, args.seed)
    if args.write_card:
        card = {
            **judged_card(result, result["judge"]),
            "domain": result["domain"],
            "measured": f"examples/measure_backbone.py --n {args.n} --seed {args.seed}, judge {args.judge.name}",
        }
        args.write_card.write_text(json.dumps(card, indent=2) + "\n")
    print(markdown(result, args.n))


if __name__ == "__main__":
    main()
