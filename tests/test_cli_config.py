"""`--config FILE.yaml` on every command, and `sia synth --out`."""

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from sia_cli.cli import app
from sia_cli.inputs.synth import make_dataset

MODEL = Path(__file__).parents[1] / "examples" / "targets" / "mustache_confounded.pt"
COMMANDS = ["diagnose", "attack", "augment", "sdar", "synth", "train-gan"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_accepts_config(command):
    result = CliRunner().invoke(app, [command, "--help"])
    assert "--config" in result.output


def test_config_values_are_defaults_and_command_line_wins(tmp_path):
    faces = tmp_path / "faces"
    make_dataset(faces, 4, seed=3, size=64)
    config = tmp_path / "run.yaml"
    config.write_text("steps: 2\nbatch-size: 3\nprotect: [Mustache]\nbootstrap: 0\n")
    result = CliRunner().invoke(app, [
        "diagnose", str(MODEL), "--images", str(faces / "images"),
        "--attrs-file", str(faces / "list_attr.txt"), "--config", str(config), "--steps", "1",
        "--out", str(tmp_path / "out"), "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["settings"]["settings"]["steps"] == 1  # command line over the file
    assert report["settings"]["batch_size"] == 3 and report["protected"] == ["Mustache"]
    assert report["intervals"] == {}


def test_config_values_take_the_command_line_conversions(tmp_path, monkeypatch):
    """A value from the file is the option's text: fractions, lists, `auto` and triples read alike."""
    seen = []

    def keep(config, progress=None):
        seen.append(config)
        raise typer.Exit(0)

    monkeypatch.setattr("sia_cli.cli.attack.run_attack", keep)
    config = tmp_path / "run.yaml"
    config.write_text("eps: 2/255\nmethod: sia,pgd\nprotect: [Bangs, 'Smiling,Young']\nbatch-size: auto\n"
                      "mean: 0.5\neye-indices: 0,1\ndevice: cpu\n")
    result = CliRunner().invoke(app, ["attack", str(MODEL), "--images", "x", "--config", str(config)])
    assert result.exit_code == 0, result.output
    built = seen[0]
    assert built.settings.eps == 2 / 255 and built.methods == ("sia", "pgd") and built.batch_size == "auto"
    assert built.protect == ("Bangs", "Smiling", "Young") and built.model_options.mean == (0.5, 0.5, 0.5)
    assert built.model_options.eye_indices == (0, 1) and built.device == "cpu"


def test_unknown_config_key_is_refused(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("stepz: 3\n")
    result = CliRunner().invoke(app, ["synth", str(tmp_path / "d"), "--config", str(config)])
    assert result.exit_code == 2 and "stepz" in result.output
    assert not (tmp_path / "d").exists()


def test_synth_takes_out_as_option_or_argument_not_both(tmp_path):
    runner = CliRunner()
    assert runner.invoke(app, ["synth", "--n", "2", "--out", str(tmp_path / "a"), "--no-progress"]).exit_code == 0
    assert (tmp_path / "a" / "list_attr.txt").is_file()
    both = runner.invoke(app, ["synth", str(tmp_path / "b"), "--out", str(tmp_path / "c"), "--n", "2"])
    assert both.exit_code == 2
