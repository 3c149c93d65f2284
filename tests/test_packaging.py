"""The wheel: built from the package alone, it carries the built-in registry and the default
backbone, and `sia` run from it (no source checkout on the path, another working directory,
no network) finds them; user entries from `$SIA_WEIGHTS` are added on top."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

pytest.importorskip("setuptools", minversion="70.1")  # `pip wheel --no-build-isolation` needs it (the test extra)

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "examples" / "targets" / "mustache_confounded.pt"
BACKBONE_FILES = [
    "sia_cli/backbone/weights.yaml",
    "sia_cli/backbone/builtin/synth-faces-64/setting.txt",
    "sia_cli/backbone/builtin/synth-faces-64/card.json",
    "sia_cli/backbone/builtin/synth-faces-64/checkpoint/weights.33000.pth",
]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built offline from a copy of the project files (the shared tree gets no build/)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "sia_cli", src / "sia_cli", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(root / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (built,) = (root / "dist").glob("sia_cli-*.whl")
    return built


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> Path:
    """The wheel unpacked as an install would lay it out in site-packages."""
    folder = tmp_path_factory.mktemp("site-packages")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(folder)
    return folder


def run_python(code: str, site: Path, cwd: Path, **env) -> subprocess.CompletedProcess:
    """`python -c code` with only the unpacked wheel ahead of the interpreter's own packages."""
    environ = {k: v for k, v in os.environ.items() if k not in ("SIA_WEIGHTS", "PYTHONPATH")}
    environ.update(PYTHONPATH=str(site), XDG_CONFIG_HOME=str(cwd / "config"), SIA_CACHE=str(cwd / "cache"),
                   **{k: str(v) for k, v in env.items()})
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=environ, capture_output=True, text=True,
                          timeout=600)


def test_wheel_holds_the_builtin_registry_and_default_backbone(wheel):
    with zipfile.ZipFile(wheel) as archive:
        sizes = {info.filename: info.file_size for info in archive.infolist()}
    missing = [name for name in BACKBONE_FILES if name not in sizes]
    assert not missing, missing
    assert not [name for name in sizes if not name.startswith(("sia_cli/", "sia_cli-"))], sorted(sizes)
    assert max(sizes.values()) < 5_000_000
    # The packaged registry is the one in the source tree, byte for byte.
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read("sia_cli/backbone/weights.yaml") == (REPO / "sia_cli" / "backbone" / "weights.yaml").read_bytes()


def test_installed_package_resolves_builtins_and_user_entries_outside_the_checkout(site, tmp_path, make_experiment,
                                                                                  tiny_setting):
    make_experiment(tmp_path / "gans" / "mine", epochs=(5,))
    arch = {k: v for k, v in tiny_setting.items() if k not in ("attrs", "n_attrs", "img_size", "thres_int")}
    user = tmp_path / "my-weights.yaml"
    user.write_text(yaml.safe_dump({"mine": {"attributes": tiny_setting["attrs"], "img_size": 32, "arch": arch,
                                             "source": {"path": "gans/mine"}}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = """
import json, sys
import sia_cli
from sia_cli.backbone import registry
backbone = registry.load_backbone(None)
print(json.dumps({"package": sia_cli.__file__, "checkout": str(registry.checkout_registry()),
                  "known": sorted(registry.load_registry()), "default": backbone.info.path,
                  "attributes": len(backbone.attributes), "critic": backbone.discriminator is not None,
                  "mine": registry.load_backbone("mine").info.path}))
"""
    done = run_python(code, site, elsewhere, SIA_WEIGHTS=user)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(seen["package"]).is_relative_to(site), seen["package"]  # not the checkout's (editable) copy
    assert seen["checkout"] == "None"
    assert seen["known"] == ["attgan-celeba-128", "mine", "synth-faces-64"]
    assert Path(seen["default"]).is_relative_to(site) and seen["default"].endswith("weights.33000.pth")
    assert seen["attributes"] == 15 and seen["critic"]
    assert seen["mine"] == str(tmp_path / "gans" / "mine" / "checkpoint" / "weights.5.pth")


@pytest.mark.slow
def test_installed_cli_diagnoses_from_another_directory(site, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    wrapper = "import sys; from sia_cli.cli import main; sys.argv = ['sia'] + {args!r}; main()"  # the `sia` script
    synth = run_python(wrapper.format(args=["synth", "faces", "--n", "2", "--seed", "5", "--no-progress"]),
                       site, elsewhere)
    assert synth.returncode == 0, synth.stderr
    diagnose = run_python(wrapper.format(args=["diagnose", str(TARGET), "--images", "faces/images", "--steps", "2",
                                               "--out", "out", "--no-progress"]), site, elsewhere)
    assert diagnose.returncode == 0, diagnose.stdout + diagnose.stderr
    report = json.loads((elsewhere / "out" / "report.json").read_text())
    assert report["backbone"]["name"] == "synth-faces-64"
    assert Path(report["backbone"]["path"]).is_relative_to(site)


def test_no_source_file_of_the_package_is_ignored_by_git():
    """An ignore pattern (`runs/`, `target/`) that matches a package folder drops its new files from
    every commit without a word; the checkout then imports what a clone cannot."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    files = [str(p.relative_to(REPO)) for p in (REPO / "sia_cli").rglob("*.py") if "__pycache__" not in p.parts]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *files], cwd=REPO, capture_output=True, text=True)
    assert ignored.stdout.strip() == "", ignored.stdout
