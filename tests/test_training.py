"""`sia train-gan` end to end on tiny synthetic faces, and the WGAN-GP gradient penalty."""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sia_cli.backbone import registry
from sia_cli.backbone import trainer as trainer_module
from sia_cli.backbone import training
from sia_cli.backbone.attgan import Generator, GeneratorConfig, edited
from sia_cli.backbone.judging import edit_success, judge_accuracy
from sia_cli.backbone.trainer import gradient_penalty
from sia_cli.backbone.training import (
    Prefetched,
    TrainConfig,
    Trainer,
)
from sia_cli.jobs.train_gan import train_gan
from sia_cli.cli import app
from sia_cli.errors import SiaError
from sia_cli.inputs.images import LabelledImages, read_attributes
from sia_cli.inputs.synth import make_dataset
from sia_cli.runs.distributed import World

ATTRS = ["Bangs", "Eyeglasses", "Smiling"]


def train_args(data: Path, out: Path, *extra: str, attributes: str = ",".join(ATTRS), max_steps: int = 3) -> list[str]:
    return [
        "train-gan", "--images", str(data / "images"), "--attrs", str(data / "list_attr.txt"),
        "--attributes", attributes, "--img-size", "32", "--layers", "3", "--max-steps", str(max_steps),
        "--batch-size", "8", "--sample-every", "2", "--save-every", "2", "--out", str(out), "--no-progress",
        "--device", "cpu", *extra,
    ]


def run(args: list[str]):
    return CliRunner().invoke(app, args)


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("faces") / "d"
    make_dataset(folder, n=40, seed=0, size=32)
    return folder


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """One 3-step run shared by the tests; tests that change it work on a copy."""
    out = tmp_path_factory.mktemp("run") / "g"
    result = run(train_args(data, out))
    assert result.exit_code == 0, result.output
    return out


# ----------------------------------------------------------------------------- a run's files


def test_run_writes_setting_in_public_layout(trained):
    setting = json.loads((trained / "setting.txt").read_text())
    assert setting["attrs"] == ATTRS and setting["img_size"] == 32
    assert setting["enc_layers"] == setting["dec_layers"] == setting["dis_layers"] == 3


def test_run_writes_checkpoints_with_the_four_public_keys(trained):
    names = sorted(p.name for p in (trained / "checkpoint").glob("weights.*.pth"))
    assert names == ["weights.2.pth", "weights.3.pth"]  # every 2 steps, and the last step
    state = torch.load(trained / "checkpoint" / "weights.3.pth", weights_only=True)
    assert {"G", "D", "optim_G", "optim_D"} <= set(state)
    assert state["sia"]["step"] == 3


def test_run_writes_sample_grids_that_open(trained):
    grids = sorted((trained / "sample_training").glob("*.png"))
    assert [p.name for p in grids] == ["step_0000002.png", "step_0000003.png"]
    for grid in grids:
        with Image.open(grid) as image:
            image.load()
            assert image.width > 32 and image.height > 32


def test_trained_folder_loads_as_a_backbone(trained):
    backbone = registry.load_backbone(str(trained))
    assert backbone.attributes == ATTRS and backbone.img_size == 32
    assert backbone.info.path.endswith("weights.3.pth")
    with torch.no_grad():
        y = backbone(torch.zeros(2, 3, 32, 32), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]))
        p = backbone.predict_attributes(torch.zeros(1, 3, 32, 32))
    assert y.shape == (2, 3, 32, 32) and p.shape == (1, 3)


def test_finished_run_writes_a_card_with_domain_calibration(trained):
    card = json.loads((trained / "card.json").read_text())
    assert card["domain"]["images"] == 40 and card["domain"]["critic_margin_median"] is not None
    assert "edit_success" not in card  # no --judge: never measured, so no attribute is cleared
    assert registry.load_backbone(str(trained)).info.card == card


def test_judge_measures_edit_success_by_attribute_name(data, tmp_path):
    judge = Path(__file__).parents[1] / "examples" / "targets" / "attribute_judge.pt"
    out = tmp_path / "g"
    args = train_args(data, out, "--judge", str(judge), attributes="Eyeglasses,Bangs", max_steps=1)
    args[args.index("--img-size") + 1] = "64"
    result = run(args)
    assert result.exit_code == 0, result.output
    card = json.loads((out / "card.json").read_text())
    assert set(card["edit_success"]) == {"Eyeglasses", "Bangs"}
    assert all(0.0 <= v <= 1.0 for v in card["edit_success"].values())
    assert "judge attribute_judge.pt" in card["measured"]
    # The other way round, and the judge's own accuracy, beside it.
    for key in ("off_target_change", "off_target_change_mean", "clean_edit_success", "judge_accuracy"):
        assert set(card[key]) == {"Eyeglasses", "Bangs"} and all(0.0 <= v <= 1.0 for v in card[key].values()), key


def test_output_folder_with_brackets_is_printed_verbatim(data, tmp_path):
    # Rich would read `[/x]` as a closing tag and crash after a finished run.
    out = tmp_path / "run[/x]"
    result = run(train_args(data, out, max_steps=1))
    assert result.exit_code == 0, result.output
    assert f"checkpoint: {out / 'checkpoint' / 'weights.1.pth'}" in result.stdout.replace("\n", "")


def test_config_is_frozen_and_the_run_reports_the_device_it_chose(data, tmp_path):
    """The run keeps the device it settled on (under torchrun, this rank's GPU) to itself: the
    config a caller passed stays as given."""
    config = TrainConfig(
        images=data / "images", attrs_file=data / "list_attr.txt", attributes=ATTRS, out=tmp_path / "g",
        img_size=32, batch_size=8, max_steps=1, enc_layers=3, dec_layers=3, dis_layers=3,
    )
    as_given = dataclasses.replace(config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.device = "cuda"
    summary = train_gan(config)
    assert summary["steps"] == 1 and summary["device"] == "cpu"
    assert config == as_given


# ----------------------------------------------------------------------------- resume


def test_a_finished_run_is_not_overwritten_without_force(data, trained, tmp_path):
    out = tmp_path / "g"
    shutil.copytree(trained, out)
    before = (out / "checkpoint" / "weights.3.pth").read_bytes()
    result = run(train_args(data, out, max_steps=3))
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "finished run" in line and "weights.3.pth" in line and "--force" in line and "--max-steps" in line
    assert (out / "checkpoint" / "weights.3.pth").read_bytes() == before


def test_force_starts_over(data, trained, tmp_path):
    out = tmp_path / "g"
    shutil.copytree(trained, out)
    (out / "card.json").write_text('{"measured": "the old run"}')
    result = run(train_args(data, out, "--force", max_steps=2))
    assert result.exit_code == 0, result.output
    assert "(from 0)" in result.stdout
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["weights.2.pth"]
    assert "at step 2" in json.loads((out / "card.json").read_text())["measured"]  # the new run's card


def test_a_rerun_continues_from_the_latest_checkpoint_to_a_raised_max_steps(data, trained, tmp_path):
    out = tmp_path / "g"
    shutil.copytree(trained, out)
    result = run(train_args(data, out, max_steps=5))
    assert result.exit_code == 0, result.output
    assert "(from 3)" in result.stdout
    assert (out / "checkpoint" / "weights.5.pth").is_file()
    assert torch.load(out / "checkpoint" / "weights.5.pth", weights_only=True)["sia"]["step"] == 5
    assert registry.load_backbone(str(out)).info.path.endswith("weights.5.pth")
    assert not list(out.glob(".sia-progress*")) and not (out / ".sia-run.json").exists()  # closed as every run


def test_continuing_with_a_different_architecture_is_a_clear_error(data, trained, tmp_path):
    out = tmp_path / "g"
    shutil.copytree(trained, out)
    result = run(train_args(data, out, "--enc-dim", "8", max_steps=5))
    assert result.exit_code == 2, result.output
    assert "weights.3.pth" in one_error_line(result)
    assert json.loads((out / "setting.txt").read_text())["enc_dim"] == 16  # the old run's setting is kept


def test_continuing_with_other_attributes_is_refused(data, trained, tmp_path):
    # Same count, other order: the weights would load, but every attribute would change meaning.
    out = tmp_path / "g"
    shutil.copytree(trained, out)
    result = run(train_args(data, out, attributes="Smiling,Bangs,Eyeglasses", max_steps=5))
    assert result.exit_code == 2, result.output
    assert "Bangs,Eyeglasses,Smiling" in one_error_line(result)
    assert not (out / "checkpoint" / "weights.4.pth").exists()


# ----------------------------------------------------------------------------- bad input, refused before training


def test_unknown_attribute_is_refused_before_anything_is_written(data, tmp_path):
    out = tmp_path / "g"
    result = run(train_args(data, out, attributes="Bangs,Wings"))
    assert result.exit_code == 2
    assert "Wings" in one_error_line(result)
    assert not (out / "checkpoint").exists() and not out.exists()


def test_attribute_file_naming_a_missing_image_is_refused_before_training(data, tmp_path):
    broken = tmp_path / "d"
    shutil.copytree(data, broken)
    (broken / "images" / "000007.png").unlink()
    out = tmp_path / "g"
    result = run(train_args(broken, out))
    assert result.exit_code == 2
    assert "000007.png" in one_error_line(result)
    assert not out.exists()


# ----------------------------------------------------------------------------- gradient penalty


class LinearCritic(torch.nn.Module):
    """Score = <w, x>: its gradient with respect to every input is w, whatever the input."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = torch.nn.Parameter(w.flatten())

    def forward(self, x):
        return (x.flatten(1) @ self.w).unsqueeze(1), None


def test_gradient_penalty_is_zero_for_a_unit_gradient_critic():
    torch.manual_seed(0)
    w = torch.randn(3, 8, 8)
    real, fake = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    assert gradient_penalty(LinearCritic(w / w.norm()), real, fake).item() == pytest.approx(0.0, abs=1e-10)
    # And it measures the distance to 1: gradient norm 3 -> (3 - 1)^2 = 4.
    assert gradient_penalty(LinearCritic(3 * w / w.norm()), real, fake).item() == pytest.approx(4.0, rel=1e-5)


def test_gradient_penalty_reaches_the_critic_parameters():
    # The critic is trained on this term: it must be differentiable with respect to the weights.
    w = torch.ones(3, 4, 4)
    critic = LinearCritic(w)
    gradient_penalty(critic, torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)).backward()
    assert critic.w.grad is not None and critic.w.grad.abs().sum() > 0



# ----------------------------------------------------------------------------- speed: batches, options


def tiny_config(data: Path, out: Path, **fields) -> TrainConfig:
    values = dict(img_size=32, batch_size=8, enc_dim=8, dec_dim=8, dis_dim=8, dis_fc_dim=16, enc_layers=3,
                  dec_layers=3, dis_layers=3, n_d=2, max_steps=2, sample_every=100, save_every=100,
                  counterfactuals=False)  # the loader paths under test; counterfactual batches live in memory
    values.update(fields)
    return TrainConfig(images=data / "images", attrs_file=data / "list_attr.txt", attributes=ATTRS, out=out, **values)


def weights(out: Path, step: int) -> dict:
    return torch.load(out / "checkpoint" / f"weights.{step}.pth", weights_only=True)


def assert_same_weights(first: dict, second: dict) -> None:
    for part in ("G", "D"):
        assert first[part].keys() == second[part].keys()
        for key in first[part]:
            assert torch.equal(first[part][key], second[part][key]), (part, key)


def test_prefetched_batches_are_the_loaders_in_its_order(data, tmp_path):
    """Across an epoch boundary (40 images, batches of 8): the same batches, in the same order."""
    config = tiny_config(data, tmp_path / "g")
    dataset = LabelledImages(config.images, read_attributes(config.attrs_file).select(ATTRS), 32)
    inline = list(itertools.islice(training.loader_batches(dataset, config.batch_size, config.workers, World(), 3), 7))
    prefetched = Prefetched(training.loader_batches(dataset, config.batch_size, config.workers, World(), 3))
    ahead = list(itertools.islice(prefetched, 7))
    prefetched.close()
    assert not prefetched._thread.is_alive()  # closed early, with batches still to draw
    for (images, attrs), (images2, attrs2) in zip(inline, ahead, strict=True):
        assert torch.equal(images, images2) and torch.equal(attrs, attrs2)


def test_prefetched_raises_the_sources_error_when_its_batch_is_due():
    def source():
        yield "first"
        raise SiaError("cannot decode 000007.png")

    batches = Prefetched(source())
    assert next(batches) == "first"
    with pytest.raises(SiaError, match="000007.png"):
        next(batches)
    batches.close()


@pytest.mark.parametrize("preload", [False, True])
def test_same_seed_trains_identical_weights_with_and_without_drawing_ahead(data, tmp_path, monkeypatch, preload):
    """Drawing ahead in a thread (on CUDA) changes nothing a run computes: the DataLoader path
    trains the same weights with it as with each batch drawn in line (on a CPU, as before);
    preloaded batches (never drawn ahead) are as reproducible."""
    before = threading.active_count()
    with monkeypatch.context() as patch:
        patch.setattr(training, "draws_ahead", lambda device: True)
        train_gan(tiny_config(data, tmp_path / "a", preload=preload))
    assert threading.active_count() <= before  # no prefetch thread outlives its run
    with monkeypatch.context() as patch:
        patch.setattr(training, "draws_ahead", lambda device: False)
        train_gan(tiny_config(data, tmp_path / "b", preload=preload))
    assert_same_weights(weights(tmp_path / "a", 2), weights(tmp_path / "b", 2))


def test_batches_are_drawn_ahead_on_cuda_only():
    assert training.draws_ahead(torch.device("cuda", 0)) and not training.draws_ahead(torch.device("cpu"))


def test_detail_only_trains_the_detail_block_and_leaves_every_other_generator_weight_and_statistic(data, tmp_path):
    """--detail-only: after real steps (the critic training too) the encoder, decoder and their
    batch-norm running statistics are bit for bit those the run started from; the detail block moved."""
    config = tiny_config(data, tmp_path / "g", detail_layers=1, detail_only=True, lr=1e-2)
    torch.manual_seed(0)
    trainer = Trainer(config, config.setting())
    before = {k: v.clone() for k, v in trainer.generator.state_dict().items()}
    critic_before = {k: v.clone() for k, v in trainer.critic.state_dict().items()}
    real, a = torch.rand(8, 3, 32, 32) * 2 - 1, torch.randint(0, 2, (8, 3)).float()
    for _ in range(3):
        trainer.critic_step(real, a, a.flip(0))
        trainer.generator_step(real, a, a.flip(0), truth=real.flip(0), edited=torch.zeros(8, dtype=torch.long))
    write_grid = tmp_path / "sample.png"
    training.write_sample(trainer, real[:2], a[:2], write_grid)  # eval and back must keep the frozen part frozen
    trainer.critic_step(real, a, a.flip(0))
    trainer.generator_step(real, a, a.flip(0))
    after = trainer.generator.state_dict()
    frozen = [k for k in before if not k.startswith("detail.")]
    assert any("running_mean" in k for k in frozen)
    assert all(torch.equal(before[k], after[k]) for k in frozen), [k for k in frozen if not torch.equal(before[k], after[k])]
    assert not torch.equal(before["detail.0.outer.weight"], after["detail.0.outer.weight"])
    assert any(not torch.equal(critic_before[k], v) for k, v in trainer.critic.state_dict().items())


def test_detail_only_without_a_detail_block_is_refused_before_anything_is_written(data, tmp_path):
    out = tmp_path / "g"
    result = run(train_args(data, out, "--detail-only"))
    assert result.exit_code == 2, result.output
    assert "--detail-layers" in one_error_line(result)
    assert not out.exists()


@pytest.mark.parametrize("extra", [("--detail-gate", "0.03"), ("--detail-layers", "1", "--detail-gate", "-0.1")])
def test_a_detail_gate_without_a_block_or_below_zero_is_refused_before_anything_is_written(data, tmp_path, extra):
    out = tmp_path / "g"
    result = run(train_args(data, out, *extra))
    assert result.exit_code == 2, result.output
    assert "--detail-" in one_error_line(result)
    assert not out.exists()


def test_bf16_autocast_trains_with_an_fp32_penalty_and_public_checkpoint_keys(data, tmp_path):
    config = tiny_config(data, tmp_path / "g", amp="bf16")
    torch.manual_seed(0)
    trainer = Trainer(config, config.setting())
    real, a = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randint(0, 2, (4, 3)).float()
    losses = {**trainer.critic_step(real, a, a.flip(0)), **trainer.generator_step(real, a, a.flip(0))}
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values()), losses
    assert all(p.dtype == torch.float32 for p in trainer.generator.parameters())
    summary = train_gan(config)
    assert summary["steps"] == 2
    assert set(weights(tmp_path / "g", 2)["G"]) == set(Trainer(tiny_config(data, tmp_path / "x"), config.setting())
                                                       .generator.state_dict())


def test_compiled_trainer_keeps_the_modules_and_their_checkpoint_keys(data, tmp_path):
    """Compilation wraps the forwards; what is saved (and resumed) is the plain modules."""
    config = tiny_config(data, tmp_path / "g")
    plain = Trainer(config, config.setting()).state(0, config.setting())
    compiled = Trainer(dataclasses.replace(config, compile=True), config.setting())
    assert compiled.scorer is not compiled.critic and compiled.penalty_scorer is compiled.critic  # penalty: eager
    state = compiled.state(0, config.setting())
    for part in ("G", "D"):
        assert list(state[part]) == list(plain[part])


def test_channels_last_checkpoints_load_into_plain_modules(data, tmp_path):
    """NHWC weights are a layout, not other weights: an older reader's NCHW generator loads
    them strictly and computes the same images."""
    config = tiny_config(data, tmp_path / "g", channels_last=True, max_steps=1)  # not the default on CPU
    train_gan(config)
    state = weights(tmp_path / "g", 1)
    plain = Generator(GeneratorConfig.from_setting(config.setting()))
    plain.load_state_dict(state["G"], strict=True)
    fast = Trainer(config, config.setting()).generator
    fast.load_state_dict(state["G"], strict=True)
    assert fast.enc_layers[0].layers[0].weight.is_contiguous(memory_format=torch.channels_last)
    plain.eval(), fast.eval()
    x, a = torch.rand(2, 3, 32, 32) * 2 - 1, torch.zeros(2, 3)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, a), plain(x, a), rtol=1e-4, atol=1e-5)


def test_amp_option_reaches_the_steps(data, tmp_path, monkeypatch):
    asked = []
    original = trainer_module.amp_context
    monkeypatch.setattr(trainer_module, "amp_context", lambda device, amp: asked.append(amp) or original(device, amp))
    result = run(train_args(data, tmp_path / "g", "--amp", "bf16", max_steps=1))
    assert result.exit_code == 0, result.output
    assert asked and set(asked) == {"bf16"}  # every step's forwards, critic and generator
    assert (tmp_path / "g" / "checkpoint" / "weights.1.pth").is_file()


@pytest.mark.parametrize("extra, env, message", [
    (["--amp", "fp16"], {}, "--amp 'fp16': only bf16 is supported"),
    (["--compile"], {"WORLD_SIZE": "2"}, "--compile runs in one process only: under torchrun, train without it"),
])
def test_speed_options_are_checked_before_anything_is_written(data, tmp_path, monkeypatch, extra, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "g"
    result = run(train_args(data, out, *extra))
    assert result.exit_code == 2, result.output
    assert one_error_line(result) == f"error: {message}"
    assert not out.exists()


# ----------------------------------------------------------------------------- edit success, both ways


class CoupledEdits:
    """A backbone that draws its attribute input as pixels (row 0 of channel 0: A, B, C), but
    draws B as A xor B: an edit of A also flips B. Edits of B and C change nothing else."""

    attributes = ["A", "B", "C"]

    def __call__(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        shown = a.clone()
        shown[:, 1] = (a[:, 0] + a[:, 1]) % 2
        image = torch.zeros(len(a), 3, 4, 4)
        image[:, 0, 0, :3] = shown * 2 - 1
        return image


class PixelJudge:
    """Reads the attributes back from those pixels; its outputs in another order (C, A, B)."""

    class_names = ["C", "A", "B"]
    path = "pixel-judge.pt"
    num_outputs = 3

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image[:, 0, 0, [2, 0, 1]] * 5


def every_combination() -> torch.Tensor:
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)))


def test_off_target_change_counts_an_edit_that_flips_another_attribute():
    attrs = every_combination()
    found = edit_success(CoupledEdits(), PixelJudge(), torch.zeros(len(attrs), 3, 4, 4), attrs, batch_size=3)
    assert found["off_target_change"] == {"A": 1.0, "B": 0.0, "C": 0.0}
    assert found["off_target_by_attribute"]["A"] == {"B": 1.0, "C": 0.0}
    assert found["off_target_change_mean"] == {"A": 0.5, "B": 0.0, "C": 0.0}
    # Edit success keeps its meaning: A and C show everywhere; B is drawn right only where A is 0.
    assert found["edit_success"] == {"A": 1.0, "B": 0.5, "C": 1.0}
    # An edit that shows but changes something else is no clean edit.
    assert found["clean_edit_success"] == {"A": 0.0, "B": 0.5, "C": 1.0}


class OneHairColour:
    """A faithful backbone of a data set where one hair colour at a time exists: asked for two,
    it draws the first (as the renderer does)."""

    attributes = ["Black_Hair", "Blond_Hair", "Smiling"]

    def __call__(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        shown = a.clone()
        shown[:, 1] = a[:, 1] * (1 - a[:, 0])
        image = torch.zeros(len(a), 3, 4, 4)
        image[:, 0, 0, :3] = shown * 2 - 1
        return image


class HairJudge(PixelJudge):
    class_names = ["Black_Hair", "Blond_Hair", "Smiling"]

    def __call__(self, image):
        return image[:, 0, 0, :3] * 5


def test_turning_a_hair_colour_on_turns_the_other_off_and_that_is_no_off_target_change():
    attrs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])  # black, blond, none
    found = edit_success(OneHairColour(), HairJudge(), torch.zeros(3, 3, 4, 4), attrs)
    # Blond on a black-haired face is asked as blond alone, so the faithful backbone shows it.
    assert found["edit_success"] == {"Black_Hair": 1.0, "Blond_Hair": 1.0, "Smiling": 1.0}
    assert found["off_target_change"] == {"Black_Hair": 0.0, "Blond_Hair": 0.0, "Smiling": 0.0}
    flipped, implied = edited(attrs, 1, OneHairColour.attributes)
    assert flipped.tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0]]
    assert implied[:, 0].tolist() == [True, False, False]


def test_judge_accuracy_per_attribute_and_balanced():
    attrs = every_combination()
    images = torch.zeros(len(attrs), 3, 4, 4)
    images[:, 0, 0, :3] = attrs  # [0, 1] images: the judge sees attrs * 2 - 1
    right = judge_accuracy(PixelJudge(), ["A", "B", "C"], images, attrs, batch_size=3)
    assert right["accuracy"] == {"A": 1.0, "B": 1.0, "C": 1.0}

    class Never(PixelJudge):
        def __call__(self, image):
            return -torch.ones(len(image), 3)

    attrs[:6, 2] = 0.0  # C on 1 image of 8
    never = judge_accuracy(Never(), ["A", "B", "C"], images, attrs)
    assert never["accuracy"]["C"] == 7 / 8 and never["balanced_accuracy"]["C"] == 0.5
    assert never["positive_share"]["A"] == 0.5
