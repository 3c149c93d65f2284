"""How well a backbone edits what it names, judged by an attribute classifier, and its card.

The judge (`examples/targets/attribute_judge.pt`) measures; it is never a training signal.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from sia_cli.backbone.attgan import (
    CARD_FILE,
    build_backbone,
    checkpoint_number,
    edited,
    read_checkpoint,
)
from sia_cli.errors import SiaError
from sia_cli.inputs.images import LabelledImages
from sia_cli.measures import trust
from sia_cli.runs.files import write_text_atomic


@torch.no_grad()
def write_card(out: Path, checkpoint: Path, setting: dict, dataset: LabelledImages, device: torch.device,
               judge_path: Path | None = None, card_images: int = 256) -> dict:
    """Measure the finished backbone and write `card.json` beside its setting.txt (sia_cli.measures.trust):
    the critic's domain calibration on training images, and when a judge is given per-attribute
    edit success, its off-target changes and the judge's own accuracy on those images. Every
    report made with the backbone carries these figures."""
    from sia_cli.targets import load_target  # the judge is a target model; only needed here

    backbone = build_backbone(read_checkpoint(checkpoint), setting, path=str(checkpoint)).to(device)
    count = min(len(dataset), card_images)
    images, attrs = next(iter(DataLoader(dataset, batch_size=count, shuffle=False)))
    images, attrs = images.to(device), attrs.to(device).float()
    card = {"domain": trust.calibrate_domain(backbone, images, attrs),
            "measured": f"sia train-gan at step {checkpoint_number(checkpoint)}, on {count} training images"}
    if judge_path is not None:
        judge = load_target(judge_path, device=str(device), task="multiclass", probe_size=backbone.img_size)
        with torch.no_grad():
            found = edit_success(backbone, judge, images, attrs)
            judged = judge_accuracy(judge, backbone.attributes, images, attrs)
        card.update(judged_card(found, judged))
        card["measured"] += f", judge {Path(judge_path).name}"
    write_text_atomic(Path(out) / CARD_FILE, json.dumps(card, indent=2) + "\n")
    return card


def judge_columns(judge, attributes: list[str]) -> list[int]:
    """The judge's output column of each backbone attribute: by name where its sia.yaml lists
    `class_names`, else in order (then it must judge exactly these attributes)."""
    names = list(judge.class_names or [])
    if names:
        missing = [name for name in attributes if name not in names]
        if missing:
            raise SiaError(f"judge {judge.path} does not judge {', '.join(missing)} (its class_names: {', '.join(names)})")
        return [names.index(name) for name in attributes]
    if judge.num_outputs != len(attributes):
        raise SiaError(f"judge {judge.path} has {judge.num_outputs} outputs for {len(attributes)} attributes; "
                       "list its attribute names as class_names in its sia.yaml")
    return list(range(len(attributes)))


def edit_success(backbone, judge, images: torch.Tensor, attrs: torch.Tensor, batch_size: int = 64) -> dict:
    """How well each attribute input controls the image, as judged by an attribute classifier.

    For every image and attribute k, an edit succeeds when `judge` (one logit per attribute,
    on [-1, 1] images) sees a_k in the reconstruction and 1 - a_k once a_k is flipped: the
    judged attribute must change. Turning k on turns off what cannot go with it (`edited`). (Asking only whether the edit shows 1 - a_k rewards a
    broken generator whose outputs the judge labels the same way whatever the input.)

    And the other way round: an edit of k should change nothing else. `off_target_change[k]`
    is the share of images on which the judge sees any other attribute j change between the
    reconstruction and the edit of k; `off_target_change_mean[k]` the mean over j of each one's
    share (`off_target_by_attribute[k][j]`); `clean_edit_success[k]` the share whose edit
    succeeded and changed nothing else.
    """
    names = backbone.attributes
    columns = judge_columns(judge, names)
    hits, clean, off_any = torch.zeros(len(names)), torch.zeros(len(names)), torch.zeros(len(names))
    off_each = torch.zeros(len(names), len(names))  # [edited k, changed j]
    recon_error = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size] * 2 - 1
        a = attrs[start : start + batch_size]
        reconstruction = backbone(x, a)
        recon_error.append((reconstruction - x).abs().mean(dim=(1, 2, 3)) / 2)
        seen = judge(reconstruction)[:, columns] > 0
        kept = seen == (a > 0.5)
        for k in range(len(names)):
            flipped, implied = edited(a, k, names)
            seen_edit = judge(backbone(x, flipped))[:, columns] > 0
            shows = seen_edit[:, k] == (flipped[:, k] > 0.5)
            changed = (seen_edit != seen).cpu()
            changed[:, k] = False
            changed &= ~implied.cpu()  # turned off because k turned on: part of the edit
            others = changed.any(dim=1)
            hits[k] += (kept[:, k] & shows).sum().cpu()
            clean[k] += (kept[:, k] & shows).cpu().logical_and(~others).sum()
            off_any[k] += others.sum()
            off_each[k] += changed.sum(dim=0)
    n, others_count = len(images), max(len(names) - 1, 1)
    return {
        "edit_success": {name: float(hits[k] / n) for k, name in enumerate(names)},
        "reconstruction_l1": float(torch.cat(recon_error).mean()),
        "off_target_change": {name: float(off_any[k] / n) for k, name in enumerate(names)},
        "off_target_change_mean": {name: float(off_each[k].sum() / (n * others_count)) for k, name in enumerate(names)},
        "off_target_by_attribute": {
            name: {other: float(off_each[k, j] / n) for j, other in enumerate(names) if j != k}
            for k, name in enumerate(names)
        },
        "clean_edit_success": {name: float(clean[k] / n) for k, name in enumerate(names)},
    }


def judge_accuracy(judge, names: list[str], images: torch.Tensor, attrs: torch.Tensor, batch_size: int = 64) -> dict:
    """How often `judge` sees each attribute as labelled on clean images in [0, 1]: edit success
    is only as right as its judge. Balanced accuracy (the mean of the rates on images with and
    without the attribute) also shows a judge that always answers the majority label."""
    columns = judge_columns(judge, names)
    right, positives, true_positives = torch.zeros(len(names)), torch.zeros(len(names)), torch.zeros(len(names))
    for start in range(0, len(images), batch_size):
        seen = (judge(images[start : start + batch_size] * 2 - 1)[:, columns] > 0).cpu()
        truth = (attrs[start : start + batch_size] > 0.5).cpu()
        right += (seen == truth).sum(dim=0)
        positives += truth.sum(dim=0)
        true_positives += (seen & truth).sum(dim=0)
    n = len(images)
    negatives, true_negatives = n - positives, right - true_positives

    def balanced(k: int) -> float:
        rates = [float(true_positives[k] / positives[k])] if positives[k] else []
        rates += [float(true_negatives[k] / negatives[k])] if negatives[k] else []
        return sum(rates) / len(rates)

    return {"accuracy": {name: float(right[k] / n) for k, name in enumerate(names)},
            "balanced_accuracy": {name: balanced(k) for k, name in enumerate(names)},
            "positive_share": {name: float(positives[k] / n) for k, name in enumerate(names)}}


def judged_card(found: dict, judged: dict) -> dict:
    """The card's entries from `edit_success` and `judge_accuracy`, rounded as cards store them."""

    def rounded(rates: dict) -> dict:
        return {name: round(rate, 3) for name, rate in rates.items()}

    return {
        "edit_success": rounded(found["edit_success"]),
        "reconstruction_l1": round(found["reconstruction_l1"], 4),
        "clean_edit_success": rounded(found["clean_edit_success"]),
        "off_target_change": rounded(found["off_target_change"]),
        "off_target_change_mean": rounded(found["off_target_change_mean"]),
        "judge_accuracy": rounded(judged["accuracy"]),
    }


