"""`sia diagnose` and `sia sdar` on the shipped targets: it must find the biases we planted.

examples/targets/ holds classifiers trained by examples/train_targets.py on synth faces
where the label co-occurred with a confounder 99% of the time, and controls trained on
unconfounded faces. The diagnosis must rank the confounder first for the confounded model,
give it a clearly larger share than for the control, and give the confounded model the
larger SDAR.
"""

import json
import time
from html import escape
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sia_cli.cli import app
from sia_cli.errors import FEW_IMAGES, UNFIT
from sia_cli.inputs.synth import make_dataset
from sia_cli.measures.table import by_name
from sia_cli.reports.html import headline_sentence

TARGETS = Path(__file__).parents[1] / "examples" / "targets"
# The label is subtler than its confounder in both pairs, so the confounded models really
# lean on the confounder (see the README's bias table for Eyeglasses/Bangs, where it does not).
PAIRS = {"smiling": ("Smiling", "Blond_Hair"), "mustache": ("Mustache", "Pale_Skin")}
STEPS = "60"


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faces")
    make_dataset(folder, 24, seed=5, size=64)
    return folder


def run_diagnose(faces: Path, out: Path, model: str, protect: str, *extra: str) -> dict:
    result = CliRunner().invoke(app, [
        "diagnose", str(TARGETS / model), "--images", str(faces / "images"), "--attrs-file",
        str(faces / "list_attr.txt"), "--protect", protect, "--steps", STEPS, "--bootstrap", "50",
        "--out", str(out), "--no-progress", "--device", "cpu", *extra,
    ])
    assert result.exit_code == 0, result.output + str(result.exception)
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def reports(faces, tmp_path_factory):
    out = {}
    for name, (label, _) in PAIRS.items():
        for kind in ("confounded", "control"):
            folder = tmp_path_factory.mktemp(f"{name}-{kind}")
            out[name, kind] = run_diagnose(faces, folder / "run", f"{name}_{kind}.pt", label)
            out[name, kind]["_folder"] = str(folder / "run")
    return out


def headline_shares(report: dict) -> dict:
    return report[by_name(report["settings"]["headline"]).normalized_key]


@pytest.mark.parametrize("name", PAIRS)
def test_planted_confounder_ranks_first(reports, name):
    label, confounder = PAIRS[name]
    report = reports[name, "confounded"]
    assert report["ranking"][0] == confounder, report["ranking"][:5]
    assert label not in report["ranking"]  # protected: left out of every measure


@pytest.mark.parametrize("name", PAIRS)
def test_confounder_share_clearly_higher_than_for_control(reports, name):
    _, confounder = PAIRS[name]
    confounded = headline_shares(reports[name, "confounded"])[confounder]
    control = headline_shares(reports[name, "control"])[confounder]
    assert confounded > 1.5 * control, (confounded, control)


@pytest.mark.parametrize("name", PAIRS)
def test_sdar_of_confounded_model_above_control(reports, name):
    assert reports[name, "confounded"]["sdar"] > reports[name, "control"]["sdar"]


def test_sensitivity_and_sdar_equal_recomputation_from_records(reports):
    report = reports["smiling", "confounded"]
    names = report["attributes"]
    start = np.array([r["attrs_start"] for r in report["images"]])
    end = np.array([r["attrs_end"] for r in report["images"]])
    shift = np.abs(end - start).mean(axis=0)
    kept = [i for i, n in enumerate(names) if n not in report["protected"]]
    expected = {names[i]: shift[i] for i in kept}
    assert report["sensitivity"] == pytest.approx(expected, abs=1e-9)
    assert report["sdar"] == pytest.approx(np.std([expected[n] for n in expected]), abs=1e-12)
    ablation = np.array([r["ablation"] for r in report["images"]]).mean(axis=0)
    assert report["sensitivity_ablation"] == pytest.approx({names[i]: ablation[i] for i in kept}, abs=1e-9)
    total = sum(report["sensitivity_ablation"].values())
    assert report["sensitivity_ablation_normalized"]["Blond_Hair"] == pytest.approx(report["sensitivity_ablation"]["Blond_Hair"] / total)
    flip = np.array([r["flip"] for r in report["images"]]).mean(axis=0)
    assert report["sensitivity_flip"] == pytest.approx({names[i]: flip[i] for i in kept}, abs=1e-9)


def test_report_schema_and_files(reports):
    report = reports["smiling", "confounded"]
    for key in ("schema_version", "version", "command", "settings", "backbone", "target", "attributes",
                "sensitivity", "sensitivity_normalized", "sensitivity_ablation", "sensitivity_ablation_normalized",
                "sensitivity_flip", "sensitivity_flip_normalized", "ranking", "sdar", "attack_success_rate", "psnr", "ssim", "images", "skipped", "timing"):
        assert key in report, key
    record = report["images"][0]
    assert set(record) >= {"file", "attrs_start", "attrs_end", "label", "pred_clean", "pred_adv", "success"}
    assert report["intervals"]["sdar"]["low"] <= report["sdar"] <= report["intervals"]["sdar"]["high"]
    folder = Path(report["_folder"])
    with Image.open(folder / "sensitivity.png") as png:
        assert png.size[0] > 400 and len(set(png.convert("RGB").getdata())) > 20
    with Image.open(folder / "grid.png") as png:
        assert png.size[1] > 64
    html = (folder / "report.html").read_text()
    assert "data:image/png;base64," in html and escape(headline_sentence(report)) in html
    assert report["settings"]["intervals"].startswith("BCa bootstrap")
    assert report["stands_out"] in (None, *report["ranking"][:1])
    assert report["backbone_fit"]["ok"] is True and report["backbone_fit"]["in_domain"] == 1.0
    assert report["blind_spots"] is not None and "Smiling" not in report["blind_spots"]  # protected
    assert set(report["backbone"]["edit_success"]) == set(report["attributes"])
    assert {"lost_in_reconstruction", "pred_reconstruction", "success_vs_label", "success_vs_reconstruction",
            "counted", "critic_margin", "in_domain", "attrs_source", "psnr_vs_clean"} <= set(record)
    assert report["measured_images"] == sum(r["counted"] for r in report["images"])
    target = report["target"]  # the preprocessing actually used, whatever its source
    assert target["input_size"] == [64, 64] and target["mean"] == [0.5] * 3 and target["output"] == "logits"
    assert len(list((folder / "adversaries").glob("*.png"))) == len(report["images"])


def test_single_mode_and_groups(faces, tmp_path):
    report = run_diagnose(faces, tmp_path / "single", "smiling_confounded.pt", "Smiling", "--mode", "single",
                          "--steps", "20", "--group-by", "Male")
    assert set(report["flip_rate"]) == set(report["sensitivity_single_normalized"])
    assert "Smiling" not in report["flip_rate"]
    assert all(0 <= v <= 1 for v in report["flip_rate"].values())
    # Each attribute's own effect, not one shared offset: the shares must differ.
    shares = report["sensitivity_single_normalized"].values()
    assert max(shares) > 1.5 * min(shares), report["sensitivity_single_normalized"]
    assert set(report["groups"]) == {"Male=1", "Male=0"}
    assert sum(g["images"] for g in report["groups"].values()) == len(report["images"])


def test_sdar_gate_exit_codes(reports, tmp_path):
    path = Path(reports["smiling", "confounded"]["_folder"]) / "report.json"
    value = reports["smiling", "confounded"]["sdar"]
    runner = CliRunner()
    assert runner.invoke(app, ["sdar", str(path), "--max", str(value * 2)]).exit_code == 0
    assert runner.invoke(app, ["sdar", str(path), "--max", str(value / 2)]).exit_code == 1
    assert runner.invoke(app, ["sdar", str(tmp_path / "missing.json"), "--max", "1"]).exit_code == 2
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert runner.invoke(app, ["sdar", str(broken), "--max", "1"]).exit_code == 2
    control = Path(reports["smiling", "control"]["_folder"]) / "report.json"
    result = runner.invoke(app, ["sdar", str(path), "--baseline", str(control)])
    assert result.exit_code == 0 and "Blond_Hair" in result.output
    shared = sum(a["counted"] and b["counted"] for a, b in
                 zip(reports["smiling", "confounded"]["images"], reports["smiling", "control"]["images"]))
    assert f"paired SDAR difference (this - baseline) on {shared} shared images" in " ".join(result.output.split())
    same = runner.invoke(app, ["sdar", str(path), "--baseline", str(path)])
    assert "+0.00000" in same.output and "not significant" in same.output


def test_sdar_gate_fails_closed(reports, tmp_path):
    report = {k: v for k, v in reports["smiling", "confounded"].items() if k != "_folder"}
    runner = CliRunner()

    def gate(changed: dict, *args: str) -> int:
        path = tmp_path / "r.json"
        path.write_text(json.dumps({**report, **changed}))
        return runner.invoke(app, ["sdar", str(path), *args]).exit_code

    assert gate({}, "--max", "1") == 0
    assert gate({}, "--max", "nan") == 2 and gate({}, "--max", "-1") == 2
    assert gate({"sdar": None}, "--max", "1") == 2
    unfit = {"backbone_fit": {**report["backbone_fit"], "ok": False, "reasons": ["0% in domain"]}}
    assert gate(unfit, "--max", "1") == UNFIT
    assert gate(unfit, "--max", "1", "--allow-unfit") == 0
    assert gate({"backbone_fit": {**report["backbone_fit"], "ok": None}}, "--max", "1") == UNFIT
    old = {k: v for k, v in report.items() if k != "backbone_fit"}
    (tmp_path / "old.json").write_text(json.dumps(old))
    result = runner.invoke(app, ["sdar", str(tmp_path / "old.json"), "--max", "1"])
    assert result.exit_code == UNFIT and "no backbone_fit" in result.output
    few = {"evidence": {"counted_images": 3, "minimum_images": 10, "enough": False}}
    assert gate(few, "--max", "1") == FEW_IMAGES
    assert gate(few, "--max", "1", "--allow-few-images") == 0
    assert gate({"evidence": None}, "--max", "1") == FEW_IMAGES  # an older report never said: fail closed

    # A baseline attacked otherwise, or through another backbone, is no baseline: SDAR scales with
    # the budget, so a "significant" difference there would be the settings', not the model's.
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    settings = report["settings"]
    for changed, words in [
        ({"settings": {**settings, "settings": {**settings["settings"], "steps": 5, "eps": 8 / 255}}},
         f"differ in steps {settings['settings']['steps']} -> 5"),
        ({"backbone": {**report["backbone"], "sha256": "0" * 64}}, "differ in backbone 000000000000..."),
    ]:
        (tmp_path / "base.json").write_text(json.dumps({**report, **changed}))
        result = runner.invoke(app, ["sdar", str(path), "--baseline", str(tmp_path / "base.json"), "--max", "1"])
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        assert "cannot compare with the baseline" in result.output


def test_sdar_of_a_model_says_where_its_report_is_so_a_retry_gates_on_it(faces, tmp_path):
    """Gating a model diagnoses it into --out (./sia-out by default); a refusal there must point
    at that report, because the same command again is refused as a finished run."""
    few = tmp_path / "few"
    (few / "images").mkdir(parents=True)
    for path in sorted((faces / "images").iterdir())[:3]:
        (few / "images" / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "gate"
    runner = CliRunner()
    result = runner.invoke(app, ["sdar", str(TARGETS / "mustache_confounded.pt"), "--images", str(few / "images"),
                                 "--steps", "2", "--max", "1", "--out", str(out), "--no-progress"])
    text = " ".join(result.output.split())
    assert result.exit_code == FEW_IMAGES and f"diagnosis written to {out / 'report.json'}" in text, text
    assert f"{out / 'report.json'} counted 3 image(s)" in text
    retry = runner.invoke(app, ["sdar", str(out / "report.json"), "--max", "1", "--allow-few-images"])
    assert retry.exit_code == 0, retry.output


def test_one_face_names_no_attribute_and_the_gate_refuses_it(faces, tmp_path):
    """One counted image gives every attribute an interval of width 0, which 'cleared' the
    runner-up's: the report must say it measured too few images and name nobody."""
    one = tmp_path / "one"
    (one / "images").mkdir(parents=True)
    name = sorted((faces / "images").iterdir())[0].name
    (one / "images" / name).write_bytes((faces / "images" / name).read_bytes())
    began = time.perf_counter()
    result = CliRunner().invoke(app, [
        "diagnose", str(TARGETS / "mustache_confounded.pt"), "--images", str(one / "images"), "--protect", "Mustache",
        "--steps", "5", "--bootstrap", "20", "--out", str(tmp_path / "run"), "--no-progress", "--device", "cpu"])
    elapsed = time.perf_counter() - began
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    # timing covers the run, loading and the figures included (only the HTML is written after it)
    assert 0.8 * elapsed <= report["timing"]["total_s"] <= elapsed
    assert report["evidence"] == {"counted_images": report["measured_images"], "minimum_images": 10, "enough": False}
    assert report["stands_out"] is None
    assert report["ranking"] == [] and report["ranking_withheld"].startswith("too few images")
    assert sorted(report["by_value"]) == sorted(set(report["attributes"]) - {"Mustache"})  # protected
    text = " ".join(result.output.split())
    assert "Too few images to name an attribute" in text and "most sensitive to" not in text
    assert "not ranked (too few images" in text  # the terminal table lists by value, unnumbered
    # report.json keeps the intervals beside `evidence`; what is shown carries none of width 0
    headline = report["settings"]["headline"]
    assert report["intervals"]["sdar"] and report["intervals"]["sensitivity_" + headline]
    assert "no interval below 10 counted images" in text and "BCa interval" not in text
    assert f"SDAR {report['sdar']:.4f} [" not in text
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Too few images to name an attribute" in page and "<ol>" not in page.split("Too few images")[1][:300]
    sdar_interval = report["intervals"]["sdar"]
    assert f"{sdar_interval['low']:.4f}, {sdar_interval['high']:.4f}]" not in page
    gate = CliRunner().invoke(app, ["sdar", str(tmp_path / "run" / "report.json"), "--max", "1", "--allow-unfit"])
    assert gate.exit_code == FEW_IMAGES and "--allow-few-images" in gate.output


def test_unlabeled_images_with_a_backbone_without_discriminator_is_a_clear_error(faces, tmp_path):
    import shutil

    import torch

    backbone = Path(__file__).parents[1] / "sia_cli" / "backbone" / "builtin" / "synth-faces-64"
    copy = tmp_path / "no-critic"
    shutil.copytree(backbone, copy)
    checkpoint = next((copy / "checkpoint").glob("weights.*.pth"))
    state = torch.load(checkpoint, weights_only=True)
    torch.save({"G": state["G"]}, checkpoint)
    result = CliRunner().invoke(app, [
        "diagnose", str(TARGETS / "smiling_confounded.pt"), "--images", str(faces / "images"),
        "--gan", str(copy), "--out", str(tmp_path / "out"), "--no-progress",
    ])
    assert result.exit_code == 2
    assert "no starting attributes: pass --attrs-file" in result.output


class Corner(torch.nn.Module):
    """A binary model that reads only the top-left 6x6 pixels: background, which no attribute
    truly touches (the renderer's flips leave it as it was), but which the reconstruction and
    the backbone's edits redraw a little. It hardly moves under any edit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, :, :6, :6].mean(dim=(1, 2, 3)) - 0.5) * 20


def test_a_model_that_hardly_moves_is_said_to_and_ranks_nothing(faces, tmp_path):
    path = tmp_path / "corner.pt"
    torch.jit.save(torch.jit.script(Corner().eval()), str(path), _extra_files={"sia.yaml": "output: logits\n"})
    result = CliRunner().invoke(app, [
        "diagnose", str(path), "--images", str(faces / "images"), "--attrs-file", str(faces / "list_attr.txt"),
        "--steps", "20", "--step-size", "0.02", "--bootstrap", "20", "--out", str(tmp_path / "run"),
        "--no-progress", "--device", "cpu", "--keep-lost"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    effect = report["effect"]
    assert effect["unit"] == "probability" and effect["measure"] == "flip"
    # The truth: no flip of any attribute moves it at all.
    from sia_cli.measures.validity import true_effects
    from sia_cli.targets import load_target

    assert max(true_effects(load_target(path), seed=5, n=6, size=64).values()) == 0.0
    # Measured with the default backbone: the 15 flips together move it 0.047, each one 0.0060
    # at most, the reconstruction alone 0.011: no edit moves it more than redrawing the face does.
    assert effect["moves"] is False and effect["excess_interval"]["low"] <= 0, effect
    assert effect["largest"] < effect["floor"] < effect["total"], effect
    assert report["stands_out"] is None
    assert report["ranking"] == [] and "hardly moves" in report["ranking_withheld"]
    text = " ".join(result.output.split())
    assert "hardly moves under any edit" in text and "most sensitive to" not in text
    assert "not ranked (the model hardly moves" in text
    page = (tmp_path / "run" / "report.html").read_text()
    assert "hardly moves under any edit" in page


def test_a_model_that_moves_carries_its_effect_size_beside_every_share(reports):
    report = reports["smiling", "confounded"]
    effect = report["effect"]
    assert effect["moves"] is True and effect["largest"] > effect["floor"] > 0, effect
    assert effect["measure"] == report["settings"]["headline"] == "flip"
    assert effect["total"] == pytest.approx(sum(report["sensitivity_flip"].values()))
    page = (Path(report["_folder"]) / "report.html").read_text()
    top = report["ranking"][0]
    assert f"{report['sensitivity_flip'][top]:.3g} probability" in page


def test_headline_is_chosen_on_the_command_line(faces, tmp_path):
    """--headline ablation ranks by the attack's end point, as reports did before the flip; a
    measure that does not rank in the mode is one line and exit 2, before any attack."""
    report = run_diagnose(faces, tmp_path / "run", "mustache_confounded.pt", "Mustache", "--headline", "ablation",
                          "--steps", "10")
    assert report["settings"]["headline"] == report["effect"]["measure"] == "ablation"
    assert report["sensitivity_flip"] and report["ranking"] == sorted(
        report["sensitivity_ablation"], key=report["sensitivity_ablation"].get, reverse=True)[:len(report["ranking"])]
    result = CliRunner().invoke(app, [
        "diagnose", str(TARGETS / "mustache_confounded.pt"), "--images", str(faces / "images"),
        "--headline", "single", "--out", str(tmp_path / "no"), "--no-progress"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == ["error: headline measure 'single' does not fit --mode multi"]
    assert not (tmp_path / "no" / "report.json").exists()
