"""Findings a user can trust: backbone fit, images lost in reconstruction, blind spots, warnings.

The end-to-end cases use real photos that scikit-image ships (the astronaut, LFW faces and
non-faces, the coffee cup) written as PNG and JPEG at CelebA's 178x218 and at odd sizes, and
the shipped backbone, trained on synthetic faces only: on them `backbone_fit.ok` must be false
and say so in the terminal, the HTML and the JSON, and `sia sdar` must refuse to pass.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import skimage.data
from PIL import Image
from typer.testing import CliRunner

from sia_cli.cli import app
from sia_cli.errors import FEW_IMAGES, UNFIT
from sia_cli.inputs.synth import make_dataset
from sia_cli.measures import trust

TARGETS = Path(__file__).parents[1] / "examples" / "targets"
CARD = {"domain": {"critic_margin_median": 4.0}, "edit_success": {"A": 0.9, "B": 0.2, "C": 0.6}}


def record(name="x.png", lost=False, margin=4.0, **extra):
    return {"file": name, "lost_in_reconstruction": lost, "critic_margin": margin,
            "in_domain": trust.in_domain(margin, CARD), "reconstruction_mae": 0.05, **extra}


# ---------------------------------------------------------------- the rules


def test_in_domain_follows_the_calibrated_margin():
    assert trust.in_domain(2.0, CARD) is True  # half the calibrated median
    assert trust.in_domain(1.9, CARD) is False
    assert trust.in_domain(None, CARD) is None  # no discriminator: cannot tell
    assert trust.in_domain(3.0, {}) is None  # no calibration: cannot tell


def test_in_domain_takes_the_cards_margin_floor_where_it_calibrates_one():
    card = {"domain": {**CARD["domain"], "critic_margin_floor": 1.2}}
    assert trust.in_domain(1.2, card) is True  # under half the median, over this backbone's 1st percentile
    assert trust.in_domain(1.19, card) is False
    rule = trust.fit_rule(card["domain"])
    assert "its calibrated margin floor" in rule and "median" not in rule and "critic score" not in rule
    rule = trust.fit_rule({**card["domain"], "critic_score_floor": -1.0})
    assert "critic score of at least its calibrated floor" in rule


@pytest.mark.parametrize("images, out, ok", [(8, 1, True), (5, 1, True), (8, 2, False), (30, 3, True),
                                              (30, 4, False), (4, 1, False), (1, 1, False)])
def test_backbone_fit_allows_one_image_out_of_five_or_more_and_otherwise_needs_90_percent(images, out, ok):
    """Floors at the 1st percentiles leave about 2 in 100 of the backbone's own faces out: on
    8 images a 90% share would tolerate none. One image out of 5 or more is allowed; below 5,
    one is a fifth or more of the run."""
    records = [record(f"{i}.png", margin=1.0 if i < out else 4.0) for i in range(images)]
    fit = trust.backbone_fit(records, CARD)
    assert fit["ok"] is ok, fit
    assert ("look like the backbone's training data" in " ".join(fit["reasons"])) is (not ok)
    assert "or all but one of 5 or more" in fit["rule"] and "0.5 x its calibrated median margin" in fit["rule"]


def test_calibrate_domain_stores_the_margin_floor_at_the_1st_percentile():
    class Backbone:  # margins 0..99 (the score minus the reconstruction's), scores 0..99
        def __call__(self, x, a):
            return x

        def critic_scores(self, x, reconstruction):
            values = x[:, 0, 0, 0]
            return values, values

    images = torch.arange(100, dtype=torch.float32).view(100, 1, 1, 1).expand(100, 3, 2, 2) / 2 + 0.5
    domain = trust.calibrate_domain(Backbone(), images, torch.zeros(100, 1))
    margins = images[:, 0, 0, 0] * 2 - 1
    assert domain["critic_margin_floor"] == pytest.approx(float(np.percentile(margins.numpy(), 1)), abs=1e-4)
    assert domain["critic_margin_floor"] < domain["critic_margin_p05"] < domain["critic_margin_median"]


def test_in_domain_also_needs_the_critic_score_where_the_card_calibrates_it():
    card = {"domain": {"critic_margin_median": 4.0, "critic_score_floor": -1.0}}
    assert trust.in_domain(2.0, card, -1.0) is True
    assert trust.in_domain(2.0, card, -1.1) is False  # a wide margin does not make up for a low score
    assert trust.in_domain(1.9, card, 3.0) is False
    assert trust.in_domain(2.0, card, None) is None  # calibrated but not measured: cannot tell


def test_backbone_fit_ok_needs_the_domain_and_few_lost_images():
    good = [record(f"{i}.png") for i in range(10)]
    assert trust.backbone_fit(good, CARD)["ok"] is True
    outside = [record(f"{i}.png", margin=0.5 if i < 2 else 4.0) for i in range(10)]
    fit = trust.backbone_fit(outside, CARD)
    assert fit["ok"] is False and fit["in_domain"] == 0.8 and "80%" in fit["reasons"][0]
    lost = [record(f"{i}.png", lost=i < 6) for i in range(10)]
    fit = trust.backbone_fit(lost, CARD)
    assert fit["ok"] is False and fit["lost_in_reconstruction"] == 0.6 and fit["lost_files"][0] == "0.png"
    assert trust.backbone_fit([record(f"{i}.png", lost=i < 5) for i in range(10)], CARD)["ok"] is True
    unknown = trust.backbone_fit([{**r, "in_domain": None} for r in good], {})
    assert unknown["ok"] is None and "no domain calibration" in unknown["reasons"][0]
    # failed images are not part of the fit
    assert trust.backbone_fit(good + [{"file": "bad.png", "error": "NaN"}], CARD)["images"] == 10


def test_blind_spots_are_the_attributes_the_backbone_cannot_edit():
    assert trust.blind_spots(CARD, ["A", "B", "C"]) == ["B"]
    assert trust.blind_spots(CARD, ["A", "B", "C", "D"]) == ["B", "D"]  # never measured: not cleared
    assert trust.blind_spots(CARD, ["A", "B"], protected=["B"]) == []
    assert trust.blind_spots({}, ["A"]) is None


def test_warnings_name_every_reason_not_to_trust():
    fit = trust.backbone_fit([record(f"{i}.png", lost=i < 3, margin=0.1) for i in range(10)], CARD)
    estimated = [{"file": "a.png", "attrs_source": "discriminator", "attrs_confidence": 0.7}]
    lines = trust.warnings_for(fit, ["B"], estimated, ["output (B, 40) read as 40-class softmax"], grouped=True)
    assert lines[0].startswith("backbone does not fit these images") and "--align finds their faces" in lines[0]
    assert "--align" not in trust.warnings_for(fit, [], [], aligned=True)[0]  # already aligned: no hint
    assert any(line.startswith("blind spots: the backbone edits B") for line in lines)
    assert any("estimated by the backbone's discriminator" in line and "--group-by" in line for line in lines)
    assert lines[-1].startswith("output (B, 40)")
    # 30% lost is no reason of the fit (at most 50%), so a fit refused for its domain must still say it.
    assert any(line.startswith("30% of the images are lost in reconstruction") for line in lines)
    most = trust.backbone_fit([record(f"{i}.png", lost=i < 6, margin=0.1) for i in range(10)], CARD)
    lines = trust.warnings_for(most, [], [])
    assert "60% of the images are lost" in lines[0] and not any(line.startswith("60%") for line in lines)
    fine = trust.backbone_fit([record(f"{i}.png") for i in range(10)], CARD)
    assert trust.warnings_for(fine, [], [{"file": "a.png", "attrs_source": "attrs_file"}]) == []
    assert any("never measured" in line for line in trust.warnings_for(fine, None, []))


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Real photos as a user has them: faces and non-faces, PNG and JPEG, CelebA size and odd sizes."""
    folder = tmp_path_factory.mktemp("photos")
    astronaut = skimage.data.astronaut()
    Image.fromarray(astronaut).resize((178, 218)).save(folder / "astronaut.png")
    Image.fromarray(astronaut[0:300, 100:400]).save(folder / "astronaut_face.jpg", quality=90)
    Image.fromarray(skimage.data.coffee()).save(folder / "coffee.jpg", quality=90)
    lfw = skimage.data.lfw_subset()  # 100 faces, then 100 non-faces, 25x25 grey
    for i in range(5):
        Image.fromarray((lfw[i] * 255).astype(np.uint8)).resize((178, 218)).save(folder / f"lfw_face_{i}.png")
    Image.fromarray((lfw[150] * 255).astype(np.uint8)).resize((97, 131)).save(folder / "lfw_nonface.png")
    return folder


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("faces")
    make_dataset(folder, 8, seed=21, size=64)
    return folder


def diagnose(model: str, images: Path, out: Path, *extra: str):
    result = CliRunner().invoke(app, [
        "diagnose", str(TARGETS / model), "--images", str(images), "--out", str(out), "--no-progress",
        "--device", "cpu", "--bootstrap", "20", *extra,
    ])
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split()), json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_real_photos_are_flagged_in_every_output_and_the_gate_refuses(photos, tmp_path):
    result, report = diagnose("mustache_confounded.pt", photos, tmp_path / "run", "--steps", "1",
                              "--protect", "Mustache")
    fit = report["backbone_fit"]
    assert fit["ok"] is False and fit["in_domain"] <= 0.2, fit
    warning = report["warnings"][0]
    assert warning.startswith("backbone does not fit these images") and "--align finds their faces" in warning
    assert "warning: backbone does not fit these images" in result  # the terminal
    assert "does not fit these images well enough" in result
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Do not trust this diagnosis" in page and "NOT ok" in page  # the HTML
    assert any("estimated by the backbone's discriminator" in w for w in report["warnings"])
    assert all(r["attrs_source"] == "discriminator" and 0 <= r["attrs_confidence"] <= 1 for r in report["images"])
    gate = CliRunner().invoke(app, ["sdar", str(tmp_path / "run" / "report.json"), "--max", "1"])
    assert gate.exit_code == UNFIT and "--allow-unfit" in gate.output
    # 9 photos are fewer than a finding needs: past the fit, the gate refuses that too (exit 5).
    few = CliRunner().invoke(app, ["sdar", str(tmp_path / "run" / "report.json"), "--max", "1", "--allow-unfit"])
    assert few.exit_code == FEW_IMAGES and "--allow-few-images" in few.output
    passed = CliRunner().invoke(app, ["sdar", str(tmp_path / "run" / "report.json"), "--max", "1", "--allow-unfit",
                                      "--allow-few-images"])
    assert passed.exit_code == 0


@pytest.mark.slow
@pytest.mark.parametrize("model", ["landmarks.pt", "mustache_confounded.pt"])
def test_one_step_of_attack_is_credited_with_almost_nothing(photos, faces, tmp_path, model):
    """With --steps 1 the attack has taken one small step: whatever the backbone's reconstruction
    already changes (most real photos under the landmark model) is lost, never a success. A
    success is the step's own: the reconstruction kept the answer, the step moved it (measured
    with the default backbone: one face of 6 counted, whose landmarks sit on the model's
    rounding boundary, and one photo of 6 under the Mustache model)."""
    for name, images in (("photos", photos), ("faces", faces / "images")):
        _, report = diagnose(model, images, tmp_path / name, "--steps", "1")
        counted = [r for r in report["images"] if r["counted"]]
        assert sum(r["success"] for r in counted) <= 1, (name, report["attack_success_rate"])
        for r in report["images"]:
            if r["lost_in_reconstruction"]:
                assert not r["success"] and not r["counted"]
                assert r["success_vs_label"]  # the plain rate would have counted it
            if r["success"]:
                assert r["success_vs_reconstruction"] and r["psnr"] > 35  # one small step from G(x0, a0)
    _, kept = diagnose(model, photos, tmp_path / "kept", "--steps", "1", "--keep-lost")
    lost = [r for r in kept["images"] if r["lost_in_reconstruction"]]
    if lost:  # --keep-lost counts them again
        assert all(r["counted"] and r["success"] for r in lost)
        assert kept["attack_success_rate"] > report["attack_success_rate"] or kept["measured_images"] > 0


@pytest.mark.slow
def test_in_domain_faces_fit(faces, tmp_path):
    result, report = diagnose("mustache_confounded.pt", faces / "images", tmp_path / "run", "--steps", "5",
                              "--attrs-file", str(faces / "list_attr.txt"), "--protect", "Mustache")
    assert report["backbone_fit"]["ok"] is True, report["backbone_fit"]
    assert not any(w.startswith("backbone does not fit") for w in report["warnings"])
    assert "warning: backbone does not fit" not in result
    assert all(r["attrs_source"] == "attrs_file" and "attrs_confidence" not in r for r in report["images"])
