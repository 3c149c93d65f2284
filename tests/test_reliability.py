"""Bad input, end to end: every case runs the real `sia` command on real files on disk.

Each case states the one-line message (a distinctive part of it, any case) and the exit code
it expects. Where a run goes on past a bad file, the tests also check that nothing was lost:
the good images are in the report's `images`, the bad ones in `skipped` (or marked failed)
with a reason.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest
import torch
from PIL import Image
from test_registry import entry, env, server, write_registry  # noqa: F401 - fixtures reused by name
from typer.testing import CliRunner

from sia_cli.cli import app
from sia_cli.inputs.synth import make_dataset

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit deprecation notices

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "examples" / "targets" / "eyeglasses_control.pt"
SIZE = 64  # the default backbone's image size
FAST = ["--steps", "2", "--batch-size", "16", "--no-progress"]
NON_ASCII = "visage_é_顔.png"
MARKUP = "odd[red]name.png"  # printed to the terminal: must be shown as is, not read as Rich markup


def sia(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def assert_fails(result, code: int, *words: str) -> str:
    """Exit `code`, one line on stderr holding every word (any case), no traceback anywhere."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    return lines[0]


def report_of(out: Path) -> dict:
    return json.loads((out / "report.json").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- shared inputs


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    """Four synth faces (64x64 PNG) and their CelebA list_attr.txt."""
    root = tmp_path_factory.mktemp("faces")
    make_dataset(root, 4, seed=11)
    return root


def face_files(faces: Path) -> list[Path]:
    return sorted((faces / "images").glob("*.png"))


def halves(size: Tuple[int, int], first, second, mode: str = "RGB", vertical: bool = False) -> Image.Image:
    """`first` on the left (or top) half, `second` on the rest."""
    width, height = size
    image = Image.new(mode, size, second)
    image.paste(first, (0, 0, width, height // 2) if vertical else (0, 0, width // 2, height))
    return image


def noise(size: int = 64) -> Image.Image:
    # Noise does not compress: half of the file really cuts into the pixel data.
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


def write_odd_images(folder: Path, face: Path) -> Dict[str, Tuple[str, object]]:
    """Usable images in every awkward form: name -> (region, RGB in [0, 1] it must show there)."""
    expect: Dict[str, Tuple[str, object]] = {}
    Image.fromarray(np.full((SIZE, SIZE), 32768, dtype=np.uint16)).save(folder / "grey16.png")
    expect["grey16.png"] = ("all", (0.5, 0.5, 0.5))  # scaled from 16 bits, not clipped to white
    Image.new("L", (SIZE, SIZE), 64).save(folder / "grey.png")
    expect["grey.png"] = ("all", (0.25, 0.25, 0.25))
    halves((SIZE, SIZE), (255, 0, 0, 0), (0, 255, 0, 255), mode="RGBA").save(folder / "rgba.png")
    expect["rgba.png"] = ("left", (1.0, 1.0, 1.0))  # transparent -> white background
    palette = Image.new("P", (SIZE, SIZE), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    palette.save(folder / "palette.png")
    expect["palette.png"] = ("all", (0.0, 0.0, 1.0))
    Image.new("CMYK", (SIZE, SIZE), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=95)
    expect["cmyk.jpg"] = ("all", (1.0, 0.0, 0.0))
    Image.new("RGB", (1, 1), (255, 255, 0)).save(folder / "one_pixel.png")
    expect["one_pixel.png"] = ("all", (1.0, 1.0, 0.0))
    large = Image.new("RGB", (5000, 3000), (0, 255, 0))  # green bands outside the centre square
    large.paste((255, 0, 255), (1000, 0, 4000, 3000))
    large.save(folder / "large.png")
    expect["large.png"] = ("all", (1.0, 0.0, 1.0))
    # Stored with red on top; EXIF orientation 6 = "rotate 90 degrees clockwise to display",
    # which puts the red half on the right.
    exif = Image.Exif()
    exif[0x0112] = 6
    halves((SIZE, SIZE), (255, 0, 0), (0, 0, 255), vertical=True).save(folder / "exif.jpg", exif=exif, quality=95)
    expect["exif.jpg"] = ("right", (1.0, 0.0, 0.0))
    shutil.copy(face, folder / NON_ASCII)
    expect[NON_ASCII] = ("face", None)
    return expect


def write_bad_images(folder: Path) -> Dict[str, str]:
    """Unusable files: name -> what the skip reason must say."""
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image\n")
    (folder / MARKUP).write_text("named like Rich markup\n")
    noise().save(folder / "cut.png")
    noise().save(folder / "cut.jpg", quality=95)
    for name in ("cut.png", "cut.jpg"):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    return {"zero.png": "empty file", "text.png": "cannot identify image", MARKUP: "cannot identify image",
            "cut.png": "truncated", "cut.jpg": "truncated"}


@pytest.fixture(scope="module")
def mixed_run(faces, tmp_path_factory):
    """One `sia attack --method pgd` over a folder of good, odd and broken images.

    PGD never passes through the generator and moves pixels by at most 1.5/255, so each
    adversary shows the decoded image: the colours prove how each file was read.
    """
    root = tmp_path_factory.mktemp("mixed")
    images = root / "images"
    images.mkdir()
    good = face_files(faces)[:2]
    for face in good:
        shutil.copy(face, images)
    odd = write_odd_images(images, face_files(faces)[2])
    bad = write_bad_images(images)
    out = root / "run"
    result = sia("attack", MODEL, "--images", images, "--out", out, "--method", "pgd", *FAST)
    return {"result": result, "out": out, "good": [f.name for f in good], "odd": odd, "bad": bad}


# ----------------------------------------------------------------------------- images


def test_mixed_folder_runs_with_exit_0_and_lists_the_skipped(mixed_run):
    result = mixed_run["result"]
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    report = report_of(mixed_run["out"])
    processed = {r["file"] for r in report["images"]}
    assert processed == set(mixed_run["good"]) | set(mixed_run["odd"])
    assert {s["file"] for s in report["skipped"]} == set(mixed_run["bad"])
    for name in mixed_run["bad"]:
        assert name in result.stdout  # told to the user, not only written to the report


def region(image: torch.Tensor, where: str) -> torch.Tensor:
    half = SIZE // 2
    return {"all": image, "left": image[:, :, : half - 4], "right": image[:, :, half + 4:]}[where]


def adversary(out: Path, name: str) -> torch.Tensor:
    with Image.open(out / "adversaries" / f"{Path(name).stem}.png") as saved:
        assert saved.size == (SIZE, SIZE)
        return torch.from_numpy(np.asarray(saved.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


@pytest.mark.parametrize("name", ["grey16.png", "grey.png", "rgba.png", "palette.png", "cmyk.jpg",
                                  "one_pixel.png", "large.png", "exif.jpg", NON_ASCII])
def test_odd_image_is_processed_and_decoded_right(mixed_run, name):
    report = report_of(mixed_run["out"])
    record = next(r for r in report["images"] if r["file"] == name)
    assert "error" not in record and record["pred_adv"] is not None
    where, rgb = mixed_run["odd"][name]
    image = adversary(mixed_run["out"], name)
    if rgb is None:  # the non-ASCII face: a real face, not a blank
        assert image.std() > 0.05
        return
    expected = torch.tensor(rgb).view(3, 1, 1)
    # PGD moves each pixel by at most 1.5/255; JPEG adds its own small error.
    assert torch.allclose(region(image, where), expected.expand_as(region(image, where)), atol=0.08), name


@pytest.mark.parametrize("name", ["zero.png", "text.png", MARKUP, "cut.png", "cut.jpg"])
def test_unusable_image_is_skipped_with_its_reason(mixed_run, name):
    report = report_of(mixed_run["out"])
    reason = next(s["reason"] for s in report["skipped"] if s["file"] == name)
    assert mixed_run["bad"][name] in reason.lower() and "\n" not in reason
    assert not (mixed_run["out"] / "adversaries" / f"{Path(name).stem}.png").exists()


@pytest.mark.parametrize("case, words", [
    ("missing folder", ["image folder not found", "nowhere"]),
    ("empty folder", ["no images", ".png"]),
    ("only unusable files", ["no usable image", "unreadable"]),
    ("a file, not a folder", ["not a folder"]),
])
def test_image_folder_without_usable_images_exits_2(tmp_path, case, words):
    images = tmp_path / "images"
    if case == "missing folder":
        images = tmp_path / "nowhere"
    elif case == "empty folder":
        images.mkdir()
    elif case == "only unusable files":
        images.mkdir()
        write_bad_images(images)
    else:
        images.write_text("a file\n")
    result = sia("attack", MODEL, "--images", images, "--out", tmp_path / "run", *FAST)
    assert_fails(result, 2, *words)


# ----------------------------------------------------------------------------- attribute files


def attr_lines(faces: Path) -> list[str]:
    return (faces / "list_attr.txt").read_text().splitlines()


def rewrite(lines: list[str], path: Path) -> Path:
    """Write a list_attr file whose count line matches the rows that follow."""
    path.write_text("\n".join([str(len(lines) - 2)] + lines[1:]) + "\n")
    return path


@pytest.mark.parametrize("case, words", [
    ("wrong names", ["Eyeglasses, Young not in", "names Glasses, Old instead"]),
    ("value 2", ["000001.png", "Bangs", "2", "-1, 0 or 1"]),
    ("value 0.5", ["000002.png", "0.5", "-1, 0 or 1"]),
    ("duplicated name", ["Smiling", "twice"]),
    ("duplicated file", ["000003.png", "twice"]),
    ("missing file", ["attribute file not found", "nope.txt"]),
    ("not the layout", ["not in celeba list_attr layout"]),
    ("lists none of the images", ["no usable image", "not listed in attrs.txt"]),
])
def test_bad_attribute_file_exits_2_naming_the_problem(faces, tmp_path, case, words):
    lines = attr_lines(faces)
    names = lines[1].split()
    path = tmp_path / "attrs.txt"
    if case == "wrong names":
        names = ["Glasses" if n == "Eyeglasses" else "Old" if n == "Young" else n for n in names]
        rewrite([lines[0], " ".join(names)] + lines[2:], path)
    elif case.startswith("value"):
        row, value = (3, "2") if case == "value 2" else (4, "0.5")
        fields = lines[row].split()
        fields[1 + names.index("Bangs")] = value
        rewrite(lines[:row] + [" ".join(fields)] + lines[row + 1:], path)
    elif case == "duplicated name":
        names[names.index("Young")] = "Smiling"
        rewrite([lines[0], " ".join(names)] + lines[2:], path)
    elif case == "duplicated file":
        rewrite(lines + [lines[-1]], path)
    elif case == "missing file":
        path = tmp_path / "nope.txt"
    elif case == "lists none of the images":  # the attribute file of another folder
        rewrite(lines[:2] + [f"other_{row}" for row in lines[2:]], path)
    else:
        path.write_text("Eyeglasses Young\n000000.png 1 -1\n")
    result = sia("attack", MODEL, "--images", faces / "images", "--attrs-file", path,
                 "--out", tmp_path / "run", *FAST)
    assert_fails(result, 2, *words)


def test_image_missing_from_the_attribute_file_is_skipped_the_rest_processed(faces, tmp_path):
    lines = attr_lines(faces)
    dropped = lines[2].split()[0]
    path = rewrite(lines[:2] + lines[3:], tmp_path / "attrs.txt")
    out = tmp_path / "run"
    result = sia("attack", MODEL, "--images", faces / "images", "--attrs-file", path, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    report = report_of(out)
    assert [s["file"] for s in report["skipped"]] == [dropped]
    assert "not listed in attrs.txt" in report["skipped"][0]["reason"]
    assert {r["file"] for r in report["images"]} == {f.name for f in face_files(faces)} - {dropped}


def test_rows_for_absent_images_are_ignored(faces, tmp_path):
    lines = attr_lines(faces)
    ghost = "ghost.png " + " ".join(lines[2].split()[1:])
    path = rewrite(lines + [ghost], tmp_path / "attrs.txt")
    out = tmp_path / "run"
    result = sia("attack", MODEL, "--images", faces / "images", "--attrs-file", path, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    report = report_of(out)
    assert {r["file"] for r in report["images"]} == {f.name for f in face_files(faces)}
    assert report["attrs_source"] == "attrs_file" and report["skipped"] == []


# ----------------------------------------------------------------------------- target models


class Fixed32(torch.nn.Module):
    """Only takes 32x32 inputs: the flattened image feeds a linear layer."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 32 * 32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class Pooled(torch.nn.Module):
    """A small binary classifier: conv, global average, linear."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class AlwaysNaN(Pooled):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x)) * float("nan")


class TupleOut(Pooled):
    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x)
        return self.fc(features), features


class DictOut(Pooled):
    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.features(x)
        return {"logits": self.fc(features), "embedding": features}


class NaNWhenBright(Pooled):
    """NaN for images brighter than 0.9 on average, +inf for those darker than 0.1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc(self.features(x))
        brightness = x.mean(dim=(1, 2, 3)).view(-1, 1)
        logits = torch.where(brightness > 0.9, torch.full_like(logits, float("nan")), logits)
        return torch.where(brightness < 0.1, torch.full_like(logits, float("inf")), logits)


class MetaWeights(Pooled):
    """Weights on the meta device: a model whose weights sit on a device other than the one asked for."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 1, device="meta")


class DeviceInCode(Pooled):
    """Creates a tensor on a fixed device in forward (as `device="cuda"` written into a model does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x)) + torch.zeros(1, device=torch.device("meta"))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    paths = {}
    torch.manual_seed(0)
    for name, cls in [("fixed32", Fixed32), ("always_nan", AlwaysNaN), ("tuple", TupleOut), ("dict", DictOut),
                      ("nan_when_bright", NaNWhenBright), ("meta_weights", MetaWeights),
                      ("device_in_code", DeviceInCode)]:
        paths[name] = folder / f"{name}.pt"
        torch.jit.save(torch.jit.script(cls().eval()), str(paths[name]))
    paths["text"] = folder / "text.pt"
    paths["text"].write_text("def forward(x): return x\n")
    paths["random bytes"] = folder / "random.pt"
    paths["random bytes"].write_bytes(np.random.default_rng(1).bytes(4096))
    return paths


@pytest.mark.parametrize("model, extra, words", [
    ("text", [], ["not a TorchScript file"]),
    ("random bytes", [], ["not a TorchScript file"]),
    ("fixed32", [], ["64x64", "--input-size"]),
    ("always_nan", [], ["NaN"]),
    ("tuple", [], ["several outputs", "--output-key"]),
    ("dict", [], ["'logits'", "'embedding'", "--output-key"]),
    ("dict", ["--output-key", "scores"], ["--output-key 'scores'", "logits, embedding"]),
    ("tuple", ["--output-key", "2"], ["--output-key 2", "out of range"]),
    ("meta_weights", ["--device", "cpu"], ["meta", "cpu"]),
    ("device_in_code", ["--device", "cpu"], ["meta", "cpu", "another device", "--device"]),
])
def test_bad_model_exits_2_with_one_line(faces, models, tmp_path, model, extra, words):
    result = sia("attack", models[model], "--images", faces / "images", "--out", tmp_path / "run", *FAST, *extra)
    line = assert_fails(result, 2, *words)
    if model == "device_in_code":  # other input settings would not help: no such advice
        assert "--input-size" not in line


def test_output_key_is_documented_in_help():
    result = sia("attack", "--help")
    assert result.exit_code == 0
    assert "--output-key" in result.output and "tuple or dict" in result.output


@pytest.mark.parametrize("model, extra", [
    ("tuple", ["--output-key", "0"]),
    ("dict", ["--output-key", "logits"]),
    ("fixed32", ["--input-size", "32"]),
])
def test_model_runs_once_told_what_it_needs(faces, models, tmp_path, model, extra):
    out = tmp_path / "run"
    result = sia("attack", models[model], "--images", faces / "images", "--out", out, *FAST, *extra)
    assert result.exit_code == 0, result.output
    report = report_of(out)
    assert len(report["images"]) == 4 and all("error" not in r for r in report["images"])


# ----------------------------------------------------------------------------- NaN for some images


@pytest.fixture(scope="module")
def nan_images(faces, tmp_path_factory) -> Path:
    """The four faces, a white image (the model returns NaN) and a black one (+inf)."""
    images = tmp_path_factory.mktemp("nan") / "images"
    images.mkdir()
    for face in face_files(faces):
        shutil.copy(face, images)
    Image.new("RGB", (SIZE, SIZE), (255, 255, 255)).save(images / "white.png")
    Image.new("RGB", (SIZE, SIZE), (0, 0, 0)).save(images / "black.png")
    return images


@pytest.mark.parametrize("command", ["attack", "diagnose"])
def test_nan_for_one_image_marks_it_failed_and_the_rest_go_on(faces, models, nan_images, tmp_path, command):
    out = tmp_path / "run"
    extra = ["--bootstrap", "20"] if command == "diagnose" else []
    result = sia(command, models["nan_when_bright"], "--images", nan_images, "--out", out, *FAST, *extra)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    report = report_of(out)
    records = {r["file"]: r for r in report["images"]}
    assert set(records) == {f.name for f in face_files(faces)} | {"white.png", "black.png"}
    for name in ("white.png", "black.png"):
        assert records[name]["success"] is False and "NaN or inf" in records[name]["error"]
    faces_ok = [records[f.name] for f in face_files(faces)]
    assert all("error" not in r and r["pred_adv"] is not None for r in faces_ok)
    assert report["skipped"] == []
    assert report["psnr"] is not None and np.isfinite(report["psnr"])
    if command == "attack":  # told to the user too
        assert "failed white.png" in result.stdout and "failed black.png" in result.stdout
    if command == "diagnose":
        assert all(np.isfinite(v) for v in report["sensitivity"].values())
        assert all("ablation" in r for r in faces_ok)


@pytest.mark.parametrize("command", ["attack", "diagnose"])
def test_nan_for_every_image_exits_2(models, tmp_path, command):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (SIZE, SIZE), (255, 255, 255)).save(images / "white.png")
    result = sia(command, models["nan_when_bright"], "--images", images, "--out", tmp_path / "run", *FAST)
    assert_fails(result, 2, "no usable image", "NaN or inf")


# ----------------------------------------------------------------------------- backbones (--gan)


def gan_case(case: str, folder: Path, make_experiment, tiny_setting: dict) -> Path:
    exp = make_experiment(folder / "exp")
    weights = exp / "checkpoint" / "weights.0.pth"
    if case == "no setting.txt":
        (exp / "setting.txt").unlink()
    elif case == "attribute count":
        (exp / "setting.txt").write_text(json.dumps({**tiny_setting, "attrs": tiny_setting["attrs"][:-1]}))
    elif case == "truncated checkpoint":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif case == "random bytes checkpoint":
        weights.write_bytes(np.random.default_rng(2).bytes(4096))
    return exp


@pytest.mark.parametrize("case, words", [
    ("no setting.txt", ["no setting.txt found"]),
    ("attribute count", ["settings list 4 attributes", "trained with 5"]),
    ("truncated checkpoint", ["cannot read backbone checkpoint", "corrupted", "zip archive"]),
    ("random bytes checkpoint", ["cannot read backbone checkpoint", "corrupted"]),
])
def test_bad_backbone_folder_exits_2(faces, tmp_path, make_experiment, tiny_setting, case, words):
    exp = gan_case(case, tmp_path, make_experiment, tiny_setting)
    result = sia("attack", MODEL, "--images", faces / "images", "--gan", exp, "--out", tmp_path / "run", *FAST)
    line = assert_fails(result, 2, *words)
    # torch.load's weights-only notice advises weights_only=False, which runs code from the file
    # and never repairs a damaged one: that advice must not reach the user.
    assert "weights_only" not in line


def test_registry_checksum_mismatch_exits_2_and_caches_nothing(faces, env, server, tiny_setting, tmp_path):
    weights, cache = env
    write_registry(weights, {"remote": entry(tiny_setting, {"url": server.url("tiny.pth"), "sha256": "0" * 64})})
    result = sia("attack", MODEL, "--images", faces / "images", "--gan", "remote", "--out", tmp_path / "run", *FAST)
    assert_fails(result, 2, "checksum mismatch", "0" * 64)
    assert server.requests == ["/tiny.pth"]
    cached = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    assert cached == []


# ----------------------------------------------------------------------------- run control
# These need a real process: Ctrl-C is a signal, and the lock is held by another process.

EYEGLASSES = REPO / "examples" / "targets" / "eyeglasses_confounded.pt"
SLOW = ["--steps", "20", "--batch-size", "1", "--no-progress"]  # under a second an image on 2 cores
PROGRESS = ".sia-progress.0.jsonl"  # the lifecycle's journal, the same for every command
STARTED = ".sia-run.json"  # written once the lock is held


def command_line(command: str, faces: Path, out: Path, steps: list = SLOW) -> list[str]:
    args = [command, EYEGLASSES, "--images", faces / "images", "--attrs-file", faces / "list_attr.txt",
            "--out", out, *steps]
    return [sys.executable, "-m", "sia_cli", *map(str, args)]


def _as_from_a_terminal() -> None:
    # A job that a non-interactive shell started with `&` (a CI script run in the background)
    # ignores SIGINT, and its children inherit that: Ctrl-C would then never reach the command.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(command: str, faces: Path, out: Path, steps: list = SLOW) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}  # steadier speed beside other work
    return subprocess.Popen(command_line(command, faces, out, steps), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_as_from_a_terminal)


def wait_for_lines(path: Path, count: int, process: subprocess.Popen, seconds: float = 240) -> None:
    """Until `path` holds `count` journal lines: that many images are finished."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if path.exists() and len(path.read_text(encoding="utf-8").splitlines()) >= count:
            return
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"{path} did not reach {count} lines")


def interrupt(process: subprocess.Popen) -> tuple[int, str]:
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


@pytest.fixture(scope="module")
def six_faces(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("six_faces")
    make_dataset(root, 6, seed=12)
    return root


def test_ctrl_c_in_diagnose_keeps_a_partial_report_and_a_rerun_resumes(six_faces, tmp_path):
    out = tmp_path / "run"
    process = start("diagnose", six_faces, out)
    wait_for_lines(out / PROGRESS, 2, process)
    code, stderr = interrupt(process)
    assert code == 130 and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1 and "rerun the same command to resume" in stderr, stderr
    partial = report_of(out)
    assert partial["complete"] is False and 2 <= len(partial["images"]) < 6
    assert "Incomplete run" in (out / "report.html").read_text(encoding="utf-8")
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "adversaries").iterdir()}
    assert len(kept) >= len(partial["images"])

    rerun = subprocess.run(command_line("diagnose", six_faces, out), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    resumed = report_of(out)
    assert resumed["complete"] is True and len(resumed["images"]) == 6
    for record in partial["images"]:  # finished images are not attacked again
        assert (out / "adversaries" / record["file"]).stat().st_mtime_ns == kept[record["file"]]
    assert not (out / PROGRESS).exists()

    whole = tmp_path / "whole"  # the same command never interrupted
    assert subprocess.run(command_line("diagnose", six_faces, whole), capture_output=True).returncode == 0
    assert resumed["images"] == report_of(whole)["images"]
    assert resumed["sensitivity"] == report_of(whole)["sensitivity"]


def test_ctrl_c_in_augment_keeps_finished_images_and_a_rerun_resumes(six_faces, tmp_path):
    out = tmp_path / "aug"
    process = start("augment", six_faces, out)
    wait_for_lines(out / PROGRESS, 2, process)
    code, stderr = interrupt(process)
    assert code == 130 and len(stderr.strip().splitlines()) == 1, stderr
    assert "rerun the same command to resume" in stderr
    manifest = json.loads((out / "augment.json").read_text(encoding="utf-8"))
    assert manifest["complete"] is False
    listed = [line.split(",")[0] for line in (out / "labels.csv").read_text().splitlines()[1:]]
    assert 2 <= len(listed) < 6
    assert listed == sorted(p.name for p in (out / "images").glob("*.png"))  # tables match the images on disk

    rerun = subprocess.run(command_line("augment", six_faces, out), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{6 - len(listed)} image(s), {len(listed)} already there" in rerun.stdout
    whole = tmp_path / "whole"
    assert subprocess.run(command_line("augment", six_faces, whole), capture_output=True).returncode == 0
    for table in ("labels.csv", "list_attr.txt"):
        assert (out / table).read_text() == (whole / table).read_text()
    for image in (whole / "images").iterdir():
        assert (out / "images" / image.name).read_bytes() == image.read_bytes()


@pytest.mark.parametrize("command", ["diagnose", "augment"])
def test_second_run_into_the_same_out_is_refused(six_faces, tmp_path, command):
    out = tmp_path / "shared"
    first = start(command, six_faces, out, ["--steps", "2000", "--batch-size", "1", "--no-progress"])
    try:
        wait_for_lines(out / STARTED, 0, first)
        second = sia(command, EYEGLASSES, "--images", six_faces / "images", "--attrs-file",
                     six_faces / "list_attr.txt", "--out", out, *FAST)
        assert_fails(second, 2, "is writing to", str(out))
        assert first.poll() is None  # the first run goes on, untouched
    finally:
        first.kill()
        first.communicate()


def limit_file_size():  # in the child: every write of a byte fails, as on a full disk
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))


@pytest.mark.parametrize("case", ["inside a file", "disk full"])
def test_unwritable_out_fails_before_any_work(six_faces, tmp_path, case):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "out" if case == "inside a file" else tmp_path / "full"
    result = subprocess.run(command_line("diagnose", six_faces, out), capture_output=True, text=True,
                            preexec_fn=limit_file_size if case == "disk full" else None)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "cannot write to --out" in result.stderr
    assert not (out / "adversaries").exists()


def test_ctrl_c_in_train_gan_saves_the_last_step_and_resume_continues(six_faces, tmp_path):
    out = tmp_path / "gan"
    args = [sys.executable, "-m", "sia_cli", "train-gan", "--images", six_faces / "images", "--attrs",
            six_faces / "list_attr.txt", "--out", out, "--img-size", "32", "--batch-size", "2", "--n-d", "1",
            "--enc-dim", "8", "--dec-dim", "8", "--dis-dim", "8", "--layers", "3", "--save-every", "100000",
            "--sample-every", "100000", "--no-progress"]
    process = subprocess.Popen([*map(str, args), "--max-steps", "100000"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               preexec_fn=_as_from_a_terminal)
    wait_for_lines(out / "setting.txt", 1, process)  # written just before the first step
    time.sleep(3)
    code, stderr = interrupt(process)
    assert code == 130 and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr
    assert "rerun the same command to resume" in stderr
    saved = sorted((out / "checkpoint").glob("weights.*.pth"))
    assert len(saved) == 1 and saved[0].name in stderr
    step = int(saved[0].name.split(".")[1])
    assert step > 0 and f"interrupted after {step} of 100000" in stderr
    resumed = subprocess.run([*map(str, args), "--max-steps", str(step + 2)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"trained to step {step + 2} (from {step})" in resumed.stdout


# ============================================================================= issue 12, part 3
# Every signal, option and file answered the same way: one line, a non-zero exit, nothing lost.


# ----------------------------------------------------------------------------- signals


def test_sigterm_in_diagnose_is_ctrl_c_with_exit_143_and_a_rerun_resumes(six_faces, tmp_path):
    out = tmp_path / "run"
    process = start("diagnose", six_faces, out)
    wait_for_lines(out / PROGRESS, 2, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143 and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and "rerun the same command to resume" in stderr, stderr
    partial = report_of(out)
    assert partial["complete"] is False and 2 <= len(partial["images"]) < 6
    rerun = subprocess.run(command_line("diagnose", six_faces, out), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert report_of(out)["complete"] is True and len(report_of(out)["images"]) == 6


def test_ctrl_c_while_starting_is_one_line(six_faces, tmp_path):
    """Ctrl-C while Python still imports torch (seconds): one line, not an import traceback."""
    process = start("diagnose", six_faces, tmp_path / "run")
    time.sleep(0.3)
    code, stderr = interrupt(process)
    assert code == 130 and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and "interrupted" in stderr, stderr


def gan_args(images: Path, attrs: Path, out: Path, *extra) -> list[str]:
    args = ["train-gan", "--images", images, "--attrs", attrs, "--out", out, "--img-size", "32", "--batch-size",
            "2", "--n-d", "1", "--enc-dim", "8", "--dec-dim", "8", "--dis-dim", "8", "--layers", "3",
            "--save-every", "100000", "--sample-every", "100000", "--no-progress", *extra]
    return [sys.executable, "-m", "sia_cli", *map(str, args)]


def test_sigterm_in_train_gan_saves_the_last_step(six_faces, tmp_path):
    out = tmp_path / "gan"
    process = subprocess.Popen(gan_args(six_faces / "images", six_faces / "list_attr.txt", out, "--max-steps",
                                        "100000"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_lines(out / "setting.txt", 1, process)
    time.sleep(3)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143 and len(stderr.strip().splitlines()) == 1, stderr
    assert "interrupted after" in stderr and "rerun the same command to resume" in stderr
    saved = sorted((out / "checkpoint").glob("weights.*.pth"))
    assert len(saved) == 1 and saved[0].name in stderr


# ----------------------------------------------------------------------------- options, before any work


@pytest.mark.parametrize("command, extra, words", [
    ("train-gan", ["--save-every", "0"], ["--save-every", "at least 1", "0"]),
    ("train-gan", ["--batch-size", "0"], ["--batch-size", "at least 1"]),
    ("train-gan", ["--lr", "-1"], ["--lr", "positive", "-1"]),
    ("diagnose", ["--top-k", "-1"], ["--top-k", "at least 1", "-1"]),
    ("diagnose", ["--top-k", "0"], ["--top-k", "at least 1"]),
    ("diagnose", ["--bootstrap", "-1"], ["--bootstrap", "-1"]),
])
def test_bad_option_value_exits_2_before_any_work(faces, tmp_path, command, extra, words):
    out = tmp_path / "run"
    if command == "train-gan":
        args = ["train-gan", "--images", faces / "images", "--attrs", faces / "list_attr.txt", "--out", out]
    else:
        args = [command, MODEL, "--images", faces / "images", "--out", out, *FAST]
    assert_fails(sia(*args, *extra), 2, *words)
    assert not out.exists()


def test_protecting_every_attribute_is_refused_before_the_attack(faces, tmp_path):
    out = tmp_path / "run"
    every = attr_lines(faces)[1].split()
    result = sia("diagnose", MODEL, "--images", faces / "images", "--attrs-file", faces / "list_attr.txt",
                 "--protect", ",".join(every), "--out", out, *FAST)
    assert_fails(result, 2, "--protect", "every attribute")
    assert not (out / "adversaries").exists() and not (out / "report.json").exists()


def test_labels_missing_an_image_is_refused_before_the_first_batch(faces, tmp_path):
    files = face_files(faces)
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\n" + "".join(f"{f.name},1\n" for f in files[:-1]))
    out = tmp_path / "run"
    result = sia("attack", MODEL, "--images", faces / "images", "--labels", labels, "--out", out, *FAST)
    assert_fails(result, 2, "--labels", f"no row for {files[-1].name}", "1 of 4")
    assert not (out / "adversaries").exists()


@pytest.mark.parametrize("extra, words", [
    (["--frobnicate"], ["no such option", "--frobnicate"]),
    (["--steps", "many"], ["--steps", "integer"]),
    (["--config", "nowhere.yaml"], ["--config", "nowhere.yaml"]),
])
def test_usage_error_is_one_line_with_a_help_hint(faces, tmp_path, extra, words):
    result = sia("attack", MODEL, "--images", faces / "images", "--out", tmp_path / "run", *extra)
    line = assert_fails(result, 2, *words)
    assert line.startswith("error: ") and line.endswith("see sia attack --help")
    assert "Usage:" not in result.output and "╭" not in result.output


# ----------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def file_run(faces, tmp_path_factory):
    """`sia attack --method pgd` over two faces, float TIFFs and broken links."""
    root = tmp_path_factory.mktemp("files")
    images = root / "images"
    images.mkdir()
    for face in face_files(faces)[:2]:
        shutil.copy(face, images)
    Image.fromarray(np.full((SIZE, SIZE), 0.5, dtype=np.float32)).save(images / "float01.tif")
    Image.fromarray(np.linspace(-1, 3, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)).save(
        images / "float_odd.tif")
    (images / "dangling.png").symlink_to(root / "gone.png")
    (images / "loop.png").symlink_to(images / "loop.png")
    out = root / "run"
    result = sia("attack", MODEL, "--images", images, "--out", out, "--method", "pgd", *FAST)
    return {"result": result, "out": out, "good": [f.name for f in face_files(faces)[:2]] + ["float01.tif"]}


def test_float_tiff_in_0_1_is_decoded_to_its_grey_not_black(file_run):
    assert file_run["result"].exit_code == 0, file_run["result"].output
    report = report_of(file_run["out"])
    assert {r["file"] for r in report["images"]} == set(file_run["good"])
    image = adversary(file_run["out"], "float01.tif")
    assert torch.allclose(image, torch.full_like(image, 0.5), atol=0.03)


@pytest.mark.parametrize("name, words", [
    ("float_odd.tif", ["float image with values in [-1, 3]", "[0, 1] or [0, 255]"]),
    ("dangling.png", ["broken symbolic link", "gone.png"]),
    ("loop.png", ["symbolic link loop"]),
])
def test_odd_file_is_listed_as_skipped_with_its_reason(file_run, name, words):
    report = report_of(file_run["out"])
    reason = next(s["reason"] for s in report["skipped"] if s["file"] == name)
    for word in words:
        assert word in reason
    assert name in file_run["result"].stdout


def test_attribute_file_with_a_byte_order_mark_is_accepted(faces, tmp_path):
    path = tmp_path / "attrs.txt"
    path.write_bytes(b"\xef\xbb\xbf" + (faces / "list_attr.txt").read_bytes())
    out = tmp_path / "run"
    result = sia("attack", MODEL, "--images", faces / "images", "--attrs-file", path, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    assert report_of(out)["attrs_source"] == "attrs_file" and report_of(out)["skipped"] == []


def test_attribute_file_naming_another_extension_says_so(faces, tmp_path):
    lines = attr_lines(faces)
    path = rewrite(lines[:2] + [row.replace(".png", ".jpg", 1) for row in lines[2:]], tmp_path / "list_attr.txt")
    first = face_files(faces)[0].name
    result = sia("attack", MODEL, "--images", faces / "images", "--attrs-file", path, "--out", tmp_path / "run",
                 *FAST)
    assert_fails(result, 2, f"list_attr.txt names {first.replace('.png', '.jpg')} but the folder has {first}")


@pytest.mark.parametrize("command", ["attack", "train-gan"])
def test_images_one_folder_down_are_pointed_at(faces, tmp_path, command):
    if command == "attack":
        result = sia("attack", MODEL, "--images", faces, "--out", tmp_path / "run", *FAST)
    else:
        result = sia("train-gan", "--images", faces, "--attrs", faces / "list_attr.txt", "--out", tmp_path / "g")
    assert_fails(result, 2, f"{faces / 'images'}/ holds 4", f"pass --images {faces / 'images'}")


def limit_file_size_to(size: int):
    def limit():  # in the child: a write past `size` bytes fails, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return limit


@pytest.mark.parametrize("command", ["diagnose", "train-gan"])
def test_disk_full_mid_run_leaves_no_temp_files(six_faces, tmp_path, command):
    out = tmp_path / "full"
    if command == "diagnose":  # the report files fit, an adversary PNG does not
        args = command_line("diagnose", six_faces, out, ["--steps", "2", "--no-progress"])
    else:  # setting.txt fits, the first checkpoint does not
        args = gan_args(six_faces / "images", six_faces / "list_attr.txt", out, "--max-steps", "2", "--save-every", "1")
    result = subprocess.run(args, capture_output=True, text=True, preexec_fn=limit_file_size_to(4096))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "too large" in result.stderr.lower()
    assert [p.name for p in out.rglob("*.tmp")] == []


# ----------------------------------------------------------------------------- models


class RaisesWhenBright(Pooled):
    """Checks its input, as many models do: raises on images brighter than 0.9 on average."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x.mean(dim=(1, 2, 3)) > 0.9).any()):
            raise ValueError("input image is overexposed")
        return self.fc(self.features(x))


@pytest.mark.parametrize("command", ["attack", "diagnose"])
def test_model_raising_on_one_image_marks_it_failed_and_the_rest_go_on(faces, nan_images, tmp_path, command):
    model = tmp_path / "raises.pt"
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(RaisesWhenBright().eval()), str(model))
    out = tmp_path / "run"
    extra = ["--bootstrap", "20"] if command == "diagnose" else []
    result = sia(command, model, "--images", nan_images, "--out", out, *FAST, *extra)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    records = {r["file"]: r for r in report_of(out)["images"]}
    assert records["white.png"]["success"] is False
    assert records["white.png"]["error"] == "the model raised an error: input image is overexposed"
    assert all("error" not in records[f.name] for f in face_files(faces))
    if command == "attack":
        assert "failed white.png" in result.stdout and "overexposed" in result.stdout


def test_augment_skips_a_source_the_model_raises_on_and_augments_the_rest(faces, nan_images, tmp_path):
    model = tmp_path / "raises.pt"
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(RaisesWhenBright().eval()), str(model))
    out = tmp_path / "aug"
    result = sia("augment", model, "--images", nan_images, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    assert "skipped white.png: the model raised an error: input image is overexposed" in result.stdout
    manifest = json.loads((out / "augment.json").read_text())
    sources = {row["source"] for row in manifest["images"]}
    assert "white.png" not in sources and {f.name for f in face_files(faces)} <= sources
    assert manifest["complete"] is True and manifest["summary"]["failed"] == []


def exported_archive(path: Path) -> Path:
    torch.manual_seed(0)
    program = torch.export.export(Pooled().eval(), (torch.rand(4, 3, SIZE, SIZE),),
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch", max=64)}})
    torch.export.save(program, str(path))
    return path


def rewrite_archive(source: Path, target: Path, change) -> Path:
    """Copy a .pt2 archive, `change(name, data) -> data` applied to every entry."""
    import zipfile

    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for name in old.namelist():
            new.writestr(name, change(name, old.read(name)))
    return target


class Marker:
    """Unpickling this creates a file: proof that the pickle ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def pickled_weights(plain: Path):
    """A rewrite that stores every weight as a torch.save pickle (as torch does for tensor subclasses)."""
    import io
    import zipfile

    torch.manual_seed(0)
    state = Pooled().eval().state_dict()  # the weights exported_archive saved
    with zipfile.ZipFile(plain) as archive:
        name = next(n for n in archive.namelist() if n.endswith("model_weights_config.json"))
        config = json.loads(archive.read(name))
    files = {meta["path_name"]: fqn for fqn, meta in config["config"].items()}

    def change(name: str, data: bytes) -> bytes:
        if name.endswith("model_weights_config.json"):
            for meta in config["config"].values():
                meta["use_pickle"] = True
            return json.dumps(config).encode()
        if "/data/weights/" in name and name.split("/")[-1] in files:
            buffer = io.BytesIO()
            torch.save(torch.nn.Parameter(state[files[name.split("/")[-1]]]), buffer)
            return buffer.getvalue()
        return data
    return change


def test_pt2_with_pickled_entries_is_refused_without_the_trust_flag(faces, tmp_path):
    import io

    plain = exported_archive(tmp_path / "plain.pt2")
    marker = tmp_path / "pickle_ran"

    def evil_inputs(name: str, data: bytes) -> bytes:
        if "/data/sample_inputs/" not in name:
            return data
        buffer = io.BytesIO()
        torch.save(((Marker(marker),), {}), buffer)
        return buffer.getvalue()

    evil = rewrite_archive(plain, tmp_path / "evil.pt2", evil_inputs)
    result = sia("attack", evil, "--images", faces / "images", "--out", tmp_path / "run", *FAST)
    assert_fails(result, 2, "sample_inputs", "pickle", "--trust-pickle")
    assert not marker.exists()

    weights = rewrite_archive(plain, tmp_path / "weights.pt2", pickled_weights(plain))
    result = sia("attack", weights, "--images", faces / "images", "--out", tmp_path / "run", *FAST)
    assert_fails(result, 2, "conv.weight", "model_weights_config.json", "pickle", "--trust-pickle")
    out = tmp_path / "trusted"
    result = sia("attack", weights, "--images", faces / "images", "--out", out, "--trust-pickle", *FAST)
    assert result.exit_code == 0, result.output
    plain_out = tmp_path / "plain_run"
    assert sia("attack", plain, "--images", faces / "images", "--out", plain_out, *FAST).exit_code == 0


# ----------------------------------------------------------------------------- train-gan


def test_second_train_gan_into_a_running_one_is_refused(six_faces, tmp_path):
    out = tmp_path / "gan"
    first = subprocess.Popen(gan_args(six_faces / "images", six_faces / "list_attr.txt", out, "--max-steps",
                                      "100000"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for_lines(out / "setting.txt", 1, first)
        second = sia(*gan_args(six_faces / "images", six_faces / "list_attr.txt", out, "--max-steps", "5")[3:])
        assert_fails(second, 2, "is writing to", str(out))
        assert first.poll() is None
    finally:
        first.kill()
        first.communicate()


def test_train_gan_with_a_truncated_image_names_it_before_training(six_faces, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(six_faces / "images", images)
    victim = sorted(images.glob("*.png"))[3]
    noise().save(victim)
    victim.write_bytes(victim.read_bytes()[:2000])
    out = tmp_path / "gan"
    result = sia(*gan_args(images, six_faces / "list_attr.txt", out, "--max-steps", "5")[3:])
    assert_fails(result, 2, f"cannot train on {victim.name}", "truncated")
    assert not (out / "setting.txt").exists() and not (out / "checkpoint").exists()


# ----------------------------------------------------------------------------- printing


def test_paths_are_printed_as_given_not_read_as_markup(faces, tmp_path):
    out = tmp_path / "exp[lr=0.1]"
    result = sia("attack", MODEL, "--images", faces / "images", "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stdout
    synth_out = tmp_path / "faces[v2]"
    result = sia("synth", synth_out, "--n", "2", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "faces[v2]" in "".join(line.strip() for line in result.stdout.splitlines())  # the title may wrap
