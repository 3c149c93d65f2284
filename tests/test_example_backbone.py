"""The shipped example backbone: its attribute inputs must control what they name.

A classifier of every synth attribute (examples/targets/attribute_judge.pt, trained on
synth faces by examples/train_targets.py) judges edits of fresh faces (a seed no training
set used). An untrained or collapsed backbone scores near 0: its edits do not show.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from sia_cli.data import load_image, read_attributes
from sia_cli.faces import make_dataset
from sia_cli.registry import load_backbone
from sia_cli.target import load_target
from sia_cli.training import edit_success

JUDGE = Path(__file__).parents[1] / "examples" / "targets" / "attribute_judge.pt"
# Measured with examples/measure_backbone.py (300 faces): the shipped backbone 0.24 mean edit
# success, reconstruction error 0.054; an 18-step backbone 0.01 and 0.177.
MEAN_EDIT_SUCCESS = 0.15
MAX_RECONSTRUCTION_L1 = 0.08


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faces")
    make_dataset(folder, 120, seed=77, size=64)
    table = read_attributes(folder / "list_attr.txt")
    images = torch.stack([load_image(folder / "images" / f, 64) for f in table.rows])
    return images, table


@pytest.fixture(scope="module")
def judge():
    return load_target(JUDGE, task="multiclass", probe_size=64)


def test_judge_recognises_every_attribute_on_clean_faces(faces, judge):
    images, table = faces
    truth = torch.from_numpy(np.stack([table.rows[f] for f in table.rows]))
    with torch.no_grad():
        predicted = (judge(images * 2 - 1) > 0).float()
    accuracy = (predicted == truth).float().mean(dim=0)
    assert accuracy.min() >= 0.9, dict(zip(table.names, accuracy.tolist()))


def test_shipped_backbone_edits_show_and_reconstructs(faces, judge):
    images, table = faces
    backbone = load_backbone(None)
    attrs = torch.from_numpy(np.stack([table.select(backbone.attributes).rows[f] for f in table.rows]))
    result = edit_success(backbone, judge, images, attrs)
    rates = result["edit_success"]
    assert set(rates) == set(backbone.attributes)
    assert sum(rates.values()) / len(rates) >= MEAN_EDIT_SUCCESS, rates
    assert result["reconstruction_l1"] <= MAX_RECONSTRUCTION_L1, result["reconstruction_l1"]
