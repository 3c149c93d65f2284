"""Attributional robustness training (`sia_cli.engine.art`) and `sia harden --method art`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from sia_cli.cli import app
from sia_cli.engine.art import ArtSettings, art_terms, class_gradients, training_point, triplet
from sia_cli.errors import SiaError
from sia_cli.inputs.synth import make_dataset
from sia_cli.targets import load_target

SIZE = 16
TARGETS = Path(__file__).parents[1] / "examples" / "targets"


class SoftplusNet(nn.Module):
    """A small classifier with softplus activations (the paper's choice: a second derivative)."""

    def __init__(self, classes: int):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Linear(6 * SIZE * SIZE, classes)

    def forward(self, x):
        return self.head(F.softplus(self.conv(x), beta=10).flatten(1))


def scripted(module: nn.Module, path: Path, task: str) -> object:
    torch.jit.save(torch.jit.script(module.eval()), str(path), _extra_files={"sia.yaml": "output: logits\n"})
    return load_target(path, task=task, probe_size=SIZE)


@pytest.fixture()
def images():
    torch.manual_seed(1)
    return torch.rand(6, 3, SIZE, SIZE) * 2 - 1


def test_the_rival_of_a_binary_class_is_the_other_and_of_a_multiclass_one_the_largest_other(tmp_path, images):
    binary = scripted(SoftplusNet(1), tmp_path / "b.pt", "binary")
    out = binary(images)
    reference = torch.tensor([1, 0, 1, 0, 1, 0])
    assert torch.allclose(binary.rival_score(out, reference), -binary.explained_score(out, reference))
    multi = scripted(SoftplusNet(4), tmp_path / "m.pt", "multiclass")
    out = multi(images)
    reference = torch.tensor([0, 1, 2, 3, 0, 1])
    expected = torch.stack([torch.cat([row[:r], row[r + 1:]]).max() for row, r in zip(out, reference)])
    assert torch.allclose(multi.rival_score(out, reference), expected)
    regression = load_target(tmp_path / "b.pt", task="regression", probe_size=SIZE)
    with pytest.raises(SiaError, match="need class scores"):
        regression.rival_score(regression(images), torch.zeros(6))


def test_the_triplet_term_is_small_when_the_true_gradient_follows_the_image_and_large_when_the_rivals_does(images):
    aligned = triplet(images, 2 * images, -images)
    reversed_ = triplet(images, -images, 2 * images)
    assert torch.allclose(aligned, F.softplus(torch.tensor(-2.0)).expand(6))  # d_neg - d_pos = 2
    assert torch.allclose(reversed_, F.softplus(torch.tensor(2.0)).expand(6))
    # on a subset of input values only
    index = torch.arange(10).expand(6, 10)
    assert torch.allclose(triplet(images, 2 * images, -images, index), aligned)


def test_the_training_point_stays_within_epsilon_and_is_seeded(tmp_path, images):
    target = scripted(SoftplusNet(3), tmp_path / "m.pt", "multiclass")
    reference = torch.tensor([0, 1, 2, 0, 1, 2])
    settings = ArtSettings()
    first = training_point(target, images, reference, settings, torch.Generator().manual_seed(5))
    again = training_point(target, images, reference, settings, torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
    assert (first - images).abs().max() <= 2 * settings.art_epsilon + 1e-6 and first.abs().max() <= 1
    # the steps raise the triplet term over the random start (it is what they ascend)
    start = training_point(target, images, reference, ArtSettings(art_steps=0), torch.Generator().manual_seed(5))

    def term(x):
        g_true, g_rival = class_gradients(target, x.clone(), reference, create_graph=False)
        return float(triplet(x, g_true, g_rival).mean())

    assert term(first) > term(start)


def test_training_on_the_triplet_term_aligns_the_input_gradient_with_the_image(tmp_path, images):
    """Against what it is for: a few Adam steps on ART's terms raise the cosine between each image
    and its true class's input gradient (a TorchScript model: weights are its parameters)."""
    target = scripted(SoftplusNet(3), tmp_path / "m.pt", "multiclass")
    reference = torch.tensor([0, 1, 2, 0, 1, 2])

    def alignment() -> float:
        g_true, _ = class_gradients(target, images.clone(), reference, create_graph=False)
        return float(F.cosine_similarity(images.flatten(1), g_true.flatten(1), dim=1).mean())

    before = alignment()
    weights = [p for p in target.model.parameters()]
    optimizer = torch.optim.Adam(weights, lr=1e-2)
    settings = ArtSettings(art_steps=1)
    for step in range(30):
        point = training_point(target, images, reference, settings, torch.Generator().manual_seed(step))
        for p in weights:
            p.requires_grad_(True)
        terms = art_terms(target, images, point, reference)
        optimizer.zero_grad()
        (terms["point_loss"].mean() + 0.5 * terms["triplet"].mean()).backward()
        optimizer.step()
        for p in weights:
            p.requires_grad_(False)
    assert alignment() > before + 0.1, (before, alignment())


@pytest.mark.slow
def test_harden_with_art_reports_the_attributional_measures_before_and_after(tmp_path):
    faces, held_out = tmp_path / "faces", tmp_path / "held-out"
    make_dataset(faces, 8, seed=61, size=64)
    make_dataset(held_out, 6, seed=62, size=64)
    result = CliRunner().invoke(app, [
        "harden", str(TARGETS / "mustache_confounded.pt"), "--images", str(faces / "images"),
        "--attrs-file", str(faces / "list_attr.txt"), "--out", str(tmp_path / "out"), "--method", "sia+art",
        "--epochs", "1", "--batch-size", "4", "--steps", "2", "--eval-images", str(held_out / "images"),
        "--eval-attrs-file", str(held_out / "list_attr.txt"), "--eval-steps", "2", "--explain-steps", "3",
        "--explain-ig-steps", "8", "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "hardening.json").read_text())
    assert summary["method"] == "sia+art" and "ART's triplet term" in summary["mode"]
    assert set(summary["training"]["losses"]) == {"clean_loss", "adversary_loss", "triplet_loss"}
    for side in ("before", "after"):
        found = summary[side]["attributional"]
        assert 0 <= found["top_k_intersection"] <= 1 and -1 <= found["kendall_tau"] <= 1, found
    text = " ".join(result.output.split())
    assert "top-k intersection (attacked maps)" in text
    page = (tmp_path / "out" / "hardening.html").read_text()
    assert "top-k intersection under the feature-importance attack" in page


def test_harden_with_art_refuses_a_model_without_class_scores_in_one_line(tmp_path):
    faces = tmp_path / "faces"
    make_dataset(faces, 4, seed=63, size=64)
    result = CliRunner().invoke(app, [
        "harden", str(TARGETS / "landmarks.pt"), "--images", str(faces / "images"), "--out", str(tmp_path / "out"),
        "--method", "art", "--no-progress", "--device", "cpu"])
    assert result.exit_code != 0 and "need class scores" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, [
        "harden", str(TARGETS / "mustache_confounded.pt"), "--images", str(faces / "images"),
        "--out", str(tmp_path / "out2"), "--method", "nonsense+art", "--no-progress"])
    assert result.exit_code != 0 and "Traceback" not in result.output
