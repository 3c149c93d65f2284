"""`sia augment` end to end on a few synthetic faces, plus the engine's start-point helpers.

The runs are kept tiny (4 faces, 3 steps). Attribute step 0.2 lets the attack move an
attribute across 0.5 within those 3 steps, so list_attr.txt really records edits and the
protection test can tell a protected attribute from one that moved.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

import sia_cli.jobs.augment as engine
from sia_cli.cli import app
from sia_cli.engine.attack import AttackSettings, attribute_radius, shifted_start
from sia_cli.inputs.images import load_image, read_attributes
from sia_cli.inputs.synth import make_dataset
from sia_cli.targets import load_target

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit deprecation notices

REPO = Path(__file__).resolve().parents[1]
EYEGLASSES = REPO / "examples" / "targets" / "eyeglasses_confounded.pt"
ATTRIBUTES = yaml.safe_load((REPO / "sia_cli" / "backbone" / "weights.yaml").read_text())["synth-faces-64"]["attributes"]
SIZE = 64
FAST = ["--steps", "3", "--step-size", "0.2", "--batch-size", "3", "--no-progress"]


def sia(*args) -> object:
    return CliRunner().invoke(app, ["augment", *map(str, args)], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    """4 faces, one broken image and one file that is not an image."""
    root = tmp_path_factory.mktemp("faces")
    make_dataset(root, 4, seed=3)
    (root / "images" / "broken.png").write_bytes(b"not a png")
    (root / "images" / "notes.txt").write_text("not read: no image extension\n")
    return root


@pytest.fixture(scope="module")
def eyeglasses():
    return load_target(EYEGLASSES, probe_size=SIZE)


@pytest.fixture(scope="module")
def clean_labels(faces, eyeglasses) -> dict[str, int]:
    """The target's own prediction on each good source: the label augment must preserve."""
    files = sorted((faces / "images").glob("0*.png"))
    with torch.no_grad():
        out = eyeglasses(torch.stack([load_image(f, SIZE) for f in files]) * 2 - 1)
    return {f.name: int(v) for f, v in zip(files, eyeglasses.reference(out).tolist())}


def run_into(out: Path, faces: Path, *extra) -> object:
    return sia(EYEGLASSES, "--images", faces / "images", "--attrs-file", faces / "list_attr.txt",
               "--out", out, *FAST, *extra)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, faces):
    out = tmp_path_factory.mktemp("default") / "aug"
    return run_into(out, faces), out


@pytest.fixture(scope="module")
def cycled_run(tmp_path_factory, faces):
    out = tmp_path_factory.mktemp("cycled") / "aug"
    return run_into(out, faces, "--n", 6), out


def label_rows(out: Path) -> list[dict]:
    with open(out / "labels.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def image_rows(out: Path) -> list[dict]:
    """augment.json's row of every written image."""
    return json.loads((out / "augment.json").read_text())["images"]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every file's bytes, inode and mtime: equal snapshots mean nothing was rewritten."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- output layout and labels

def test_writes_images_list_attr_and_labels(default_run, clean_labels):
    result, out = default_run
    assert result.exit_code == 0, result.output
    names = [f"{i:06d}.png" for i in range(4)]
    assert sorted(p.name for p in (out / "images").iterdir()) == names
    for name in names:
        with Image.open(out / "images" / name) as image:
            assert image.mode == "RGB" and image.size == (SIZE, SIZE)

    lines = (out / "list_attr.txt").read_text().splitlines()
    assert lines[0] == "4" and lines[1].split() == ATTRIBUTES
    assert [line.split()[0] for line in lines[2:]] == names
    assert {v for line in lines[2:] for v in line.split()[1:]} <= {"-1", "1"}
    table = read_attributes(out / "list_attr.txt")
    assert table.names == ATTRIBUTES and list(table.rows) == names

    rows = label_rows(out)
    assert [r["file"] for r in rows] == names
    assert [r["source"] for r in rows] == sorted(clean_labels)
    assert all(r["seed"] == "0" for r in rows)
    assert [int(r["label"]) for r in rows] == [clean_labels[r["source"]] for r in rows]


def test_list_attr_records_the_attributes_the_adversary_was_made_from(default_run):
    _, out = default_run
    ends = {row["file"]: np.array(row["attrs"]) > 0.5 for row in image_rows(out)}
    table = read_attributes(out / "list_attr.txt")
    assert all((table.rows[name] > 0.5).tolist() == ends[name].tolist() for name in ends)


def test_unreadable_source_is_skipped_and_reported(default_run):
    result, out = default_run
    assert "skipped broken.png: unreadable image" in result.output
    summary = json.loads((out / "augment.json").read_text())["summary"]
    assert [item["file"] for item in summary["skipped"]] == ["broken.png", "notes.txt"]
    assert "skipped notes.txt: not an image file (.txt" in result.output
    assert "broken.png" not in {r["source"] for r in label_rows(out)}


# ---------------------------------------------------------------- protection of the model's attribute

def eyeglasses_columns(out: Path, faces: Path) -> tuple[list, list]:
    """(Eyeglasses in list_attr.txt, Eyeglasses at the start of each row's source)."""
    start = read_attributes(faces / "list_attr.txt")
    column = ATTRIBUTES.index("Eyeglasses")
    table = read_attributes(out / "list_attr.txt")
    written = [table.rows[r["file"]][column] for r in label_rows(out)]
    return written, [start.rows[r["source"]][start.names.index("Eyeglasses")] for r in label_rows(out)]


def test_model_attribute_is_protected_by_default(default_run, faces):
    result, out = default_run
    written, started = eyeglasses_columns(out, faces)
    assert written == started
    assert json.loads((out / "augment.json").read_text())["protected"] == ["Eyeglasses"]
    assert "protected: Eyeglasses (named in the model file name; --no-protect" in result.output
    # The attack did edit attributes: protection, not a timid attack, kept Eyeglasses.
    moved = read_attributes(out / "list_attr.txt").rows
    assert any((moved[r["file"]] != read_attributes(faces / "list_attr.txt").rows[r["source"]]).any()
               for r in label_rows(out))


def test_no_protect_lets_the_attack_change_the_model_attribute(tmp_path, faces):
    result = run_into(tmp_path / "aug", faces, "--no-protect")
    assert result.exit_code == 0, result.output
    written, started = eyeglasses_columns(tmp_path / "aug", faces)
    assert written != started
    assert json.loads((tmp_path / "aug" / "augment.json").read_text())["protected"] == []


# ---------------------------------------------------------------- rounds beyond the sources

def test_more_images_than_sources_cycle_with_new_seeds(cycled_run, clean_labels):
    result, out = cycled_run
    assert result.exit_code == 0, result.output
    rows = label_rows(out)
    sources = sorted(clean_labels)
    assert [r["source"] for r in rows] == sources + sources[:2]
    assert [r["seed"] for r in rows] == ["0"] * 4 + ["1"] * 2
    assert [int(r["label"]) for r in rows] == [clean_labels[r["source"]] for r in rows]
    for first, again in ((0, 4), (1, 5)):
        difference = pixels(out / "images" / f"00000{first}.png") - pixels(out / "images" / f"00000{again}.png")
        assert np.abs(difference).max() > 0


def plan(names: list[str], n: int, seed: int = 0) -> list:
    sources = [engine.Source(Path(name), np.full(3, 0.5, dtype=np.float32), 0) for name in names]
    return engine.plan_jobs(sources, n, seed, jitter=0.2)


def test_start_offsets_depend_on_source_seed_and_round_only():
    jobs = plan(["a.png", "b.png", "c.png"], 9)
    together = engine.start_offsets(jobs, 0.2, 3)
    alone = torch.cat([engine.start_offsets([job], 0.2, 3) for job in jobs])
    assert torch.equal(together, alone)
    assert torch.equal(together[:3], torch.zeros(3, 3))  # round 0 is the paper's start
    assert not torch.equal(together[3], together[6])  # same source, rounds 1 and 2
    assert not torch.equal(together[3], together[4])  # same round, two sources
    assert together.abs().max() <= 0.2
    assert not torch.equal(engine.start_offsets(plan(["a.png"], 2, seed=5), 0.2, 3)[1], together[3])


def test_shifted_start_never_leaves_the_attribute_ball():
    generator = torch.Generator().manual_seed(0)
    a0 = torch.rand(64, 6, generator=generator)
    fixed = torch.rand(64, 6, generator=generator) < 0.3
    for eps_attr in (0.1, 0.4, 1.0):
        radius = attribute_radius(a0, AttackSettings(eps_attr=eps_attr), fixed)
        low, high = (a0 - radius).clamp(0, 1), (a0 + radius).clamp(0, 1)
        offset = (torch.rand(64, 6, generator=generator) * 2 - 1) * 0.3 * ~fixed
        start, new_radius = shifted_start(a0, radius, offset)
        assert (start >= low).all() and (start <= high).all()
        assert ((start - new_radius).clamp(0, 1) >= low - 1e-6).all()
        assert ((start + new_radius).clamp(0, 1) <= high + 1e-6).all()
        same_start, same_radius = shifted_start(a0, radius, torch.zeros_like(a0))
        assert torch.equal(same_start, a0) and torch.equal(same_radius, radius)


def test_attribute_named_in_model_file():
    assert engine.attributes_in_name(EYEGLASSES, ATTRIBUTES) == ["Eyeglasses"]
    assert engine.attributes_in_name(Path("attribute_judge.pt"), ATTRIBUTES) == []
    assert engine.attributes_in_name(Path("bangs_vs_eyeglasses.pt"), ATTRIBUTES) == ["Bangs", "Eyeglasses"]


# ---------------------------------------------------------------- class filter

def test_class_keeps_only_sources_of_that_label(tmp_path, faces, clean_labels):
    wanted = [name for name, label in clean_labels.items() if label == 1]
    assert wanted and len(wanted) < len(clean_labels), "the faces need both classes"
    result = sia(EYEGLASSES, "--images", faces / "images", "--out", tmp_path / "aug", "--class", "Eyeglasses", *FAST)
    assert result.exit_code == 0, result.output
    rows = label_rows(tmp_path / "aug")
    assert [r["source"] for r in rows] == wanted
    assert {r["label"] for r in rows} == {"1"}


def test_class_absent_from_sources_is_one_line_error(tmp_path, faces, clean_labels):
    negatives = tmp_path / "negatives"
    negatives.mkdir()
    for name, label in clean_labels.items():
        if label == 0:
            shutil.copy(faces / "images" / name, negatives / name)
    result = sia(EYEGLASSES, "--images", negatives, "--out", tmp_path / "aug", "--class", "1", *FAST)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "no source image has that label" in result.stderr
    assert not (tmp_path / "aug" / "images").exists()


# ---------------------------------------------------------------- resume and reruns

def test_interrupted_run_resumes_without_rewriting(tmp_path, faces, cycled_run, monkeypatch):
    out = tmp_path / "aug"
    calls = []
    real_attack = engine.attack_jobs

    def attack_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_attack(*args, **kwargs)

    monkeypatch.setattr(engine, "attack_jobs", attack_then_interrupt)
    result = run_into(out, faces, "--n", 6)
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert [r["file"] for r in label_rows(out)] == ["000000.png", "000001.png", "000002.png"]
    assert (out / "list_attr.txt").read_text().splitlines()[0] == "3"
    assert json.loads((out / "augment.json").read_text())["complete"] is False
    before = {name: value for name, value in snapshot(out).items() if name.startswith("images/")}
    with open(out / ".sia-progress.0.jsonl", "a") as journal:
        journal.write('{"index": 3, "fi')  # a line torn by the interruption

    monkeypatch.setattr(engine, "attack_jobs", real_attack)
    result = run_into(out, faces, "--n", 6)
    assert result.exit_code == 0, result.output
    assert "wrote 3 image(s), 3 already there" in result.output
    after = snapshot(out)
    assert all(after[name] == value for name, value in before.items())
    indices = [row["index"] for row in image_rows(out)]
    assert sorted(indices) == list(range(6))
    names = [f"{i:06d}.png" for i in range(6)]
    assert [r["file"] for r in label_rows(out)] == names
    assert list(read_attributes(out / "list_attr.txt").rows) == names
    # An uninterrupted run with the same settings wrote the very same files.
    _, uninterrupted = cycled_run
    for name in names:
        assert (out / "images" / name).read_bytes() == (uninterrupted / "images" / name).read_bytes()
    assert (out / "labels.csv").read_bytes() == (uninterrupted / "labels.csv").read_bytes()

    result = run_into(out, faces, "--n", 6)
    assert result.exit_code == 0 and "already complete (6 images); nothing to do" in result.output
    assert snapshot(out) == after


def test_rerun_with_other_settings_is_refused_unless_forced(tmp_path, default_run, faces):
    out = tmp_path / "aug"
    shutil.copytree(default_run[1], out)
    before = snapshot(out)
    result = sia(EYEGLASSES, "--images", faces / "images", "--attrs-file", faces / "list_attr.txt", "--out", out,
                 "--steps", "4", "--step-size", "0.2", "--batch-size", "3", "--no-progress")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "steps: 3 -> 4" in result.stderr and "--force" in result.stderr
    assert snapshot(out) == before

    result = run_into(out, faces, "--force", "--class", "7")  # fails after loading: the old set must survive
    assert result.exit_code == 2 and "--class '7'" in result.stderr
    assert snapshot(out) == before

    result = run_into(out, faces, "--n", 2, "--force")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png"]
    assert len(label_rows(out)) == 2 and len(image_rows(out)) == 2


def test_refuses_a_folder_it_did_not_write(tmp_path, faces):
    (tmp_path / "dataset" / "images").mkdir(parents=True)
    result = run_into(tmp_path / "dataset", faces)
    assert result.exit_code == 2 and "no augment.json" in result.stderr
    assert list((tmp_path / "dataset").iterdir()) == [tmp_path / "dataset" / "images"]


def test_protect_and_no_protect_together_is_an_error(tmp_path, faces):
    result = run_into(tmp_path / "aug", faces, "--protect", "Bangs", "--no-protect")
    assert result.exit_code == 2 and "contradict" in result.stderr
