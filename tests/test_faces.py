"""The synthetic face generator and `sia synth`: determinism, file layout, visible attributes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sia_cli.cli import app
from sia_cli.errors import SiaError
from sia_cli.inputs.faces import (
    ATTRIBUTES,
    HAIR_COLOURS,
    parse_correlation,
    render_face,
    resolve_conflicts,
    sample_attributes,
)
from sia_cli.inputs.synth import make_dataset

LANDMARK_HEADER = ("lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y "
                   "leftmouth_x leftmouth_y rightmouth_x rightmouth_y").split()


def read_attr_list(path: Path) -> tuple[list[str], np.ndarray]:
    lines = path.read_text().splitlines()
    count, names = int(lines[0]), lines[1].split()
    assert names == list(ATTRIBUTES)
    rows = [line.split() for line in lines[2:]]
    assert len(rows) == count
    files = [r[0] for r in rows]
    values = np.array([[int(v) for v in r[1:]] for r in rows])
    assert values.shape == (count, len(ATTRIBUTES))
    assert set(np.unique(values)) <= {-1, 1}
    return files, values


def read_landmark_list(path: Path) -> tuple[list[str], np.ndarray]:
    lines = path.read_text().splitlines()
    count = int(lines[0])
    assert lines[1].split() == LANDMARK_HEADER
    rows = [line.split() for line in lines[2:]]
    assert len(rows) == count
    return [r[0] for r in rows], np.array([[int(v) for v in r[1:]] for r in rows])


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- dataset files


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        make_dataset(root / name, n=12, seed=seed, size=32)
    return root


def test_same_seed_gives_identical_files_and_other_seed_differs(datasets):
    a, b, c = (folder_bytes(datasets / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys()
    differing = [k for k in a if k.endswith(".png") and a[k] != c[k]]
    assert len(differing) == 12
    assert a["list_attr.txt"] != c["list_attr.txt"]


def test_lists_follow_celeba_layout(datasets):
    out = datasets / "a"
    files, values = read_attr_list(out / "list_attr.txt")
    assert files == [f"{i:06d}.png" for i in range(12)]
    assert sorted(p.name for p in (out / "images").iterdir()) == files
    assert re.match(r"^000000\.png(  1| -1){15}$", (out / "list_attr.txt").read_text().splitlines()[2])
    lm_files, points = read_landmark_list(out / "list_landmarks.txt")
    assert lm_files == files
    assert points.shape == (12, 10)
    assert points.min() >= 0 and points.max() < 32
    left_eye_x, right_eye_x, mouth_left_x, mouth_right_x = points[:, 0], points[:, 2], points[:, 6], points[:, 8]
    assert (left_eye_x < right_eye_x).all() and (mouth_left_x < mouth_right_x).all()
    assert (points[:, 5] > points[:, 1]).all()  # nose below the left eye
    with Image.open(out / "images" / "000000.png") as img:
        assert img.size == (32, 32) and img.mode == "RGB"


def test_rerun_into_previous_output_replaces_it(tmp_path):
    make_dataset(tmp_path / "d", n=5, seed=0, size=16)
    make_dataset(tmp_path / "d", n=3, seed=0, size=16)
    assert sorted(p.name for p in (tmp_path / "d" / "images").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert read_attr_list(tmp_path / "d" / "list_attr.txt")[1].shape == (3, 15)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=0), "--n"),
    (dict(size=8), "--size"),
    (dict(size=2048), "--size"),
    (dict(seed=-1), "--seed"),
    (dict(correlations=[("Eyeglasses", "Bangs", 1.5)]), "within [0, 1]"),
    (dict(correlations=[("Eyeglass", "Bangs", 0.5)]), "Wearing_Lipstick"),
])
def test_bad_arguments_are_user_errors(tmp_path, kwargs, message):
    args = dict(n=2, seed=0, size=16) | kwargs
    with pytest.raises(SiaError, match=re.escape(message)):
        make_dataset(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


def test_refuses_foreign_non_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SiaError, match="not empty"):
        make_dataset(tmp_path, n=2, seed=0, size=16)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# ----------------------------------------------------------------------------- labels


def test_correlation_parsing():
    assert parse_correlation("Eyeglasses:Bangs:0.99") == ("Eyeglasses", "Bangs", 0.99)
    for bad in ("Eyeglasses:Bangs", "Eyeglasses:Bangs:high", "Eyeglasses:Nope:0.5", "Smiling:Smiling:0.5"):
        with pytest.raises(SiaError):
            parse_correlation(bad)


def test_conflict_rules():
    both = resolve_conflicts({"Bald": True, "Bangs": True, "Blond_Hair": True, "Black_Hair": True})
    assert both["Bald"] and not both["Bangs"]
    assert both["Black_Hair"] and not both["Blond_Hair"]
    kept = resolve_conflicts({"Bald": True, "Bangs": True, "Blond_Hair": True, "Black_Hair": True}, keep="Bangs")
    assert kept["Bangs"] and not kept["Bald"]
    for seed in range(300):
        attrs = sample_attributes(np.random.default_rng(seed), [("Eyeglasses", "Bangs", 0.9)])
        assert sum(attrs[c] for c in HAIR_COLOURS) <= 1
        assert not (attrs["Bald"] and attrs["Bangs"])


def test_correlate_option_couples_labels(tmp_path):
    result = CliRunner().invoke(app, ["synth", str(tmp_path / "corr"), "--n", "400", "--size", "16",
                                      "--correlate", "Eyeglasses:Bangs:0.99", "--no-progress"])
    assert result.exit_code == 0, result.output
    _, values = read_attr_list(tmp_path / "corr" / "list_attr.txt")
    glasses, bangs = values[:, ATTRIBUTES.index("Eyeglasses")], values[:, ATTRIBUTES.index("Bangs")]
    assert (glasses == bangs).mean() >= 0.97
    assert "Eyeglasses -> Bangs" in result.stdout and "agreement" in result.stdout

    stats = make_dataset(tmp_path / "free", n=400, seed=0, size=16, correlations=[("Eyeglasses", "Bangs", 0.0)])
    assert 0.35 <= stats["correlations"][0]["agreement"] <= 0.7
    assert 0.25 <= stats["positive_share"]["Eyeglasses"] <= 0.45


# ----------------------------------------------------------------------------- rendering


def flipped(attr: str, seed: int) -> tuple[dict, dict]:
    """Two label vectors differing in `attr` only, both free of conflicts."""
    base = {name: False for name in ATTRIBUTES} | {"Brown_Hair": True, "No_Beard": True, "Young": True}
    on, off = base | {attr: True}, base | {attr: False}
    if attr in HAIR_COLOURS:  # compare one colour against grey/red hair
        on = on | {c: c == attr for c in HAIR_COLOURS}
    if attr == "Bangs":
        on["Bald"] = off["Bald"] = False
    assert resolve_conflicts(on) == on and resolve_conflicts(off) == off
    return on, off


def render_pair(attr: str, seed: int, size: int = 64):
    on, off = flipped(attr, seed)
    img_on, pts = render_face(on, np.random.default_rng(seed), size)
    img_off, _ = render_face(off, np.random.default_rng(seed), size)
    diff = np.abs(np.asarray(img_on, float) - np.asarray(img_off, float)).mean(axis=-1)
    return diff, pts


@pytest.mark.parametrize("attr", ATTRIBUTES)
def test_each_attribute_is_visible(attr):
    for seed in (1, 2):
        diff, _ = render_pair(attr, seed)
        assert diff.mean() > 0.1, f"{attr} barely changes the image"
        assert (diff > 30).sum() >= 8, f"{attr} changes too few pixels clearly"


def test_same_rng_without_flip_is_identical():
    attrs = flipped("Smiling", 0)[0]
    first, _ = render_face(attrs, np.random.default_rng(9), 48)
    second, _ = render_face(attrs, np.random.default_rng(9), 48)
    assert first.tobytes() == second.tobytes()


def share_near(diff: np.ndarray, points: np.ndarray, radius: float) -> float:
    yy, xx = np.mgrid[: diff.shape[0], : diff.shape[1]]
    near = np.zeros(diff.shape, bool)
    for x, y in points:
        near |= (xx - x) ** 2 + (yy - y) ** 2 <= radius ** 2
    return diff[near].sum() / diff.sum()


@pytest.mark.parametrize("attr, landmark_rows", [
    ("Eyeglasses", [0, 1]), ("Bushy_Eyebrows", [0, 1]),
    ("Wearing_Lipstick", [3, 4]), ("Smiling", [3, 4]), ("Mouth_Slightly_Open", [3, 4]),
])
def test_change_is_local_to_the_feature(attr, landmark_rows):
    for seed in (4, 5, 6):
        diff, pts = render_pair(attr, seed)
        assert share_near(diff, pts[landmark_rows], radius=8) > 0.85


@pytest.mark.parametrize("size", [32, 64, 256])
def test_landmarks_land_on_the_face(size):
    attrs = flipped("Pale_Skin", 0)[0]  # pale face on a random background: eyes are dark on light
    img, pts = render_face(attrs, np.random.default_rng(8), size)
    assert img.size == (size, size) and pts.shape == (5, 2)
    assert ((pts > 0) & (pts < size - 1)).all()
    grey = np.asarray(img.convert("L"), float)
    eye_darkest = [grey[int(y) - 1: int(y) + 2, int(x) - 1: int(x) + 2].min() for x, y in pts[:2]]
    assert max(eye_darkest) < 110  # the iris/pupil sits under the eye landmark


def best_single_pixel_accuracy(pixels: np.ndarray, labels: np.ndarray) -> float:
    """Best accuracy of any rule `pixel value > t` (or `<`) over all pixels and thresholds."""
    order = np.argsort(pixels, axis=0, kind="stable")
    positives_below = np.cumsum(labels[order], axis=0)
    below = np.arange(1, len(labels) + 1)[:, None]
    accuracy = ((below - positives_below) + (labels.sum() - positives_below)) / len(labels)
    return float(np.maximum(accuracy, 1 - accuracy).max())


def test_no_single_pixel_separates_an_attribute():
    rows, labels = [], []
    for i in range(400):
        attrs = sample_attributes(np.random.default_rng([11, i, 0]))
        img, _ = render_face(attrs, np.random.default_rng([11, i, 1]), 32)
        rows.append(np.asarray(img, np.float32).reshape(-1))
        labels.append([attrs[name] for name in ATTRIBUTES])
    pixels, labels = np.stack(rows), np.array(labels, dtype=np.int64)
    for name in ("Eyeglasses", "Smiling", "Male", "Bangs", "Wearing_Lipstick", "Mustache"):
        assert best_single_pixel_accuracy(pixels, labels[:, ATTRIBUTES.index(name)]) < 0.95, name


# ----------------------------------------------------------------------------- command line


def test_cli_writes_dataset_and_prints_statistics(tmp_path):
    result = CliRunner().invoke(app, ["synth", str(tmp_path / "out"), "--n", "6", "--size", "32", "--seed", "2",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "out" / "images").glob("*.png"))) == 6
    for name in ATTRIBUTES:
        assert name in result.stdout
    assert "positive share" in result.stdout


@pytest.mark.parametrize("spec, message", [
    ("Eyeglasses-Bangs-0.9", "malformed correlation"),
    ("Eyeglasses:Bangs:lots", "not a probability"),
    ("Sunglasses:Bangs:0.9", "unknown attribute 'Sunglasses'"),
    ("Smiling:Bangs:1.5", "within [0, 1]"),
])
def test_cli_rejects_bad_correlation_in_one_line(tmp_path, spec, message):
    result = CliRunner().invoke(app, ["synth", str(tmp_path / "out"), "--n", "2", "--correlate", spec])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_cli_help_shows_defaults():
    result = CliRunner().invoke(app, ["synth", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for default in ("[default: 1000]", "[default: 0]", "[default: 64]", "--correlate", "--no-progress"):
        assert default in text, default
