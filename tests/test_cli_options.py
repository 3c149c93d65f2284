"""`sia_cli.cli.options.build`: every command's options become its engine config through one
builder, with the option defaults read from the engine dataclasses.

The commands run up to the engine call, which is replaced by one that keeps the config: no
model is loaded, so these tests take well under a second each (but a subprocess)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from sia_cli.backbone.training import TrainConfig
from sia_cli.cli import app
from sia_cli.cli import options as o
from sia_cli.engine.attack import AttackSettings
from sia_cli.jobs.augment import AugmentConfig
from sia_cli.jobs.diagnose import DiagnoseConfig
from sia_cli.runs.inputs import RunConfig
from sia_cli.targets.options import ModelOptions

MODEL = "model.pt"  # never loaded: the engine call is replaced

# command -> (module, its engine function's name there, config class)
COMMANDS = {
    "attack": ("sia_cli.cli.attack", "run_attack", RunConfig),
    "diagnose": ("sia_cli.cli.diagnose", "run_diagnosis", DiagnoseConfig),
    "augment": ("sia_cli.cli.augment", "run_augment", AugmentConfig),
    "sdar": ("sia_cli.cli.sdar", "diagnose", DiagnoseConfig),
    "train-gan": ("sia_cli.cli.train_gan", "run_training", TrainConfig),
}
# Parameters that are no config field: how a command prints, gates or reads its options.
NOT_CONFIG = {"no_progress", "config_file"}
SDAR_GATE = {"max_sdar", "baseline", "allow_unfit", "allow_few_images"}

TARGET_ARGS = [
    "--gan", "g", "--attrs-file", "a.txt", "--protect-eps", "0.01", "--steps", "7", "--eps", "2/255",
    "--step-size", "0.5/255", "--eps-attr", "0.5", "--seed", "3", "--batch-size", "auto", "--compile",
    "--device", "cpu", "--amp", "bf16", "--task", "multilabel", "--input-size", "32", "--mean", "0.5",
    "--std", "0.1,0.2,0.3", "--labels", "l.csv", "--output-key", "logits", "--output", "probability",
    "--label", "Smiling", "--channels", "1", "--margin", "2.5", "--eye-indices", "0,1", "--landmark-layout", "xxyy",
    "--trust-pickle",
    "--no-progress",
]
TARGET_FIELDS = dict(
    model=Path(MODEL), images=Path("imgs"), out=Path("o"), gan="g", attrs_file=Path("a.txt"),
    batch_size="auto", compile=True, device="cpu", seed=3, labels=Path("l.csv"),
    model_options=ModelOptions(
        task="multilabel", input_size=32, mean=(0.5, 0.5, 0.5), std=(0.1, 0.2, 0.3), output_key="logits",
        output="probability", label="Smiling", channels=1, margin=2.5, eye_indices=(0, 1), landmark_layout="xxyy",
        trust_pickle=True),
)
SETTINGS = dict(steps=7, eps=2 / 255, step_size=0.5 / 255, eps_attr=0.5, protect_eps=0.01, amp="bf16")


@pytest.fixture
def captured(monkeypatch):
    """Run `sia ARGS` up to the engine call; return (result, the config it would have run)."""

    def run(args: list[str]):
        command = args[0]
        module, engine, _ = COMMANDS[command]
        seen = []

        def keep(config, progress=None):
            seen.append(config)
            raise typer.Exit(0)

        monkeypatch.setattr(f"{module}.{engine}", keep)
        monkeypatch.setattr(sys, "argv", ["sia", *args])
        result = CliRunner().invoke(app, args)
        return result, (seen[0] if seen else None)

    return run


def changed_fields(config, baseline) -> set[str]:
    return {f.name for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(baseline, f.name)}


# ----------------------------------------------------------------------------- every option reaches its field


def test_attack_options_fill_every_field(captured):
    args = ["attack", MODEL, "--images", "imgs", "--out", "o", "--method", "sia,pgd", "--protect", "Bangs",
            "--protect", "Smiling,Eyeglasses", "--nme-threshold", "0.2", "--force", "--keep-lost", "--align", *TARGET_ARGS]
    result, config = captured(args)
    assert result.exit_code == 0, result.output
    expected = RunConfig(
        **TARGET_FIELDS, methods=("sia", "pgd"), protect=("Bangs", "Smiling", "Eyeglasses"),
        settings=AttackSettings(**SETTINGS, nme_threshold=0.2), force=True, keep_lost=True, align=True,
        command=" ".join(["sia", *args]),
    )
    assert config == expected
    # Every field the command sets differs from its default: none is left unreachable.
    assert changed_fields(config, RunConfig(Path("m0"), Path("i0"), Path("o0"))) == (
        {f.name for f in dataclasses.fields(RunConfig)} - {"device"})  # cpu: the engine's default too


def test_diagnose_options_fill_every_field(captured):
    args = ["diagnose", MODEL, "--images", "imgs", "--out", "o", "--protect", "Bangs", "--mode", "single",
            "--top-k", "3", "--group-by", "Male,Young", "--bootstrap", "0", "--nme-threshold", "0.2", "--force",
            "--keep-lost", "--align", *TARGET_ARGS]
    result, config = captured(args)
    assert result.exit_code == 0, result.output
    assert config == DiagnoseConfig(
        **TARGET_FIELDS, protect=("Bangs",), settings=AttackSettings(**SETTINGS, nme_threshold=0.2),
        force=True, keep_lost=True, align=True, command=" ".join(["sia", *args]),
        mode="single", top_k=3, group_by=("Male", "Young"), bootstrap=0,
    )


def test_augment_options_fill_every_field(captured):
    args = ["augment", MODEL, "--images", "imgs", "--out", "o", "--count", "5", "--class", "1", "--jitter",
            "0.1", "--no-protect", "--force", "--align", *TARGET_ARGS]
    result, config = captured(args)
    assert result.exit_code == 0, result.output
    assert config == AugmentConfig(
        **TARGET_FIELDS, settings=AttackSettings(**SETTINGS), force=True, align=True, command=" ".join(["sia", *args]),
        n=5, only_class="1", auto_protect=False, jitter=0.1,
    )


def test_sdar_with_a_model_takes_the_same_model_and_attack_options(captured):
    args = ["sdar", MODEL, "--images", "imgs", "--out", "o", "--nme-threshold", "0.2", "--force", "--keep-lost",
            "--align", "--max", "0.1", *TARGET_ARGS]
    result, config = captured(args)
    assert result.exit_code == 0, result.output
    assert config == DiagnoseConfig(
        **TARGET_FIELDS, settings=AttackSettings(**SETTINGS, nme_threshold=0.2), force=True, keep_lost=True,
        align=True, command=" ".join(["sia", *args]),
    )


def test_every_command_that_loads_a_model_lists_the_same_model_options():
    from sia_cli.cli.options import MODEL_OPTIONS

    runner = CliRunner()
    wanted = {"--" + name.replace("_", "-") for name, _, _ in MODEL_OPTIONS}
    for command in ("attack", "diagnose", "augment", "harden", "sdar"):
        text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        listed = set(re.findall(r"(--[a-z][a-z-]+)", text))
        assert wanted <= listed, (command, wanted - listed)


def test_train_gan_options_fill_every_field(captured):
    args = ["train-gan", "--images", "imgs", "--attrs", "a.txt", "--out", "o", "--attributes", "Bangs, Smiling",
            "--img-size", "32", "--batch-size", "8", "--max-steps", "9", "--n-d", "2", "--enc-dim", "8",
            "--dec-dim", "12", "--layers", "3", "--dis-dim", "10", "--dis-fc-dim", "20", "--shortcut-layers", "0",
            "--inject-layers", "0", "--lr", "0.001", "--sample-every", "3", "--save-every", "4", "--force",
            "--refine-layers", "1", "--detail-layers", "1", "--detail-only", "--detail-gate", "0.03", "--change-focus", "2", "--device", "cpu", "--seed", "6", "--workers", "2", "--preload", "--time-limit", "1.5", "--judge",
            "j.pt", "--no-progress"]
    result, config = captured(args)
    assert result.exit_code == 0, result.output
    assert config == TrainConfig(
        images=Path("imgs"), attrs_file=Path("a.txt"), attributes=["Bangs", "Smiling"], out=Path("o"),
        img_size=32, batch_size=8, max_steps=9, n_d=2, enc_dim=8, dec_dim=12, enc_layers=3, dec_layers=3,
        dis_layers=3, dis_dim=10, dis_fc_dim=20, shortcut_layers=0, inject_layers=0, lr=0.001, sample_every=3,
        save_every=4, force=True, refine_layers=1, detail_layers=1, detail_only=True, detail_gate=0.03, change_focus=2.0, device="cpu", seed=6, workers=2, preload=True, time_limit=90.0,
        judge=Path("j.pt"),
    )


def test_train_gan_without_attributes_takes_all_of_the_attrs_file(captured, tmp_path):
    attrs = tmp_path / "list_attr.txt"
    attrs.write_text("1\nBangs Eyeglasses Smiling\na.png 1 -1 1\n")
    result, config = captured(["train-gan", "--images", "imgs", "--attrs", str(attrs), "--out", "o",
                               "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert config.attributes == ["Bangs", "Eyeglasses", "Smiling"]
    assert config.time_limit is None  # --time-limit 0: no limit


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_of_a_command_fills_a_config_field(command):
    """An option the builder reads from no field would be parsed and silently dropped."""
    module, _, config_class = COMMANDS[command]
    function = getattr(sys.modules[module], module.rsplit(".", 1)[1])
    parameters = set(inspect.signature(function).parameters)
    read = {name for options in o.sources(config_class, parameters).values() for name in options}
    expected_rest = NOT_CONFIG | (SDAR_GATE if command == "sdar" else set())
    assert parameters - read == expected_rest


def test_sources_name_the_nested_settings_fields():
    found = o.sources(RunConfig, {"steps", "eps", "method", "device"})
    assert found["settings.steps"] == ("steps",) and found["settings.eps"] == ("eps",)
    assert found["methods"] == ("method",) and found["command"] == ()


# ----------------------------------------------------------------------------- defaults from the dataclasses


@pytest.mark.parametrize("command", COMMANDS)
def test_all_default_options_build_the_engine_defaults(command, captured, tmp_path):
    """With no option given, the config is the dataclass's own defaults (but the device the
    command line picks and the command it records)."""
    attrs = tmp_path / "list_attr.txt"
    attrs.write_text("1\nBangs Smiling\na.png 1 -1\n")
    required = {
        "attack": [MODEL, "--images", "imgs"], "diagnose": [MODEL, "--images", "imgs"],
        "augment": [MODEL, "--images", "imgs", "--out", "o"], "sdar": [MODEL, "--images", "imgs"],
        "train-gan": ["--images", "imgs", "--attrs", str(attrs), "--out", "o"],
    }[command]
    result, config = captured([command, *required])
    assert result.exit_code == 0, result.output
    required = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    # The device is the machine's pick (auto), not the engine's cpu; the command line is recorded.
    assert changed_fields(config, type(config)(**required)) <= {"device", "command"}


def test_default_reads_plain_and_factory_defaults():
    assert o.default(RunConfig, "batch_size") == RunConfig(Path(), Path(), Path()).batch_size
    assert o.default(RunConfig, "methods") == RunConfig(Path(), Path(), Path()).methods
    assert o.default(RunConfig, "settings") == AttackSettings()
    with pytest.raises(ValueError, match="no default"):
        o.default(RunConfig, "model")
    with pytest.raises(ValueError, match="no field"):
        o.default(RunConfig, "stepz")


@pytest.mark.parametrize("value, text", [(1.5 / 255, "1.5/255"), (0.25 / 255, "0.25/255"), (1.0, "1.0"),
                                         (0.3, "0.3"), (1 / 3, "85/255"), (1 / 7, repr(1 / 7))])
def test_fraction_text_reads_back_as_the_same_number(value, text):
    assert o.fraction_text(value) == text
    assert o.fraction(o.fraction_text(value)) == value


CHANGED_DEFAULTS = r'''
import json, sys
import typer
from typer.testing import CliRunner
from sia_cli.engine.attack import AttackSettings
from sia_cli.jobs.diagnose import DiagnoseConfig
from sia_cli.backbone.training import TrainConfig

AttackSettings.__dataclass_fields__["steps"].default = 7
AttackSettings.__dataclass_fields__["eps"].default = 2 / 255
DiagnoseConfig.__dataclass_fields__["top_k"].default = 9
TrainConfig.__dataclass_fields__["n_d"].default = 3

from sia_cli.cli import app
import sia_cli.cli.diagnose as command

seen = []
def keep(config, progress=None):
    seen.append(config)
    raise typer.Exit(0)
command.run_diagnosis = keep
runner = CliRunner()
env = {"COLUMNS": "250", "TERMINAL_WIDTH": "250"}
runner.invoke(app, ["diagnose", "m.pt", "--images", "x", "--device", "cpu"])
config = seen[0]
print(json.dumps({
    "diagnose": runner.invoke(app, ["diagnose", "--help"], env=env).output,
    "train": runner.invoke(app, ["train-gan", "--help"], env=env).output,
    "built": [config.settings.steps, config.settings.eps, config.top_k],
}))
'''


def test_a_default_changed_in_the_dataclass_shows_in_help_and_config():
    """The option defaults are read from the dataclasses when the commands are defined: a fresh
    interpreter whose dataclass defaults were changed first shows and uses the new ones."""
    run = subprocess.run([sys.executable, "-c", CHANGED_DEFAULTS], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parents[1])
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout.strip().splitlines()[-1])
    lines = {line.split()[1]: line for line in found["diagnose"].splitlines() if line[:1] == "│" and "--" in line}
    assert "[default: 7]" in lines["--steps"] and "[default: 2/255]" in lines["--eps"]
    assert "[default: 9]" in lines["--top-k"]
    assert any("--n-d" in line and "[default: 3]" in line for line in found["train"].splitlines())
    assert found["built"] == [7, 2 / 255, 9]


# ----------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("args, message", [
    (["attack", MODEL, "--images", "x", "--eps", "abc"], "'abc' is not a number or a fraction like 1.5/255"),
    (["attack", MODEL, "--images", "x", "--eps", "-1/255"],
     "--eps must be a finite non-negative number (got -0.00392156862745098)"),
    (["diagnose", MODEL, "--images", "x", "--steps", "0"], "--steps must be at least 1 (got 0)"),
    (["sdar", MODEL, "--images", "x", "--steps", "0"], "--steps must be at least 1 (got 0)"),
    (["diagnose", MODEL, "--images", "x", "--nme-threshold", "nan"],
     "--nme-threshold must be a finite non-negative number (got nan)"),
    (["augment", MODEL, "--images", "x", "--out", "o", "--protect-eps", "-1"],
     "--protect-eps must be a finite non-negative number (got -1.0)"),
    (["augment", MODEL, "--images", "x", "--out", "o", "--mean", "1,2"],
     "--mean takes 1 or 3 comma-separated numbers, got '1,2'"),
    (["attack", MODEL, "--images", "x", "--eye-indices", "a,b"],
     "--eye-indices takes two comma-separated point indices such as 0,1, got 'a,b'"),
    (["sdar", MODEL, "--images", "x", "--device", "nope"],
     "--device 'nope' is not a device name (cpu, cuda, cuda:N, auto)"),
    (["train-gan", "--images", "x", "--attrs", "a", "--out", "o", "--attributes", "A", "--device", "zz"],
     "--device 'zz' is not a device name (cpu, cuda, cuda:N, auto)"),
    (["attack", MODEL, "--images", "x", "--batch-size", "x"],
     "Invalid value for '--batch-size': 'x' is neither a whole number nor auto; see sia attack --help"),
])
def test_a_bad_value_is_one_error_line_before_any_work(args, message, captured):
    result, config = captured(args)
    assert config is None  # refused before the engine
    assert result.exit_code == 2
    assert result.stderr == f"error: {message}\n"
