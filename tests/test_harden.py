"""`sia harden`: fine-tuning on semantic adversaries, measured against the truth.

A classifier of Mustache trained where Eyeglasses goes with Mustache 99% of the time reads
Eyeglasses; the synthetic renderer redraws held-out faces with one attribute flipped, so the
true effect of Eyeglasses on the model can be measured before and after hardening.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from sia_cli.cli import app
from sia_cli.engine.attack import AttackSettings
from sia_cli.errors import SiaError
from sia_cli.inputs.faces import ATTRIBUTES
from sia_cli.inputs.synth import make_dataset
from sia_cli.jobs.harden import HardenConfig, HardenPlan, harden, schedule
from sia_cli.jobs.harden_eval import EVAL_METHODS
from sia_cli.measures.validity import bank_effects, counterfactual_bank
from sia_cli.runs.files import file_sha256
from sia_cli.targets import load_target

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script/save are deprecated
CONFOUNDED = (("Mustache", "Eyeglasses", 0.99),)
# Ten attack steps whose attribute step (0.05) lets an attribute cross 0.5 within them; the
# pixel step saturates at --eps anyway.
FAST_ATTACK = ["--steps", "10", "--step-size", "0.05"]


def sia(*args):
    return CliRunner().invoke(app, [*map(str, args)], env={"COLUMNS": "200"})


def examples():
    sys.path.insert(0, str(EXAMPLES))
    import measure_validity as mv  # the validity study's small models, reused as is
    import train_targets as tt

    return mv, tt


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """The confounded classifier, confounded training faces, held-out faces and a counterfactual bank."""
    mv, tt = examples()
    root = tmp_path_factory.mktemp("harden")
    data = tt._dataset(root / "train-model", 600, 4100, CONFOUNDED)
    images, labels = tt.load_folder(data)
    torch.manual_seed(0)
    model = mv.ARCHS["mlp"]()
    tt.fit(model, images, labels["Mustache"].unsqueeze(1), F.binary_cross_entropy_with_logits, 5, seed=7)
    path = root / "mustache.pt"
    tt.save(model, path, tt.classifier_yaml("Mustache") + "output: logits\n")
    make_dataset(root / "hard", 128, seed=4200, size=64, correlations=CONFOUNDED)
    make_dataset(root / "eval", 8, seed=4300, size=64)
    make_dataset(root / "probe", 3, seed=4400, size=64)
    return {"root": root, "model": path, "hard": root / "hard", "eval": root / "eval", "probe": root / "probe",
            "bank": counterfactual_bank(9301, 40, 64)}


def true_effects(path: Path, bank: torch.Tensor) -> dict[str, float]:
    return dict(zip(ATTRIBUTES, bank_effects(load_target(path), bank).mean(axis=0).tolist()))


@pytest.fixture(scope="module")
def hardened(planted) -> tuple:
    """Counterfactual training (labels: the model's own predictions) through the CLI."""
    out = planted["root"] / "out"
    result = sia("harden", planted["model"], "--images", planted["hard"] / "images", "--attrs-file",
                 planted["hard"] / "list_attr.txt", "--out", out, "--protect", "Mustache", *FAST_ATTACK,
                 "--epochs", "6", "--lr", "1e-3", "--batch-size", "32", "--eval-images", planted["eval"] / "images",
                 "--eval-attrs-file", planted["eval"] / "list_attr.txt", "--eval-steps", "2", "--no-progress")
    return result, out


def test_hardening_lowers_the_planted_confounders_true_effect(planted, hardened):
    result, out = hardened
    assert result.exit_code == 0, result.output
    before = true_effects(planted["model"], planted["bank"])
    after = true_effects(out / "model.pt", planted["bank"])
    print({name: (round(before[name], 3), round(after[name], 3)) for name in ("Eyeglasses", "Mustache")})
    assert max(before, key=before.get) == "Eyeglasses"  # the model reads the confounder
    assert after["Eyeglasses"] < 0.8 * before["Eyeglasses"]


def test_the_hardened_model_is_torchscript_with_its_settings_and_the_input_is_untouched(planted, hardened):
    _, out = hardened
    original = load_target(planted["model"])
    model = load_target(out / "model.pt")
    assert model.format == "torchscript" and model.kind == "binary"
    assert model.class_names == original.class_names and model.mean == original.mean  # sia.yaml carried over
    faces = torch.rand(4, 3, 64, 64) * 2 - 1
    assert not torch.allclose(model(faces), original(faces))
    summary = json.loads((out / "hardening.json").read_text())
    assert summary["hardened_model"] == str(out / "model.pt")
    assert summary["before"]["model_sha256"] == file_sha256(planted["model"])  # never overwritten


def test_the_hardened_model_runs_in_sia_diagnose(planted, hardened):
    _, out = hardened
    result = sia("diagnose", out / "model.pt", "--images", planted["eval"] / "images", "--attrs-file",
                 planted["eval"] / "list_attr.txt", "--steps", "2", "--out", planted["root"] / "again", "--no-progress")
    assert result.exit_code == 0, result.output
    assert json.loads((planted["root"] / "again" / "report.json").read_text())["complete"] is True


def test_the_report_has_table_4_and_table_5_before_and_after(hardened):
    result, out = hardened
    summary = json.loads((out / "hardening.json").read_text())
    assert summary["eval_eps"] == ["1.5/255", "4/255"]
    for side in ("before", "after"):
        figures = summary[side]
        assert set(figures["accuracy_under_attack"]) == set(EVAL_METHODS)
        for method in EVAL_METHODS:
            for eps in summary["eval_eps"]:
                assert 0 <= figures["accuracy_under_attack"][method][eps] <= 1
        assert figures["sdar"] is not None and figures["clean_accuracy"] is None  # no --eval-labels
        assert set(figures["sensitivity"]) == set(ATTRIBUTES) - {"Mustache"}
        assert (out / side / "diagnosis" / "report.json").is_file()
    assert summary["labels"] == "the model's own predictions before hardening"
    page = (out / "hardening.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "accuracy under SIA, eps 4/255" in page
    assert "SDAR" in result.output and "hardened model:" in result.output


def test_a_finished_hardening_is_refused_without_force(planted, hardened):
    _, out = hardened
    result = sia("harden", planted["model"], "--images", planted["hard"] / "images", "--out", out, "--no-progress")
    assert result.exit_code == 2 and "finished hardening" in result.stderr and "--force" in result.stderr


# ---------------------------------------------------------------- resume, offline, formats


def small(planted, out: Path, **changes) -> HardenConfig:
    values = dict(model=planted["model"], images=planted["eval"] / "images", attrs_file=planted["eval"] / "list_attr.txt",
                  out=out, protect=("Mustache",), settings=AttackSettings(steps=2, step_size=0.05), epochs=2,
                  lr=1e-3, batch_size=4, save_every=1)
    values.update(changes)
    return HardenConfig(**values)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_target(path).model.state_dict().items()}


def test_ctrl_c_keeps_the_last_checkpoint_and_a_rerun_ends_with_the_same_weights(planted, tmp_path, monkeypatch):
    harden(small(planted, tmp_path / "whole"))
    calls = []
    real = HardenPlan.train_step

    def interrupt_third(self, context, step):
        calls.append(step.number)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, context, step)

    monkeypatch.setattr(HardenPlan, "train_step", interrupt_third)
    with pytest.raises(SiaError, match="interrupted after 2 of 4") as caught:
        harden(small(planted, tmp_path / "cut"))
    assert caught.value.exit_code == 130
    training = json.loads((tmp_path / "cut" / "training.json").read_text())
    assert training["complete"] is False and training["steps"] == 2
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoint").iterdir()) == ["step-0000001.pt", "step-0000002.pt"]
    monkeypatch.setattr(HardenPlan, "train_step", real)
    resumed = harden(small(planted, tmp_path / "cut"))
    assert resumed["training"]["resumed_from"] == 2
    one, two = weights(tmp_path / "whole" / "model.pt"), weights(tmp_path / "cut" / "model.pt")
    assert all(torch.allclose(one[k], two[k], atol=1e-6) for k in one)


def test_force_redoes_a_hardening_and_keeps_its_new_before_report(planted, tmp_path):
    config = small(planted, tmp_path / "f", epochs=1, eval_images=planted["probe"] / "images",
                   eval_attrs_file=planted["probe"] / "list_attr.txt", eval_steps=1)
    harden(config)
    with pytest.raises(SiaError, match="finished hardening"):
        harden(config)
    summary = harden(replace(config, force=True))
    assert summary["complete"] and summary["training"]["resumed_from"] == 0
    for side in ("before", "after"):
        assert json.loads((tmp_path / "f" / side / "diagnosis" / "report.json").read_text())["complete"]


def test_offline_hardening_trains_on_an_augmentation_set(planted, tmp_path):
    augmented = tmp_path / "aug"
    result = sia("augment", planted["model"], "--images", planted["eval"] / "images", "--attrs-file",
                 planted["eval"] / "list_attr.txt", "--out", augmented, "--steps", "2", "--no-progress")
    assert result.exit_code == 0, result.output
    summary = harden(small(planted, tmp_path / "off", adversaries=augmented, epochs=1))
    assert summary["mode"] == "offline (--adversaries)"
    assert not all(torch.equal(a, b) for a, b in zip(weights(planted["model"]).values(),
                                                     weights(tmp_path / "off" / "model.pt").values()))


def test_an_exported_program_is_hardened_and_exported_again(planted, tmp_path):
    mv, _ = examples()
    original = load_target(planted["model"])
    module = mv.ARCHS["mlp"]()
    module.load_state_dict(original.model.state_dict())
    module.eval()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(module, (torch.rand(2, 3, 64, 64),), dynamic_shapes=({0: batch},))
    source = tmp_path / "mustache.pt2"
    yaml_text = "task: binary\noutput: logits\nmean: [0.5, 0.5, 0.5]\nstd: [0.5, 0.5, 0.5]\nclass_names: ['no', 'yes']\n"
    torch.export.save(program, str(source), extra_files={"sia.yaml": yaml_text})
    harden(small(planted, tmp_path / "pt2", model=source, epochs=1))
    hardened = load_target(tmp_path / "pt2" / "model.pt2")
    assert hardened.format == "export" and hardened.class_names == ["no", "yes"]
    faces = torch.rand(3, 3, 64, 64) * 2 - 1  # a batch size the export never saw: the batch stays dynamic
    assert not torch.allclose(hardened(faces), load_target(source)(faces))


@pytest.mark.parametrize("args, message", [
    (["--mix", "2"], "--mix must be within [0, 1]"),
    (["--method", "sia,pgd"], "--method takes one method"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--lr", "nan"], "--lr must be a finite positive number"),
])
def test_bad_options_are_one_line_before_any_work(planted, tmp_path, args, message):
    out = tmp_path / "bad"
    result = sia("harden", planted["model"], "--images", planted["eval"] / "images", "--out", out, *args)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not out.exists()


def test_a_hardening_without_eval_images_says_it_compared_nothing(planted, tmp_path):
    result = sia("harden", planted["model"], "--images", planted["eval"] / "images", "--out", tmp_path / "o",
                 "--steps", "2", "--epochs", "1", "--no-progress")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Not compared before and after: pass --eval-images" in text and "trained " in text
    assert "clean accuracy" not in text  # no table of dashes
    assert (tmp_path / "o" / "model.pt").is_file()


def test_eval_images_must_be_held_out(planted, tmp_path):
    result = sia("harden", planted["model"], "--images", planted["eval"] / "images", "--out", tmp_path / "o",
                 "--eval-images", planted["eval"] / "images")
    assert result.exit_code == 2 and "held-out" in result.stderr


def test_schedule_covers_every_image_once_per_epoch_whatever_the_batch():
    files = [f"{i}.png" for i in range(10)]
    steps = schedule(files, 4, 3, seed=5)
    assert [s.number for s in steps] == list(range(1, 10))
    for epoch in range(3):
        seen = [f for s in steps if s.epoch == epoch for f in s.files]
        assert sorted(seen) == sorted(files)
    assert schedule(files, 4, 3, seed=5) == steps and schedule(files, 4, 3, seed=6) != steps


def test_an_evaluation_with_other_eval_settings_is_redone_not_reused(planted, tmp_path):
    """A resumed hardening may change --eval-*: before/ must then describe the new faces, or
    before and after would compare different images."""
    from sia_cli.jobs.harden_eval import evaluate
    from sia_cli.runs.distributed import World

    folder = tmp_path / "before"
    first = small(planted, tmp_path, eval_images=planted["probe"] / "images",
                  eval_attrs_file=planted["probe"] / "list_attr.txt", eval_steps=1)
    assert evaluate(first, planted["model"], folder, World(), lambda *_: None)["images"] == 3
    made = (folder / "diagnosis" / "report.json").stat().st_mtime_ns
    assert evaluate(first, planted["model"], folder, World(), lambda *_: None)["images"] == 3
    assert (folder / "diagnosis" / "report.json").stat().st_mtime_ns == made  # the same settings: read, not redone
    second = replace(first, eval_images=planted["eval"] / "images", eval_attrs_file=planted["eval"] / "list_attr.txt")
    figures = evaluate(second, planted["model"], folder, World(), lambda *_: None)
    assert figures["images"] == 8
    attack = json.loads((folder / "attack-eps1.5" / "sia" / "report.json").read_text())
    assert len(attack["images"]) == 8


def test_a_diverged_hardening_is_an_error_not_a_model(planted, tmp_path, monkeypatch):
    """A training that kills the model (here every weight zeroed after each step, as a diverged
    run can leave it: its output no longer depends on the image) must be an error, not a model
    that every later command would refuse."""
    real = HardenPlan.train_step

    def diverge(self, context, step):
        losses = real(self, context, step)
        with torch.no_grad():
            for parameter in context.inputs.target.model.parameters():
                parameter.zero_()
        return losses

    monkeypatch.setattr(HardenPlan, "train_step", diverge)
    out = tmp_path / "diverged"
    with pytest.raises(SiaError, match="fails the model checks") as caught:
        harden(small(planted, out, epochs=1))
    assert "lower --lr" in str(caught.value)
    training = json.loads((out / "training.json").read_text())
    assert training["unusable"] and (out / "model.pt").is_file()  # kept, for a look, but never reported on
    assert not (out / "hardening.json").exists()
    with pytest.raises(SiaError, match="--force"):
        harden(small(planted, out, epochs=1))


class LogitAndFeatures(torch.nn.Module):
    """A binary classifier that returns (logit, features), as many detectors and multi-head models do."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logit = self.inner(x)
        return logit, x.mean(dim=(2, 3))


def test_a_hardened_model_keeps_the_options_it_was_loaded_with(planted, tmp_path):
    """--output-key given on the command line travels into the hardened file's sia.yaml: the
    hardened model is diagnosed without repeating it, and reads the same outputs."""
    mv, _ = examples()
    inner = mv.ARCHS["mlp"]()
    inner.load_state_dict(load_target(planted["model"]).model.state_dict())
    source = tmp_path / "tuple.pt"
    torch.jit.save(torch.jit.script(LogitAndFeatures(inner).eval()), str(source), _extra_files={"sia.yaml": ""})
    out = tmp_path / "hardened"
    result = sia("harden", source, "--images", planted["eval"] / "images", "--attrs-file", planted["eval"] / "list_attr.txt",
                 "--out", out, "--protect", "Mustache", "--steps", "2", "--step-size", "0.05", "--epochs", "1",
                 "--batch-size", "4", "--output-key", "0", "--output", "logits", "--no-progress")
    assert result.exit_code == 0, result.output
    given = load_target(out / "model.pt", output_key=0, output="logits")
    alone = load_target(out / "model.pt")  # nothing repeated
    assert alone.output_key == 0 and alone.kind == "binary" and alone.output_is_probability is False
    faces = torch.rand(3, 3, 64, 64) * 2 - 1
    assert torch.equal(alone(faces), given(faces))
    diagnosed = sia("diagnose", out / "model.pt", "--images", planted["eval"] / "images", "--attrs-file",
                    planted["eval"] / "list_attr.txt", "--protect", "Mustache", "--steps", "2", "--bootstrap", "5",
                    "--out", tmp_path / "after", "--no-progress")
    assert diagnosed.exit_code == 0, diagnosed.output
