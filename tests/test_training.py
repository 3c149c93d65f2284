"""`sia train-gan` end to end on tiny synthetic faces, and the WGAN-GP gradient penalty."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sia_cli import registry
from sia_cli.cli import app
from sia_cli.faces import make_dataset
from sia_cli.training import gradient_penalty

ATTRS = ["Bangs", "Eyeglasses", "Smiling"]


def train_args(data: Path, out: Path, *extra: str, attributes: str = ",".join(ATTRS), max_steps: int = 3) -> list[str]:
    return [
        "train-gan", "--images", str(data / "images"), "--attrs", str(data / "list_attr.txt"),
        "--attributes", attributes, "--img-size", "32", "--layers", "3", "--max-steps", str(max_steps),
        "--batch-size", "8", "--sample-every", "2", "--save-every", "2", "--out", str(out), "--no-progress",
        "--device", "cpu", *extra,
    ]


def run(args: list[str]):
    return CliRunner().invoke(app, args)


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("faces") / "d"
    make_dataset(folder, n=40, seed=0, size=32)
    return folder


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """One 3-step run shared by the tests; tests that change it work on a copy."""
    out = tmp_path_factory.mktemp("run") / "g"
    result = run(train_args(data, out))
    assert result.exit_code == 0, result.output
    return out


# ----------------------------------------------------------------------------- a run's files


def test_run_writes_setting_in_public_layout(trained):
    setting = json.loads((trained / "setting.txt").read_text())
    assert setting["attrs"] == ATTRS and setting["img_size"] == 32
    assert setting["enc_layers"] == setting["dec_layers"] == setting["dis_layers"] == 3


def test_run_writes_checkpoints_with_the_four_public_keys(trained):
    names = sorted(p.name for p in (trained / "checkpoint").glob("weights.*.pth"))
    assert names == ["weights.2.pth", "weights.3.pth"]  # every 2 steps, and the last step
    state = torch.load(trained / "checkpoint" / "weights.3.pth", weights_only=True)
    assert {"G", "D", "optim_G", "optim_D"} <= set(state)
    assert state["sia"]["step"] == 3


def test_run_writes_sample_grids_that_open(trained):
    grids = sorted((trained / "sample_training").glob("*.png"))
    assert [p.name for p in grids] == ["step_0000002.png", "step_0000003.png"]
    for grid in grids:
        with Image.open(grid) as image:
            image.load()
            assert image.width > 32 and image.height > 32


def test_trained_folder_loads_as_a_backbone(trained):
    backbone = registry.load_backbone(str(trained))
    assert backbone.attributes == ATTRS and backbone.img_size == 32
    assert backbone.info.path.endswith("weights.3.pth")
    with torch.no_grad():
        y = backbone(torch.zeros(2, 3, 32, 32), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]))
        p = backbone.predict_attributes(torch.zeros(1, 3, 32, 32))
    assert y.shape == (2, 3, 32, 32) and p.shape == (1, 3)


def test_finished_run_writes_a_card_with_domain_calibration(trained):
    card = json.loads((trained / "card.json").read_text())
    assert card["domain"]["images"] == 40 and card["domain"]["critic_margin_median"] is not None
    assert "edit_success" not in card  # no --judge: never measured, so no attribute is cleared
    assert registry.load_backbone(str(trained)).info.card == card


def test_judge_measures_edit_success_by_attribute_name(data, tmp_path):
    judge = Path(__file__).parents[1] / "examples" / "targets" / "attribute_judge.pt"
    out = tmp_path / "g"
    args = train_args(data, out, "--judge", str(judge), attributes="Eyeglasses,Bangs", max_steps=1)
    args[args.index("--img-size") + 1] = "64"
    result = run(args)
    assert result.exit_code == 0, result.output
    card = json.loads((out / "card.json").read_text())
    assert set(card["edit_success"]) == {"Eyeglasses", "Bangs"}
    assert all(0.0 <= v <= 1.0 for v in card["edit_success"].values())
    assert "judge attribute_judge.pt" in card["measured"]


def test_output_folder_with_brackets_is_printed_verbatim(data, tmp_path):
    # Rich would read `[/x]` as a closing tag and crash after a finished run.
    out = tmp_path / "run[/x]"
    result = run(train_args(data, out, max_steps=1))
    assert result.exit_code == 0, result.output
    assert f"checkpoint: {out / 'checkpoint' / 'weights.1.pth'}" in result.stdout.replace("\n", "")


# ----------------------------------------------------------------------------- resume


def test_existing_checkpoints_are_not_overwritten_without_resume(data, trained, tmp_path):
    out = tmp_path / "g"
    shutil.copytree(trained, out)
    before = (out / "checkpoint" / "weights.3.pth").read_bytes()
    result = run(train_args(data, out, max_steps=5))
    assert result.exit_code == 2
    assert "--resume" in one_error_line(result)
    assert (out / "checkpoint" / "weights.3.pth").read_bytes() == before
    assert not (out / "checkpoint" / "weights.4.pth").exists()


def test_resume_continues_from_the_latest_checkpoint(data, trained, tmp_path):
    out = tmp_path / "g"
    shutil.copytree(trained, out)
    result = run(train_args(data, out, "--resume", max_steps=5))
    assert result.exit_code == 0, result.output
    assert "(from 3)" in result.stdout
    assert (out / "checkpoint" / "weights.5.pth").is_file()
    assert torch.load(out / "checkpoint" / "weights.5.pth", weights_only=True)["sia"]["step"] == 5
    assert registry.load_backbone(str(out)).info.path.endswith("weights.5.pth")


def test_resume_with_a_different_architecture_is_a_clear_error(data, trained, tmp_path):
    out = tmp_path / "g"
    shutil.copytree(trained, out)
    result = run(train_args(data, out, "--resume", "--enc-dim", "8", max_steps=5))
    assert result.exit_code == 2, result.output
    assert "weights.3.pth" in one_error_line(result)
    assert json.loads((out / "setting.txt").read_text())["enc_dim"] == 16  # the old run's setting is kept


def test_resume_with_other_attributes_is_refused(data, trained, tmp_path):
    # Same count, other order: the weights would load, but every attribute would change meaning.
    out = tmp_path / "g"
    shutil.copytree(trained, out)
    result = run(train_args(data, out, "--resume", attributes="Smiling,Bangs,Eyeglasses", max_steps=5))
    assert result.exit_code == 2, result.output
    assert "Bangs,Eyeglasses,Smiling" in one_error_line(result)
    assert not (out / "checkpoint" / "weights.4.pth").exists()


# ----------------------------------------------------------------------------- bad input, refused before training


def test_unknown_attribute_is_refused_before_anything_is_written(data, tmp_path):
    out = tmp_path / "g"
    result = run(train_args(data, out, attributes="Bangs,Wings"))
    assert result.exit_code == 2
    assert "Wings" in one_error_line(result)
    assert not (out / "checkpoint").exists() and not out.exists()


def test_attribute_file_naming_a_missing_image_is_refused_before_training(data, tmp_path):
    broken = tmp_path / "d"
    shutil.copytree(data, broken)
    (broken / "images" / "000007.png").unlink()
    out = tmp_path / "g"
    result = run(train_args(broken, out))
    assert result.exit_code == 2
    assert "000007.png" in one_error_line(result)
    assert not out.exists()


# ----------------------------------------------------------------------------- gradient penalty


class LinearCritic(torch.nn.Module):
    """Score = <w, x>: its gradient with respect to every input is w, whatever the input."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = torch.nn.Parameter(w.flatten())

    def forward(self, x):
        return (x.flatten(1) @ self.w).unsqueeze(1), None


def test_gradient_penalty_is_zero_for_a_unit_gradient_critic():
    torch.manual_seed(0)
    w = torch.randn(3, 8, 8)
    real, fake = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    assert gradient_penalty(LinearCritic(w / w.norm()), real, fake).item() == pytest.approx(0.0, abs=1e-10)
    # And it measures the distance to 1: gradient norm 3 -> (3 - 1)^2 = 4.
    assert gradient_penalty(LinearCritic(3 * w / w.norm()), real, fake).item() == pytest.approx(4.0, rel=1e-5)


def test_gradient_penalty_reaches_the_critic_parameters():
    # The critic is trained on this term: it must be differentiable with respect to the weights.
    w = torch.ones(3, 4, 4)
    critic = LinearCritic(w)
    gradient_penalty(critic, torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)).backward()
    assert critic.w.grad is not None and critic.w.grad.abs().sum() > 0

