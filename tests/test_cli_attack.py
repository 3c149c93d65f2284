"""`sia attack` end to end through the command line, on a few synthetic faces.

The reports are checked against the files the run wrote: the saved adversary PNGs are
reloaded and judged again by the target, so a report can never claim more (or less)
than the images on disk show. Success rates themselves depend on the shipped checkpoint
(which gets retrained), so none is asserted.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CLI_FACES
from PIL import Image
from typer.testing import CliRunner

from sia_cli.cli import app
from sia_cli.engine.attack import METHODS
from sia_cli.inputs.faces import ATTRIBUTES
from sia_cli.inputs.images import load_image
from sia_cli.targets import load_target

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit deprecation notices

REPO = Path(__file__).resolve().parents[1]
TARGETS = REPO / "examples" / "targets"
EYEGLASSES = TARGETS / "eyeglasses_confounded.pt"
SIZE = 64  # the default backbone's image size
N_FACES = CLI_FACES  # the shared `faces` fixture (conftest)
FAST = ["--steps", "3", "--batch-size", "4", "--no-progress"]  # 6 faces -> batches of 4 and 2


def sia(*args: str):
    return CliRunner().invoke(app, ["attack", *map(str, args)], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def eyeglasses():
    return load_target(EYEGLASSES, probe_size=SIZE)


def report_of(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def adversary_files(folder: Path, report: dict) -> list[Path]:
    """The PNG of each record, checking the folder holds exactly one per processed image."""
    written = sorted(p.name for p in (folder / "adversaries").iterdir())
    expected = sorted(f"{Path(r['file']).stem}.png" for r in report["images"])
    assert written == expected
    return [folder / "adversaries" / name for name in expected]


def reload_adversaries(files: list[Path]) -> torch.Tensor:
    """Saved PNGs -> [-1, 1] batch at the backbone size, the convention the engine uses."""
    for file in files:
        with Image.open(file) as image:
            assert image.mode == "RGB" and image.size == (SIZE, SIZE)
    return torch.stack([load_image(f, SIZE) for f in files]) * 2 - 1


def binary_success_from_files(folder: Path, target) -> tuple[dict, list[bool]]:
    report = report_of(folder)
    images = reload_adversaries(adversary_files(folder, report))
    with torch.no_grad():
        predicted = target.probability(target(images)) > 0.5
    label = torch.tensor([r["label"] for r in report["images"]]) > 0.5
    return report, (predicted != label).tolist()


def assert_report_matches_files(folder: Path, target) -> dict:
    report, recomputed = binary_success_from_files(folder, target)
    recorded = [r["success_vs_label"] for r in report["images"]]
    assert report["attack_success_rate_vs_label"] == pytest.approx(np.mean(recorded))
    # The headline rate credits only the counted images (not lost in reconstruction).
    counted = [r for r in report["images"] if r["counted"]]
    assert report["counted"] == len(counted)
    assert report["attack_success_rate"] == pytest.approx(np.mean([r["success"] for r in counted]))
    assert all(r["success"] == (r["success_vs_label"] and r["counted"]) for r in report["images"])
    # The run judged each adversary inside its batch; here they are judged in one batch of a
    # different composition (and as k/255*2-1 rather than the engine's bit-different
    # k/127.5-1), so float differences may flip an image sitting right on the decision
    # boundary: allow at most one such image, never more.
    assert sum(a != b for a, b in zip(recorded, recomputed)) <= 1
    assert abs(np.mean(recomputed) - report["attack_success_rate_vs_label"]) <= 1 / len(recorded) + 1e-9
    return report


def assert_one_line_error(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], lines[0]


# --------------------------------------------------------------------- every method


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_report_agrees_with_saved_adversaries(faces, eyeglasses, tmp_path, method):
    out = tmp_path / "run"
    result = sia(EYEGLASSES, "--images", faces / "images", "--attrs-file", faces / "list_attr.txt",
                 "--out", out, "--method", method, *FAST)
    assert result.exit_code == 0, result.output
    report = assert_report_matches_files(out, eyeglasses)
    assert report["method"] == method
    assert len(report["images"]) == N_FACES and report["skipped"] == []
    assert [r["file"] for r in report["images"]] == sorted(p.name for p in (faces / "images").glob("*.png"))
    assert report["backbone"]["sha256"] and report["target"]["sha256"] == eyeglasses.sha256
    assert report["settings"]["settings"]["steps"] == 3
    assert math.isfinite(report["psnr"]) and -1 <= report["ssim"] <= 1
    record = report["images"][0]
    assert set(record) >= {"file", "attrs_start", "attrs_end", "label", "pred_clean", "pred_adv", "success"}
    assert len(record["attrs_start"]) == len(record["attrs_end"]) == len(ATTRIBUTES)
    if not METHODS[method].through_generator:
        # Pixel baselines are measured against the clean image: PSNR follows from the files.
        adversaries = reload_adversaries(adversary_files(out, report))
        clean = torch.stack([load_image(faces / "images" / r["file"], SIZE) for r in report["images"]]) * 2 - 1
        mse = ((adversaries - clean) / 2).pow(2).flatten(1).mean(dim=1)
        assert report["psnr"] == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), abs=1e-3)


def test_protected_attributes_stay_put_in_the_records(faces, tmp_path):
    out = tmp_path / "run"
    result = sia(EYEGLASSES, "--images", faces / "images", "--attrs-file", faces / "list_attr.txt", "--out", out,
                 "--protect", "Eyeglasses", "--protect", "Smiling,Male", "--method", "sia", "--step-size", "0.05",
                 *FAST)
    assert result.exit_code == 0, result.output
    report = report_of(out)
    assert report["protected"] == ["Eyeglasses", "Male", "Smiling"]  # in the backbone's order
    names = report["attributes"]
    moved = set()
    for record in report["images"]:
        for name, start, end in zip(names, record["attrs_start"], record["attrs_end"]):
            if start != end:
                moved.add(name)
    assert moved and not moved & {"Eyeglasses", "Male", "Smiling"}


# Shipped binary targets (more are being trained into examples/targets; each one present is run).
# The attribute judge (15 outputs) and the keypoint model are not binary classifiers.
SHIPPED_BINARY = sorted(p for p in TARGETS.glob("*.pt") if p.stem.endswith(("_confounded", "_control")))


@pytest.mark.parametrize("model", SHIPPED_BINARY, ids=lambda p: p.stem)
def test_shipped_targets_report_agrees_with_saved_adversaries(faces, tmp_path, model):
    out = tmp_path / "run"
    result = sia(model, "--images", faces / "images", "--attrs-file", faces / "list_attr.txt", "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    assert_report_matches_files(out, load_target(model, probe_size=SIZE))


def test_several_methods_write_one_folder_each_and_a_comparison(faces, eyeglasses, tmp_path):
    out = tmp_path / "run"
    result = sia(EYEGLASSES, "--images", faces / "images", "--attrs-file", faces / "list_attr.txt",
                 "--out", out, "--method", "sia,pgd", *FAST)
    assert result.exit_code == 0, result.output
    comparison = json.loads((out / "comparison.json").read_text())
    assert set(comparison["methods"]) == {"sia", "pgd"} and comparison["images"] == N_FACES
    for method in ("sia", "pgd"):
        report = assert_report_matches_files(out / method, eyeglasses)
        assert report["method"] == method
        for key in ("attack_success_rate", "psnr", "ssim"):
            assert comparison["methods"][method][key] == report[key]
    # The summary table names both methods with their success rate.
    table = [line for line in result.stdout.splitlines() if "%" in line]
    assert any("sia" in line for line in table) and any("pgd" in line for line in table)
    assert "ASR" in result.stdout


def test_a_method_named_twice_runs_once(faces, eyeglasses, tmp_path):
    out = tmp_path / "run"
    result = sia(EYEGLASSES, "--images", faces / "images", "--attrs-file", faces / "list_attr.txt",
                 "--out", out, "--method", "fgsm,fgsm", *FAST)
    assert result.exit_code == 0, result.output
    report = assert_report_matches_files(out, eyeglasses)
    assert len(report["images"]) == N_FACES  # one record per image, not one per mention
    assert not (out / "comparison.json").exists()


def test_sources_sharing_a_stem_keep_one_adversary_each(faces, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    sources = sorted((faces / "images").glob("*.png"))
    shutil.copy(sources[0], images / "face.png")
    with Image.open(sources[1]) as other:
        other.save(images / "face.bmp")  # same stem, different picture
    out = tmp_path / "run"
    result = sia(EYEGLASSES, "--images", images, "--out", out, "--method", "fgsm", *FAST)
    assert result.exit_code == 0, result.output
    assert len(report_of(out)["images"]) == 2
    written = sorted(p.name for p in (out / "adversaries").iterdir())
    assert written == ["face.bmp.png", "face.png.png"]  # the whole name where stems clash


# ------------------------------------------------------------------ finished runs


def test_finished_run_is_refused_without_force_and_redone_with_it(faces, tmp_path):
    out = tmp_path / "run"
    args = [EYEGLASSES, "--images", faces / "images", "--attrs-file", faces / "list_attr.txt", "--out", out,
            "--method", "fgsm", *FAST]
    assert sia(*args).exit_code == 0
    assert_one_line_error(sia(*args), "--force")
    assert sia(*args, "--force").exit_code == 0


def test_finished_comparison_run_is_refused_without_force(faces, tmp_path):
    # A run with several methods keeps its reports in sub-folders; it is finished all the same.
    out = tmp_path / "run"
    args = [EYEGLASSES, "--images", faces / "images", "--attrs-file", faces / "list_attr.txt", "--out", out,
            "--method", "fgsm,pgd", *FAST]
    assert sia(*args).exit_code == 0
    assert_one_line_error(sia(*args), "--force")
    assert sia(*args, "--force").exit_code == 0


def test_force_leaves_no_stale_adversary_from_the_previous_run(faces, eyeglasses, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(faces / "images", images)
    out = tmp_path / "run"
    args = [EYEGLASSES, "--images", images, "--attrs-file", faces / "list_attr.txt", "--out", out,
            "--method", "fgsm", *FAST]
    assert sia(*args).exit_code == 0
    (images / "000000.png").unlink()
    assert sia(*args, "--force").exit_code == 0
    report = assert_report_matches_files(out, eyeglasses)  # also: adversaries/ holds these records only
    assert len(report["images"]) == N_FACES - 1


# ----------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def wrong_shape_model(tmp_path_factory) -> Path:
    class ThreeByTwo(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)

        def forward(self, x):
            return self.conv(x).mean(dim=(2, 3)).view(-1, 2, 3)  # (B, 2, 3): no task has this shape

    path = tmp_path_factory.mktemp("models") / "wrong_shape.pt"
    torch.jit.save(torch.jit.script(ThreeByTwo().eval()), str(path))
    return path


@pytest.mark.parametrize("case, words", [
    ("not a model", ["not a TorchScript file"]),
    ("wrong output shape", ["(2, 2, 3)", "accepted shapes"]),
    ("eps abc", ["'abc'", "1.5/255"]),
    ("negative eps", ["--eps", "non-negative"]),
    ("nan eps", ["--eps", "finite"]),
    ("no method", ["--method names no method"]),
    ("zero batch size", ["--batch-size must be at least 1"]),
    ("negative seed", ["--seed must be non-negative"]),
    ("unknown method", ["unknown method 'cw'"]),
    ("unknown protect", ["--protect Wings"]),
    ("missing images", ["image folder not found"]),
    ("only unreadable images", ["no usable image", "unreadable"]),
    ("attrs file without a backbone attribute", ["Young"]),
])
def test_bad_input_exits_2_with_one_line(faces, wrong_shape_model, tmp_path, case, words):
    model, images, extra = EYEGLASSES, faces / "images", []
    if case == "not a model":
        model = tmp_path / "model.pt"
        model.write_text("this is not a model\n")
    elif case == "wrong output shape":
        model = wrong_shape_model
    elif case == "eps abc":
        extra = ["--eps", "abc"]
    elif case == "negative eps":
        extra = ["--eps", "-1.5/255"]
    elif case == "nan eps":
        extra = ["--eps", "nan"]
    elif case == "no method":
        extra = ["--method", ","]
    elif case == "zero batch size":
        extra = ["--batch-size", "0"]
    elif case == "negative seed":
        extra = ["--seed", "-1"]
    elif case == "unknown method":
        extra = ["--method", "sia,cw"]
    elif case == "unknown protect":
        extra = ["--protect", "Eyeglasses,Wings"]
    elif case == "missing images":
        images = tmp_path / "nowhere"
    elif case == "only unreadable images":
        images = tmp_path / "images"
        images.mkdir()
        (images / "a.png").write_text("not an image\n")
    elif case == "attrs file without a backbone attribute":
        extra = ["--attrs-file", write_attrs(tmp_path / "attrs.txt", faces, drop="Young")]
    result = sia(model, "--images", images, "--out", tmp_path / "run", *FAST, *extra)
    assert_one_line_error(result, *words)
    if case == "negative seed":  # refused before any work: nothing for a corrected rerun to trip on
        assert not (tmp_path / "run").exists()


def write_attrs(path: Path, faces: Path, extra: str | None = None, drop: str | None = None) -> Path:
    """Rewrite the faces' list_attr.txt with a leading extra column and/or one column dropped."""
    lines = (faces / "list_attr.txt").read_text().splitlines()
    names = lines[1].split()
    keep = [i for i, name in enumerate(names) if name != drop]
    head = [extra] if extra else []
    out = [lines[0], " ".join(head + [names[i] for i in keep])]
    for row in lines[2:]:
        fields = row.split()
        values = fields[1:]
        out.append(" ".join([fields[0]] + (["1"] if extra else []) + [values[i] for i in keep]))
    path.write_text("\n".join(out) + "\n")
    return path


# ----------------------------------------------------------------- awkward images


def test_unreadable_images_are_skipped_and_odd_ones_converted(faces, eyeglasses, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    sources = sorted((faces / "images").glob("*.png"))
    for source in sources[:2]:
        shutil.copy(source, images)
    with Image.open(sources[2]) as face:
        face.convert("L").save(images / "gray.png")
        face.convert("RGBA").save(images / "rgba.png")
        face.resize((50, 70)).save(images / "odd_size.png")
        face.resize((10, 10)).save(images / "tiny.png")
    (images / "text.png").write_text("not an image at all\n")
    data = sources[3].read_bytes()
    (images / "truncated.png").write_bytes(data[: len(data) // 2])
    (images / "README").write_text("not read: no image extension\n")
    out = tmp_path / "run"
    # No --attrs-file: the backbone's discriminator predicts the starting attributes.
    result = sia(EYEGLASSES, "--images", images, "--out", out, "--method", "pgd", *FAST)
    assert result.exit_code == 0, result.output
    report = assert_report_matches_files(out, eyeglasses)
    assert {s["file"] for s in report["skipped"]} == {"text.png", "truncated.png", "README"}
    assert any("README" in w and "not images" in w for w in report["warnings"])
    assert any(w.startswith("2 image(s) skipped: ") and "truncated.png" in w for w in report["warnings"])
    assert all(s["reason"] for s in report["skipped"])
    processed = {r["file"] for r in report["images"]}
    assert processed == {sources[0].name, sources[1].name, "gray.png", "rgba.png", "odd_size.png", "tiny.png"}
    # Used, but not without a word: 10 px drawn up to the backbone's 64 is mostly interpolation.
    assert {r["file"]: r.get("upscaled_from") for r in report["images"] if r.get("upscaled_from")} == {"tiny.png": 10}
    assert any(w.startswith("1 image(s) were upscaled more than 2x") and "tiny.png" in w for w in report["warnings"])
    assert report["attrs_source"] == "discriminator"
    assert "text.png" in result.stdout and "truncated.png" in result.stdout  # listed to the user too


def test_attrs_file_with_extra_columns_is_picked_by_name(faces, tmp_path):
    attrs = write_attrs(tmp_path / "attrs.txt", faces, extra="Wearing_Hat")
    out = tmp_path / "run"
    result = sia(EYEGLASSES, "--images", faces / "images", "--attrs-file", attrs, "--out", out,
                 "--method", "fgsm", *FAST)
    assert result.exit_code == 0, result.output
    report = report_of(out)
    assert report["attrs_source"] == "attrs_file"
    # Column by column the same starting vectors as the plain file: the extra column was not used.
    rows = {line.split()[0]: line.split()[1:] for line in (faces / "list_attr.txt").read_text().splitlines()[2:]}
    for record in report["images"]:
        assert record["attrs_start"] == [1.0 if v == "1" else 0.0 for v in rows[record["file"]]]


# ------------------------------------------------------------------------ keypoints

HEATMAP = 16
KEYPOINTS = 5


@pytest.fixture(scope="module")
def heatmap_model(tmp_path_factory) -> Path:
    class Heatmaps(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(8, KEYPOINTS, 3, padding=1)
            self.size = HEATMAP

        def forward(self, x):
            return F.adaptive_avg_pool2d(self.conv2(torch.relu(self.conv1(x))), self.size)

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "heatmaps.pt"
    yaml = f"task: keypoints\ninput_size: {SIZE}\nmean: 0.5\nstd: 0.5\n"
    torch.jit.save(torch.jit.script(Heatmaps().eval()), str(path), _extra_files={"sia.yaml": yaml})
    return path


def keypoint_models():
    shipped = TARGETS / "landmarks.pt"
    return ["tiny"] + ([shipped] if shipped.is_file() else [])


@pytest.mark.parametrize("which", keypoint_models(), ids=lambda m: getattr(m, "stem", m))
def test_keypoint_run_records_coordinates_and_success_by_nme(faces, heatmap_model, tmp_path, which):
    model = heatmap_model if which == "tiny" else which
    target = load_target(model, probe_size=SIZE)
    assert target.kind == "keypoints"
    out = tmp_path / "run"
    args = [model, "--images", faces / "images", "--attrs-file", faces / "list_attr.txt", "--out", out, *FAST]
    result = sia(*args)
    assert result.exit_code == 0, result.output
    report = report_of(out)
    label = torch.tensor([r["label"] for r in report["images"]])
    pred_adv = torch.tensor([r["pred_adv"] for r in report["images"]])
    assert label.shape == pred_adv.shape == (N_FACES, target.num_outputs, 2)  # (x, y) per keypoint
    assert torch.tensor([r["pred_clean"] for r in report["images"]]).shape == label.shape

    def nme(predicted):  # mean point error over the eye distance, else over the heatmap diagonal
        if target.eye_indices is not None:
            left, right = target.eye_indices
            scale = (label[:, left] - label[:, right]).norm(dim=-1).clamp_min(1.0)
        else:
            scale = math.hypot(*target.heatmap_size)
        return (predicted - label).norm(dim=-1).mean(dim=-1) / scale

    errors = nme(pred_adv)
    assert [r["success_vs_label"] for r in report["images"]] == (errors > 0.1).tolist()  # the default threshold
    # Rerun (same seed, same adversaries) with a threshold between the errors seen, so that
    # success is a mix and the recorded flags must follow --nme-threshold.
    levels = errors.unique()
    threshold = float(levels[: len(levels) // 2 + 1][-2:].mean()) if len(levels) > 1 else float(levels[0])
    result = sia(*args, "--force", "--nme-threshold", threshold)
    assert result.exit_code == 0, result.output
    report = report_of(out)
    assert torch.equal(torch.tensor([r["pred_adv"] for r in report["images"]]), pred_adv)
    recorded = [r["success_vs_label"] for r in report["images"]]
    assert recorded == (errors > threshold).tolist()
    assert report["attack_success_rate_vs_label"] == pytest.approx(np.mean(recorded))
    counted = [r["success"] for r in report["images"] if r["counted"]]  # lost in reconstruction: left out
    assert report["attack_success_rate"] == pytest.approx(np.mean(counted) if counted else 0.0)
    # The saved PNGs give the same success (at most one image may differ: batch float noise).
    images = reload_adversaries(adversary_files(out, report))
    with torch.no_grad():
        reloaded = target.predict(target(images))
    assert sum(a != b for a, b in zip(recorded, (nme(reloaded) > threshold).tolist())) <= 1
