import base64
import html
import json
import math
import os
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from sia_cli.errors import SiaError
from sia_cli.reports import figures as R
from sia_cli.reports import html as H
from sia_cli.runs import files as F

# ---------------------------------------------------------------- atomic writes


def test_write_json_atomic_round_trips_and_leaves_no_temp_file(tmp_path):
    data = {"sdar": 0.12, "ranking": ["Bangs", "Smiling"], "nested": {"a": [1, 2, 3]}}
    F.write_json_atomic(tmp_path / "report.json", data)
    assert os.listdir(tmp_path) == ["report.json"]
    assert json.loads((tmp_path / "report.json").read_text()) == data


def test_write_json_atomic_makes_numpy_and_non_finite_values_strict_json(tmp_path):
    data = {"s": np.float32(0.5), "n": np.int64(3), "v": np.array([1.0, 2.0]), "bad": [math.nan, math.inf]}
    F.write_json_atomic(tmp_path / "r.json", data)
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"s": 0.5, "n": 3, "v": [1.0, 2.0], "bad": [None, None]}


def test_atomic_file_gets_ordinary_permissions(tmp_path):
    F.write_json_atomic(tmp_path / "r.json", {})
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_crash_during_rename_keeps_previous_report(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    F.write_json_atomic(target, {"version": "old"})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(F.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        F.write_json_atomic(target, {"version": "new"})
    assert json.loads(target.read_text()) == {"version": "old"}
    assert os.listdir(tmp_path) == ["report.json"]


def test_crash_during_serialisation_keeps_previous_report(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    F.write_json_atomic(target, {"version": "old"})
    monkeypatch.setattr(F.json, "dumps", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        F.write_json_atomic(target, {"version": "new"})
    assert json.loads(target.read_text()) == {"version": "old"}
    assert os.listdir(tmp_path) == ["report.json"]


def test_crash_during_write_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "grid.png"
    F.write_bytes_atomic(target, b"old bytes")
    monkeypatch.setattr(F.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("io error")))
    with pytest.raises(OSError):
        F.write_bytes_atomic(target, b"new bytes")
    assert target.read_bytes() == b"old bytes"
    assert os.listdir(tmp_path) == ["grid.png"]


def test_save_png_atomic(tmp_path):
    R.save_png_atomic(tmp_path / "x.png", Image.new("RGB", (5, 4), (1, 2, 3)))
    with Image.open(tmp_path / "x.png") as image:
        assert image.format == "PNG" and image.size == (5, 4) and image.getpixel((0, 0)) == (1, 2, 3)


# ---------------------------------------------------------------- sensitivity histogram

VALUES = {"Bangs": 0.42, "Smiling": 0.18, "Pale_Skin": 0.25, "Mustache": 0.15}


def test_sensitivity_png_is_a_real_non_blank_png(tmp_path):
    path = tmp_path / "sensitivity.png"
    R.sensitivity_png(path, VALUES, title="share of total")
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert 800 <= image.width <= 1200 and 400 <= image.height <= 700
        rgb = np.asarray(image.convert("RGB"))
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 50  # text anti-aliasing, bars, axes
    assert (rgb != 255).any(axis=2).mean() > 0.05  # a good part of it is not background


def test_sensitivity_png_with_intervals(tmp_path):
    intervals = {name: {"low": v - 0.05, "high": v + 0.05} for name, v in VALUES.items()}
    intervals["Bangs"] = {"low": 0.5, "high": 0.6}  # an interval not around the value must not crash
    R.sensitivity_png(tmp_path / "s.png", VALUES, intervals)
    with Image.open(tmp_path / "s.png") as image:
        assert image.format == "PNG"


def test_sensitivity_png_grows_with_many_attributes(tmp_path):
    many = {f"attribute_{i:02d}": float(i) for i in range(40)}
    R.sensitivity_png(tmp_path / "s.png", many)
    with Image.open(tmp_path / "s.png") as image:
        assert image.height > 1000


def test_sensitivity_png_paints_red_only_an_attribute_that_stands_out(tmp_path):
    """The red bar is a finding: without a leader (overlapping intervals, too few images) no
    bar is red, so the picture cannot claim what the headline does not."""
    def red_pixels(**kwargs) -> int:
        R.sensitivity_png(tmp_path / "s.png", VALUES, **kwargs)
        with Image.open(tmp_path / "s.png") as image:
            rgb = np.asarray(image.convert("RGB")).astype(int)
        return int((np.abs(rgb - (0xc0, 0x39, 0x2b)).sum(axis=2) < 30).sum())

    assert red_pixels() == 0
    assert red_pixels(leader="Bangs") > 1000


def test_sensitivity_png_rejects_empty_values(tmp_path):
    with pytest.raises(SiaError):
        R.sensitivity_png(tmp_path / "s.png", {})


# ---------------------------------------------------------------- example grid

def grid_rows(count, size=64):
    rows = []
    for i in range(count):
        original = np.zeros((size, size, 3), np.uint8)
        original[..., 0] = 255  # pure red
        rows.append({"file": f"face_{i}.png", "original": original,
                     "reconstruction": np.full((size, size, 3), 128, np.uint8),
                     "adversary": np.full((size, size, 3), (0, 0, 255), np.uint8),
                     "caption": "pred 0.93 -> 0.12, success"})
    return rows


def grid_size(tmp_path, rows):
    R.grid_png(tmp_path / "grid.png", rows)
    with Image.open(tmp_path / "grid.png") as image:
        return image.size


def test_grid_height_grows_by_one_row_per_image(tmp_path):
    heights = [grid_size(tmp_path, grid_rows(n))[1] for n in (1, 2, 3)]
    row_height = heights[1] - heights[0]
    assert heights[2] - heights[1] == row_height
    assert row_height >= 128 + 20  # the upscaled image plus its caption


def test_grid_upscales_small_images_and_keeps_their_pixels(tmp_path):
    width, _ = grid_size(tmp_path, grid_rows(2))
    assert width >= 3 * 128
    rgb = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))
    red = np.all(rgb == (255, 0, 0), axis=2).sum()
    blue = np.all(rgb == (0, 0, 255), axis=2).sum()
    assert red >= 2 * 128 * 128 and blue >= 2 * 128 * 128


def test_grid_accepts_missing_reconstruction_and_float_images(tmp_path):
    rows = grid_rows(1)
    rows[0]["reconstruction"] = None
    rows[0]["adversary"] = np.ones((64, 64, 3), np.float32) * 0.5
    R.grid_png(tmp_path / "grid.png", rows)
    rgb = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))
    assert np.all(rgb == (128, 128, 128), axis=2).sum() >= 128 * 128


def test_grid_rejects_no_rows(tmp_path):
    with pytest.raises(SiaError):
        R.grid_png(tmp_path / "grid.png", [])


# ---------------------------------------------------------------- HTML report

class TagCollector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.sources, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.sources += [value for name, value in attrs if name in ("src", "href")]

    def handle_data(self, data):
        self.text.append(data)


def sample_report(**changes):
    report = {
        "version": "0.1.0", "command": "sia diagnose model.pt --images faces/",
        "settings": {"headline": "ablation"},
        "backbone": {"name": "attgan-128", "path": "/w/attgan.pt", "sha256": "a" * 64},
        "target": {"path": "/m/glasses.pt", "sha256": "b" * 64, "kind": "classifier"},
        "attributes": ["Bangs", "Smiling", "Eyeglasses"],
        "sensitivity": {"Bangs": 0.2, "Smiling": 0.3},
        "sensitivity_normalized": {"Bangs": 0.4, "Smiling": 0.6},
        "sensitivity_ablation": {"Bangs": 0.31, "Smiling": 0.69},
        "sensitivity_ablation_normalized": {"Bangs": 0.31, "Smiling": 0.69},
        "ranking": ["Smiling", "Bangs"], "sdar": 0.05, "attack_success_rate": 0.682,
        "psnr": 31.5, "ssim": 0.93, "images": 10,
        "skipped": [{"file": "<script>.png", "reason": "cannot identify image file"}],
        "timing": {"attack": 12.3},
        "intervals": {"sensitivity": {"Bangs": {"low": 0.1, "high": 0.3}}, "sdar": {"low": 0.04, "high": 0.06}},
        "stands_out": "Smiling", "backbone_fit": {"ok": True, "reasons": [], "lost_in_reconstruction": 0.0},
        "blind_spots": [], "warnings": [],
    }
    report.update(changes)
    return report


def render(tmp_path, report, with_grid=True):
    R.sensitivity_png(tmp_path / "sensitivity.png", report["sensitivity_ablation_normalized"])
    grid = None
    if with_grid:
        R.grid_png(tmp_path / "grid.png", grid_rows(1))
        grid = tmp_path / "grid.png"
    H.report_html(tmp_path / "report.html", report, tmp_path / "sensitivity.png", grid)
    return (tmp_path / "report.html").read_text(encoding="utf-8")


def test_report_html_is_self_contained(tmp_path):
    page = render(tmp_path, sample_report())
    parser = TagCollector()
    parser.feed(page)
    parser.close()
    assert "html" in parser.tags and "table" in parser.tags
    assert parser.sources and all(src.startswith("data:image/png;base64,") for src in parser.sources)
    assert "http://" not in page and "https://" not in page and 'src="http' not in page
    assert "<link" not in page and "<script" not in page
    for png in ("sensitivity.png", "grid.png"):
        assert base64.b64encode((tmp_path / png).read_bytes()).decode() in page


def test_report_html_content(tmp_path):
    page = render(tmp_path, sample_report())
    assert "most sensitive to Smiling: 0.69 of total" in page
    assert "Bangs: 0.31 of total" in page
    assert "ablation" in page
    assert "68.2 %" in page
    assert "0.0500 [0.0400, 0.0600]" in page  # SDAR with its interval
    assert "[0.1, 0.3]" in page  # a per-attribute interval, with significant digits
    assert "31.50 dB" in page and "0.930" in page
    assert "aaaaaaaaaaaa" in page and "a" * 13 not in page  # short sha256
    assert "glasses.pt" in page and "attgan-128" in page
    assert "cannot identify image file" in page
    assert "Incomplete" not in page


def test_report_html_escapes_report_strings(tmp_path):
    page = render(tmp_path, sample_report(sensitivity={"<b>x</b>": 0.5, "Bangs": 0.1}))
    assert "&lt;script&gt;.png" in page
    assert "<script>" not in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page


def test_report_html_incomplete_banner_and_no_grid(tmp_path):
    page = render(tmp_path, sample_report(complete=False), with_grid=False)
    assert "Incomplete run" in page
    assert page.count("data:image/png;base64,") == 1


def test_report_html_falls_back_to_attribute_shift_without_ablation(tmp_path):
    report = sample_report(sensitivity_ablation=None, sensitivity_ablation_normalized=None,
                           settings={"headline": "ablation"})
    R.sensitivity_png(tmp_path / "s.png", report["sensitivity_normalized"])
    H.report_html(tmp_path / "r.html", report, tmp_path / "s.png", None)
    page = (tmp_path / "r.html").read_text()
    assert "most sensitive to Smiling: 0.60 of total" in page
    assert "headline measure: attribute_shift" in page


def test_report_html_has_a_column_per_measure_the_report_holds(tmp_path):
    multi = render(tmp_path, sample_report())
    headers = ("attribute shift (Eq. 2) raw", "ablation raw", "single attribute raw")
    assert headers[0] in multi and headers[1] in multi and headers[2] not in multi
    assert multi.index(headers[0]) < multi.index(headers[1])  # Eq. 2 first, as the table lists them
    assert "<th class='headline'>ablation raw</th>" in multi
    report = sample_report(
        settings={"headline": "single"}, sensitivity_ablation=None, sensitivity_ablation_normalized=None,
        sensitivity_single={"Bangs": 0.5, "Smiling": 0.25}, sensitivity_single_normalized={"Bangs": 0.67, "Smiling": 0.33},
    )
    H.report_html(tmp_path / "single.html", report, tmp_path / "sensitivity.png", None)
    single = (tmp_path / "single.html").read_text(encoding="utf-8")
    assert headers[1] not in single and "<th class='headline'>single attribute raw</th>" in single
    assert "most sensitive to Smiling: 0.33 of total (single;" in single


def test_report_html_names_no_winner_when_the_intervals_overlap(tmp_path):
    page = render(tmp_path, sample_report(stands_out=None))
    assert "most sensitive to" not in page
    assert "No single attribute stands out" in page and "Smiling 0.69, Bangs 0.31" in page


def test_report_html_warns_where_the_finding_is_read(tmp_path):
    warning = "backbone does not fit these images: 0% of the images look like the backbone's training data"
    report = sample_report(
        backbone_fit={"ok": False, "reasons": ["x"], "lost_in_reconstruction": 0.75, "in_domain": 0.0},
        warnings=[warning, "blind spots: the backbone edits Bangs in fewer than 50% of faces"],
        blind_spots=["Bangs"],
        backbone={"name": "attgan-128", "sha256": "a" * 64, "edit_success": {"Bangs": 0.2, "Smiling": 0.9}},
    )
    page = render(tmp_path, report)
    banner = page.index("Do not trust this diagnosis")
    assert banner < page.index("Which attributes the model is sensitive to")  # above the finding
    assert html.escape(warning, quote=True) in page
    assert "does not fit these images well enough" in page  # in the headline sentence too
    assert "75.0 %" in page and "NOT ok" in page  # lost in reconstruction, fit, in the summary
    assert "0.20 (blind spot)" in page and "0.90<" in page  # edit success beside each attribute
    quiet = render(tmp_path, sample_report())
    assert "Do not trust" not in quiet and "Read these findings with care" not in quiet


def test_report_html_counts_failed_records(tmp_path):
    images = [{"file": "a.png"}, {"file": "b.png", "error": "NaN loss"}]
    page = render(tmp_path, sample_report(images=images))
    assert "2 (1 failed, left out)" in page


# ---------------------------------------------------------------- image quality

def test_identical_images_give_psnr_cap_and_ssim_one():
    images = np.random.default_rng(0).uniform(0, 1, (2, 3, 32, 32))
    psnr, ssim = R.image_quality(images, images.copy())
    assert psnr == [R.PSNR_CAP_DB] * 2
    assert ssim == pytest.approx([1.0, 1.0])
    json.dumps(psnr, allow_nan=False)


def test_noise_lowers_psnr_and_ssim_and_psnr_matches_formula():
    rng = np.random.default_rng(1)
    clean = rng.uniform(0.2, 0.8, (3, 3, 32, 32))
    slightly = np.clip(clean + rng.normal(0, 0.01, clean.shape), 0, 1)
    heavily = np.clip(clean + rng.normal(0, 0.1, clean.shape), 0, 1)
    psnr_small, ssim_small = R.image_quality(slightly, clean)
    psnr_large, ssim_large = R.image_quality(heavily, clean)
    for i in range(3):
        mse = np.mean((heavily[i] - clean[i]) ** 2)
        assert psnr_large[i] == pytest.approx(10 * np.log10(1.0 / mse))
        assert psnr_large[i] < psnr_small[i] < R.PSNR_CAP_DB
        assert ssim_large[i] < ssim_small[i] < 1.0


def test_image_quality_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    clean = torch.rand(2, 3, 16, 16)
    psnr, ssim = R.image_quality((clean + 0.05).clamp(0, 1), clean)
    assert len(psnr) == len(ssim) == 2 and all(20 < p < 40 for p in psnr)


def test_image_quality_on_tiny_images_and_bad_shapes():
    _, ssim = R.image_quality(np.zeros((1, 3, 5, 5)), np.zeros((1, 3, 5, 5)))
    assert ssim == pytest.approx([1.0])
    with pytest.raises(SiaError):
        R.image_quality(np.zeros((1, 3, 8, 8)), np.zeros((1, 3, 8, 9)))


def test_to_uint8():
    image = np.zeros((3, 2, 4))
    image[0] = 1.0
    image[1, 0, 0] = 0.5
    image[2] = 2.0  # out of range: clipped
    pixels = R.to_uint8(image)
    assert pixels.shape == (2, 4, 3) and pixels.dtype == np.uint8
    assert tuple(pixels[0, 0]) == (255, 128, 255)
    assert tuple(pixels[1, 1]) == (255, 0, 255)
    assert R.to_uint8(np.full((1, 2, 2), -1.0)).shape == (2, 2, 3)
    with pytest.raises(SiaError):
        R.to_uint8(np.zeros((2, 2)))


def test_report_html_shows_groups_and_flip_rate(tmp_path):
    groups = {"Male=1": {"sensitivity_normalized": {"Bangs": 0.7, "Smiling": 0.3}, "images": 6, "sdar": 0.02},
              "Male=0": {"sensitivity_normalized": {"Bangs": 0.2, "Smiling": 0.8}, "images": 4, "sdar": 0.03}}
    page = render(tmp_path, sample_report(groups=groups, flip_rate={"Bangs": 0.25, "Smiling": 0.75}))
    assert "Male=1" in page and "Bangs 0.70, Smiling 0.30" in page and "Smiling 0.80, Bangs 0.20" in page
    assert "flip rate" in page and "0.75" in page


@pytest.mark.parametrize("largest, floor, expected", [
    (0.172, 0.0917, "No edit moves the model clearly more than the reconstruction alone does: the edit that moves "
                    "it most changes its output by 0.172 (probability), against 0.0917"),
    (0.0063, 0.012, "The model hardly moves under any edit: the edit that moves it most changes its output by "
                    "0.0063 (probability), less than the reconstruction alone does (0.012)")])
def test_a_withheld_ranking_says_whether_the_model_hardly_moves_or_the_images_cannot_tell(largest, floor, expected):
    """An edit above the floor but within chance is a 'cannot tell', never 'hardly moves': the
    mustache control on 24 faces moves 0.172 under its largest edit (true 0.228)."""
    report = sample_report(effect={"measure": "flip", "unit": "probability", "total": 1.0, "largest": largest,
                                   "floor": floor, "moves": False}, stands_out=None)
    text = H.headline_sentence(report)
    assert text.startswith(expected) and "no attribute is ranked" in text
    assert ("hardly moves" in text) is (largest < floor)
