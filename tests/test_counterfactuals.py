"""The renderer's true counterfactuals as `sia train-gan`'s supervision (sia_cli.backbone.counterfactuals)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sia_cli.backbone.attgan import edited
from sia_cli.backbone.counterfactuals import (
    ChangeFocus,
    SynthSource,
    change_errors,
    change_loss,
    check_labels,
    one_attribute_edits,
    render_pairs,
    synth_source,
)
from sia_cli.backbone.registry import load_backbone
from sia_cli.cli import app
from sia_cli.errors import SiaError
from sia_cli.inputs import faces
from sia_cli.inputs.images import load_image, read_attributes
from sia_cli.inputs.synth import make_dataset

ATTRS = ["Black_Hair", "Blond_Hair", "Eyeglasses", "Mustache"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cf") / "d"
    make_dataset(folder, n=24, seed=3, size=32)
    return folder


def files_and_rows(data: Path, names=ATTRS):
    table = read_attributes(data / "list_attr.txt").select(names)
    files = [data / "images" / name for name in table.rows]
    return files, [table.rows[f.name] for f in files]


def test_a_synth_folder_says_how_it_was_drawn_and_another_folder_says_nothing(data, tmp_path):
    assert synth_source(data / "images") == SynthSource(3, 32, ())
    (tmp_path / "images").mkdir()
    assert synth_source(tmp_path / "images") is None


def test_each_pair_is_the_face_drawn_again_with_one_attribute_edited(data):
    files, _ = files_and_rows(data)
    pairs = render_pairs(synth_source(data / "images"), files[:3], ATTRS, 32, workers=1)
    assert pairs.shape == (3, len(ATTRS), 3, 32, 32) and pairs.dtype == torch.uint8
    for i, file in enumerate(files[:3]):
        truth = faces.face_labels(3, int(file.stem))
        original = load_image(file, 32)
        for k, name in enumerate(ATTRS):
            a = torch.tensor([[float(truth[n]) for n in ATTRS]])
            b, _ = edited(a, k, ATTRS)
            attrs = {**truth, **{n: bool(b[0, j]) for j, n in enumerate(ATTRS)}}
            expected = np.asarray(faces.render_index(attrs, 3, int(file.stem), 32)[0])
            assert np.array_equal(pairs[i, k].permute(1, 2, 0).numpy(), expected)
            # The same face: the edit changes a part of it, not the whole image.
            changed = (pairs[i, k].float() / 255 - original).abs().amax(dim=0) > 0.02
            assert 0 < changed.float().mean() < 0.6, name


def test_pairs_drawn_in_worker_processes_equal_those_drawn_in_one(data):
    files, _ = files_and_rows(data)
    source = synth_source(data / "images")
    assert torch.equal(render_pairs(source, files[:10], ATTRS, 32, workers=2),
                       render_pairs(source, files[:10], ATTRS, 32, workers=1))


def test_relabelled_faces_are_refused_for_counterfactuals(data):
    files, rows = files_and_rows(data)
    check_labels(synth_source(data / "images"), files, rows, ATTRS)
    rows[5] = rows[5].copy()
    rows[5][2] = 1 - rows[5][2]
    with pytest.raises(SiaError, match="Eyeglasses"):
        check_labels(synth_source(data / "images"), files, rows, ATTRS)


def test_one_attribute_edits_follow_the_backbone_edit_convention():
    a = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 1.0, 1.0]])
    ks = torch.tensor([1, 2, 3])
    b = one_attribute_edits(a, ks, ATTRS)
    # Blond on turns black off; Eyeglasses off; Mustache off.
    assert b.tolist() == [[0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]]


def test_the_change_loss_weighs_a_small_edit_as_much_as_a_large_one():
    real = torch.zeros(2, 3, 32, 32)
    truth = real.clone()
    truth[0, :, 10:12, 10:20] = 1.0  # a mustache: 20 pixels
    truth[1, :, :, :16] = 1.0  # half the face
    reconstruction = real.clone()
    dropped = real.clone()  # a generator that leaves both edits out
    per_image = [change_loss(dropped[i:i + 1], reconstruction[i:i + 1], real[i:i + 1], truth[i:i + 1], 0.02)
                 for i in range(2)]
    assert per_image[0] == pytest.approx(per_image[1]) == pytest.approx(1.0)
    # A plain pixel loss would weigh the mustache 25 times less than the half face.
    plain = [(dropped[i] - truth[i]).abs().mean() for i in range(2)]
    assert plain[1] / plain[0] > 20
    # An exact edit costs nothing; one that paints the change everywhere is judged on the changed area only.
    assert change_loss(truth, reconstruction, real, truth, 0.02) == 0


def test_change_focus_weighs_the_edits_the_generator_does_worst_and_follows_them():
    """Power 0 is the plain change loss; with power 2 the attribute whose running error is
    three times the other's weighs nine times as much, and its weight falls back once its error
    does."""
    errors, shown = torch.tensor([0.3, 0.1, 0.3, 0.1]), torch.ones(4, dtype=torch.bool)
    edited_k = torch.tensor([0, 1, 0, 1])
    assert ChangeFocus(2, 0.0)(errors, shown, edited_k) == pytest.approx(float(errors.mean()))
    focus = ChangeFocus(2, 2.0, decay=0.5)
    loss = focus(errors, shown, edited_k)
    weights = focus.weights()
    assert float(weights[0] / weights[1]) == pytest.approx(9.0)
    assert float(loss) == pytest.approx((2 * 0.3 * 9 + 2 * 0.1) / (2 * 9 + 2))
    for _ in range(12):  # attribute 0 learnt: its error falls to attribute 1's
        focus(torch.tensor([0.1, 0.1, 0.1, 0.1]), shown, edited_k)
    assert float(focus.weights()[0] / focus.weights()[1]) == pytest.approx(1.0, abs=0.01)
    # Edits that change nothing (none should) carry no weight, and never a NaN.
    none_shown = torch.zeros(4, dtype=torch.bool)
    assert float(focus(errors, none_shown, edited_k)) == 0
    per_image, changed = change_errors(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8),
                                       torch.zeros(1, 3, 8, 8), 0.02)
    assert not changed.any() and torch.isfinite(per_image).all()


def test_an_attribute_never_drawn_takes_the_mean_weight():
    focus = ChangeFocus(3, 2.0)
    focus(torch.tensor([0.2, 0.4]), torch.ones(2, dtype=torch.bool), torch.tensor([0, 1]))
    weights = focus.weights()
    assert torch.isfinite(weights).all() and float(weights[2]) == pytest.approx(1.0)


def train(data: Path, out: Path, *extra: str):
    args = ["train-gan", "--images", str(data / "images"), "--attrs", str(data / "list_attr.txt"),
            "--attributes", ",".join(ATTRS), "--img-size", "32", "--layers", "3", "--batch-size", "8",
            "--max-steps", "80", "--n-d", "1", "--save-every", "80", "--sample-every", "80",
            "--lr", "1e-3", "--out", str(out), "--no-progress", "--device", "cpu", *extra]
    return CliRunner().invoke(app, args)


def edit_change_errors(data: Path, gan: Path) -> list[float]:
    """Per attribute, how far the backbone's edit is from the truth, as `change_loss` weighs it."""
    backbone = load_backbone(str(gan))
    files, rows = files_and_rows(data)
    truth = render_pairs(synth_source(data / "images"), files, ATTRS, 32, workers=1).float() / 255 * 2 - 1
    x = torch.stack([load_image(f, 32) for f in files]) * 2 - 1
    a = torch.from_numpy(np.stack(rows)).float()
    with torch.no_grad():
        reconstruction = backbone(x, a)
        return [float(change_loss(backbone(x, edited(a, k, ATTRS)[0]), reconstruction, x, truth[:, k], 0.02))
                for k in range(len(ATTRS))]


def test_train_gan_supervises_synth_faces_with_their_counterfactuals(data, tmp_path):
    result = train(data, tmp_path / "cf")
    assert result.exit_code == 0, result.output
    assert "g_pair=" in result.output and "g_change=" in result.output
    setting = json.loads((tmp_path / "cf" / "setting.txt").read_text())
    assert setting["counterfactuals"] is None and setting["lambda_pair"] == 100.0
    plain = train(data, tmp_path / "plain", "--no-counterfactuals")
    assert plain.exit_code == 0, plain.output
    # The same 80 steps: with the truth as a signal each edit's change lies nearer the true change.
    supervised, unsupervised = edit_change_errors(data, tmp_path / "cf"), edit_change_errors(data, tmp_path / "plain")
    # (measured: 0.95 against 1.24 summed over the four, each attribute lower)
    assert sum(supervised) < 0.85 * sum(unsupervised), (supervised, unsupervised)
    assert all(s < u for s, u in zip(supervised, unsupervised)), (supervised, unsupervised)


def test_without_counterfactuals_train_gan_keeps_attgans_losses_alone(data, tmp_path):
    args = ["train-gan", "--images", str(data / "images"), "--attrs", str(data / "list_attr.txt"),
            "--attributes", ",".join(ATTRS), "--img-size", "32", "--layers", "3", "--batch-size", "8",
            "--max-steps", "2", "--n-d", "1", "--out", str(tmp_path / "run"), "--no-progress", "--device", "cpu",
            "--no-counterfactuals"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "g_rec=" in result.output and "g_pair" not in result.output


def test_counterfactuals_on_a_folder_not_drawn_by_sia_synth_is_one_clear_line(data, tmp_path):
    photos = tmp_path / "photos"
    (photos / "images").mkdir(parents=True)
    for file in sorted((data / "images").iterdir())[:10]:
        (photos / "images" / file.name).write_bytes(file.read_bytes())
    lines = (data / "list_attr.txt").read_text().splitlines()
    (photos / "list_attr.txt").write_text("\n".join(["10", lines[1], *lines[2:12]]) + "\n")
    args = ["train-gan", "--images", str(photos / "images"), "--attrs", str(photos / "list_attr.txt"),
            "--attributes", ",".join(ATTRS), "--img-size", "32", "--layers", "3", "--batch-size", "4",
            "--max-steps", "2", "--out", str(tmp_path / "run"), "--no-progress", "--device", "cpu",
            "--counterfactuals"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--counterfactuals needs a `sia synth` folder" in lines[0]
    assert not (tmp_path / "run" / "checkpoint").exists()


@pytest.mark.parametrize("flag,value,message", [
    ("--lambda-pair", "-1", "--lambda-pair must be a finite non-negative number"),
    ("--lr-schedule", "step", "--lr-schedule 'step': choose constant or cosine"),
])
def test_counterfactual_options_are_checked_up_front(data, tmp_path, flag, value, message):
    args = ["train-gan", "--images", str(data / "images"), "--attrs", str(data / "list_attr.txt"),
            "--max-steps", "2", "--out", str(tmp_path / "run"), "--no-progress", "--device", "cpu", flag, value]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and message in result.stderr


def test_refine_layers_and_change_focus_train_and_the_backbone_loads_with_them(data, tmp_path):
    out = tmp_path / "refined"
    result = train(data, out, "--refine-layers", "1", "--change-focus", "2", "--max-steps", "4", "--save-every", "4")
    assert result.exit_code == 0, result.output
    setting = json.loads((out / "setting.txt").read_text())
    assert setting["refine_layers"] == 1 and setting["change_focus"] == 2
    backbone = load_backbone(str(out))
    assert len(backbone.generator.refine) == 1
    moved = backbone.generator.refine[0].outer.weight.abs().sum()
    assert moved > 0  # trained: the block no longer the identity it started as
