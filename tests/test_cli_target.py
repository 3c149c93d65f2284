"""`sia attack` on models whose outputs need telling apart: the target options end to end.

Each model either runs through the CLI with the right reading of its output, or is refused
with one line on stderr that names the option to pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CLI_FACES
from test_target_tasks import LABELS_40, FlatBatch, Landmarks, Pooled, save_script
from typer.testing import CliRunner

from sia_cli.cli import app
from sia_cli.inputs.images import load_image

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit deprecation notices

SIZE = 64  # the default backbone's image size
N_FACES = CLI_FACES  # the shared `faces` fixture (conftest)
FAST = ["--steps", "2", "--batch-size", "4", "--no-progress"]
SMALL = "input_size: 16\n"  # the test models take 16x16 images


class Brightness(torch.nn.Module):
    """P(bright): a sigmoid of the mean brightness against a threshold (a probability head)."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold
        self.scale = torch.nn.Parameter(torch.tensor(20.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.scale * (x.mean(dim=(1, 2, 3)) - self.threshold)).unsqueeze(1)


def sia(*args) -> object:
    return CliRunner().invoke(app, ["attack", *map(str, args)], env={"COLUMNS": "200"})


def assert_one_line_error(result, *words: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def records(out: Path) -> list[dict]:
    report = json.loads((out / "report.json").read_text())
    assert len(report["images"]) == N_FACES
    return report["images"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, faces) -> dict:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("cli_models")
    brightness = [load_image(f, SIZE).mean().item() for f in sorted((faces / "images").glob("*.png"))]
    # The median face sits on the decision boundary: some faces are a small edit from flipping.
    threshold = float(torch.tensor(brightness).median())
    names = f"class_names: {LABELS_40}\n"
    return {
        "sigmoid": save_script(Brightness(threshold), folder / "bright.pt"),
        "gray": save_script(Pooled(3, scale=10, in_channels=1), folder / "gray.pt", sia_yaml=SMALL),
        "multilabel": save_script(Pooled(40, scale=5), folder / "attributes.pt", sia_yaml=SMALL + names),
        "landmarks": save_script(Landmarks(flat=True), folder / "landmarks.pt", sia_yaml=SMALL),
        "age": save_script(Pooled(1, scale=10, offset=30), folder / "age.pt", sia_yaml=SMALL),
        "batch1": save_script(FlatBatch(1), folder / "batch1.pt", sia_yaml=SMALL, example_batch=1),
    }


def run(models, faces, tmp_path, name: str, *extra: str) -> list[dict]:
    out = tmp_path / name
    result = sia(models[name], "--images", faces / "images", "--attrs-file", faces / "list_attr.txt",
                 "--out", out, *FAST, *extra)
    assert result.exit_code == 0, result.output
    return records(out)


def flips(rows: list[dict]) -> int:
    return sum((row["pred_adv"] > 0.5) != (row["label"] > 0.5) for row in rows)


def test_sigmoid_model_is_refused_until_told_then_flips(models, faces, tmp_path):
    result = sia(models["sigmoid"], "--images", faces / "images", "--out", tmp_path / "refused", *FAST)
    assert_one_line_error(result, "all lie in [0, 1]", "--output probability")
    strong = ["--eps", "0.1", "--step-size", "0.05", "--steps", "4"]
    rows = run(models, faces, tmp_path, "sigmoid", "--output", "probability", *strong)
    assert all(0 <= row["pred_clean"] <= 1 for row in rows)
    assert flips(rows) >= 1
    # Read as logits, sigmoid(p) >= 0.5 whatever the image: the attack could never flip it.
    rows = run(models, faces, tmp_path, "sigmoid", "--output", "logits", *strong, "--force")
    assert all(row["pred_adv"] > 0.5 and row["label"] == 1 for row in rows) and flips(rows) == 0


def test_one_channel_model_needs_channels_one(models, faces, tmp_path):
    result = sia(models["gray"], "--images", faces / "images", "--out", tmp_path / "refused", *FAST)
    assert_one_line_error(result, "1-channel input", "--channels 1")
    rows = run(models, faces, tmp_path, "gray", "--channels", "1")
    assert all(row["label"] in (0, 1, 2) for row in rows)


def test_multilabel_attack_on_one_label(models, faces, tmp_path):
    rows = run(models, faces, tmp_path, "multilabel", "--task", "multilabel", "--label", "Smiling")
    assert all(row["label"] in (0, 1) and 0 <= row["pred_adv"] <= 1 for row in rows)
    result = sia(models["multilabel"], "--images", faces / "images", "--out", tmp_path / "no_label", *FAST,
                 "--task", "multilabel")
    assert_one_line_error(result, "--label")


def test_flat_landmarks_with_task_and_eye_indices(models, faces, tmp_path):
    rows = run(models, faces, tmp_path, "landmarks", "--task", "landmarks", "--eye-indices", "0,1")
    assert all(len(row["label"]) == 5 and len(row["pred_adv"][0]) == 2 for row in rows)
    result = sia(models["landmarks"], "--images", faces / "images", "--out", tmp_path / "bad", *FAST,
                 "--task", "landmarks", "--eye-indices", "0")
    assert_one_line_error(result, "--eye-indices")


def test_regression_with_margin(models, faces, tmp_path):
    rows = run(models, faces, tmp_path, "age", "--task", "regression", "--margin", "0.01")
    for row in rows:
        assert isinstance(row["pred_adv"], float)
        moved = abs(row["pred_adv"] - row["label"]) > 0.01
        assert row.get("success_vs_label", row["success"]) == moved


def test_model_traced_with_one_image_runs(models, faces, tmp_path):
    rows = run(models, faces, tmp_path, "batch1")
    assert all(row["label"] in (0, 1, 2) for row in rows)
