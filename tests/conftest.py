"""Shared fixtures: a tiny AttGAN experiment folder in the public checkpoint layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sia_cli.backbone.attgan import Discriminator, DiscriminatorConfig, Generator, GeneratorConfig
from sia_cli.inputs.images import load_image, read_attributes
from sia_cli.inputs.synth import make_dataset

TINY_ATTRS = ["Bangs", "Eyeglasses", "Male", "Smiling", "Young"]

# Small enough to build and load in milliseconds; same keys as a public setting.txt.
TINY_SETTING = {
    "attrs": TINY_ATTRS, "n_attrs": len(TINY_ATTRS), "img_size": 32, "thres_int": 0.5,
    "enc_dim": 8, "dec_dim": 8, "enc_layers": 3, "dec_layers": 3, "shortcut_layers": 1, "inject_layers": 1,
    "dis_dim": 8, "dis_layers": 3, "dis_fc_dim": 16,
}


@pytest.fixture
def tiny_setting() -> dict:
    return json.loads(json.dumps(TINY_SETTING))


def _tiny_state(setting: dict, seed: int) -> dict:
    """A checkpoint dict as the public training script saves it; `seed` makes the weights distinct."""
    torch.manual_seed(seed)
    g = Generator(GeneratorConfig.from_setting(setting))
    d = Discriminator(DiscriminatorConfig.from_setting(setting))
    optim_g = torch.optim.Adam(g.parameters())
    optim_d = torch.optim.Adam(d.parameters())
    return {"G": g.state_dict(), "D": d.state_dict(), "optim_G": optim_g.state_dict(), "optim_D": optim_d.state_dict()}


@pytest.fixture
def tiny_state():
    """`tiny_state(setting, seed)` -> {'G', 'D', 'optim_G', 'optim_D'} of freshly initialised tiny networks."""
    return _tiny_state


@pytest.fixture
def make_experiment():
    """`make_experiment(folder, epochs=(0,), setting=None)` writes setting.txt + checkpoint/weights.<n>.pth."""

    def make(folder: Path, epochs=(0,), setting: dict | None = None) -> Path:
        setting = setting or TINY_SETTING
        (folder / "checkpoint").mkdir(parents=True)
        (folder / "setting.txt").write_text(json.dumps(setting, indent=4))
        for epoch in epochs:
            torch.save(_tiny_state(setting, seed=epoch), folder / "checkpoint" / f"weights.{epoch}.pth")
        return folder

    return make


def synth_batch(root: Path, backbone, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0 in [0, 1], a0 in [0, 1]) of `count` synth faces drawn into `root`, at the backbone's size."""
    make_dataset(root, count, seed=seed)
    table = read_attributes(root / "list_attr.txt").select(backbone.attributes)
    files = sorted((root / "images").glob("*.png"))
    x0 = torch.stack([load_image(f, backbone.img_size) for f in files])
    return x0, torch.from_numpy(np.stack([table.vector(f) for f in files])).float()


CLI_FACES = 6  # a batch of 4 and one of 2 at --batch-size 4


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    """Six synth faces (seed 11) in CelebA layout, for the end-to-end CLI tests; modules that
    need other faces define their own `faces`."""
    root = tmp_path_factory.mktemp("faces")
    make_dataset(root, CLI_FACES, seed=11)
    return root
