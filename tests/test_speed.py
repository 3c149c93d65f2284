"""What makes the attack fast, checked on CPU: frozen models, the batch-size search, bf16,
channels-last and torch.compile preparation, and their command-line options.

The CUDA-only parts are tested through what they decide (the search treats
torch.cuda.OutOfMemoryError as "does not fit"), not through timings: there are none here.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from sia_cli.backbone.registry import load_backbone
from sia_cli.cli import app
from sia_cli.engine import speed
from sia_cli.engine.attack import AttackSettings, attribute_radius, get_method, quantize, run_loop
from sia_cli.engine.reference import difference
from sia_cli.errors import SiaError
from sia_cli.inputs.synth import make_dataset
from sia_cli.runs.inputs import RunConfig
from sia_cli.targets import load_target

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit deprecation notices

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "examples" / "targets" / "eyeglasses_confounded.pt"
STEPS = 3


def models():
    """A fresh backbone and target: preparation changes them in place."""
    backbone = load_backbone(None)
    return backbone, load_target(TARGET, probe_size=backbone.img_size)


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    x0, a0 = torch.rand(3, 3, 64, 64), torch.rand(3, 15)
    _, target = models()
    with torch.no_grad():
        reference = target.reference(target(x0 * 2 - 1))
    return x0, a0, reference


def attack(backbone, target, batch, settings=AttackSettings(steps=STEPS), method="sia"):
    x0, a0, reference = batch
    return run_loop(backbone, target, get_method(method), x0, a0, reference, settings,
                    attribute_radius(a0, settings, None))


def same_adversaries(one, other) -> bool:
    """Equal up to the float noise that a change of kernels may bring (sia, signed steps):
    the bound of tests/test_reference.py, where its reason is given."""
    found = difference(one, other)
    return found["share_different"] <= 0.02 and found["max_levels"] <= 3 and found["max_attribute"] <= 4 * 0.25 / 255


# ---------------------------------------------------------------------- frozen weights


def test_loaded_backbone_and_target_have_no_trainable_parameter():
    backbone, target = models()
    parameters = list(backbone.parameters()) + list(target.parameters())
    assert parameters and not any(p.requires_grad for p in parameters)


def test_the_attack_asks_for_input_gradients_only(batch):
    backbone, target = models()
    parameters = list(backbone.parameters()) + list(target.parameters())
    for p in parameters:  # even unfrozen models get no weight gradient from the loop
        p.requires_grad_(True)
    attack(backbone, target, batch)
    assert all(p.grad is None for p in parameters)


# ------------------------------------------------------------------------ no host sync


class HostSync(AssertionError):
    pass


def run_refusing_host_reads(batch, method: str, on_step=None) -> None:
    backbone, target = models()
    x0, a0, reference = batch
    settings = AttackSettings(steps=STEPS)
    radius = attribute_radius(a0, settings, None)

    def refuse(*args, **kwargs):
        raise HostSync("a tensor was read back to the host inside the step loop")

    with pytest.MonkeyPatch.context() as patch:
        for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
            patch.setattr(torch.Tensor, name, refuse)
        run_loop(backbone, target, get_method(method), x0, a0, reference, settings, radius,
                 torch.Generator().manual_seed(0), on_step=on_step)


@pytest.mark.parametrize("method", ["sia", "pgd", "spt"])
def test_the_step_loop_never_reads_a_tensor_back_to_the_host(batch, method):
    """On a GPU each read-back (item, tolist, cpu, Python branching on a value) stalls the
    device: none may happen anywhere in the attack loop."""
    run_refusing_host_reads(batch, method)


def test_the_host_read_guard_sees_a_read_inside_the_loop(batch):
    with pytest.raises(HostSync):
        run_refusing_host_reads(batch, "sia", on_step=lambda done, total: bool(batch[0].sum() > 0))


# ---------------------------------------------------------------------- batch-size search


@pytest.mark.parametrize("limit", [1, 2, 5, 16, 37, 64, 100])
def test_largest_fitting_finds_the_limit_with_few_trials(limit):
    tried = []

    def fits(size):
        tried.append(size)
        return size <= limit

    assert speed.largest_fitting(fits, cap=64) == min(limit, 64)
    assert len(tried) <= 2 * 7 + 1  # doubling to 64, then bisecting at most 6 times


def test_largest_fitting_says_when_nothing_fits():
    with pytest.raises(SiaError, match="not even one image"):
        speed.largest_fitting(lambda size: False, cap=64)


def fake_gpu(monkeypatch, rows_that_fit: int) -> list[int]:
    """A GPU whose memory holds `rows_that_fit` rows: bigger probes raise CUDA's OOM error."""
    probed = []

    def probe(backbone, target, settings, device, rows):
        probed.append(rows)
        if rows > rows_that_fit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(speed, "probe", probe)
    return probed


def test_auto_batch_size_on_cuda_is_the_largest_that_fits_less_headroom(monkeypatch):
    probed = fake_gpu(monkeypatch, rows_that_fit=40)
    size = speed.auto_batch_size(None, None, AttackSettings(), torch.device("cuda"), cap=1000)
    assert size == int(40 * speed.HEADROOM)
    assert max(probed) > 40  # it did hit the (simulated) limit


def test_auto_batch_size_counts_rows_per_image(monkeypatch):
    probed = fake_gpu(monkeypatch, rows_that_fit=150)
    size = speed.auto_batch_size(None, None, AttackSettings(), torch.device("cuda"), rows=15, cap=1000)
    assert size == int(10 * speed.HEADROOM)
    assert all(rows % 15 == 0 for rows in probed)


def test_auto_batch_size_stops_at_the_number_of_images(monkeypatch):
    fake_gpu(monkeypatch, rows_that_fit=10_000)
    assert speed.auto_batch_size(None, None, AttackSettings(), torch.device("cuda"), cap=24) == 24


def test_auto_batch_size_on_cpu_is_the_cpu_batch():
    device = torch.device("cpu")
    assert speed.auto_batch_size(None, None, AttackSettings(), device) == speed.CPU_BATCH
    assert speed.auto_batch_size(None, None, AttackSettings(), device, cap=3) == 3


def test_the_real_probe_runs_two_attack_steps(batch):
    backbone, target = models()
    assert speed.fits(backbone, target, AttackSettings(), torch.device("cpu"), rows=2)


def test_tune_prepares_the_models_and_returns_the_batch_size_without_writing_it_back():
    backbone, target = models()
    inputs = SimpleNamespace(backbone=backbone, target=target, files=[Path(f"{i}.png") for i in range(100)])
    config = RunConfig(model=Path("m.pt"), images=Path("faces"), out=Path("out"), batch_size="auto")
    cpu = torch.device("cpu")
    assert speed.tune(config, inputs, cpu, wanted=100) == speed.CPU_BATCH
    assert config.batch_size == "auto"  # the config stays as the command built it
    assert backbone.generator.enc_layers[0].layers[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert speed.tune(config, inputs, cpu, wanted=3) == 3  # never more than the run attacks
    assert speed.tune(replace(config, batch_size=5), inputs, cpu, wanted=100) == 5


# ----------------------------------------------------------- precision, layout, compile


def test_bf16_attack_keeps_its_bounds_and_is_judged_in_fp32(batch):
    backbone, target = models()
    settings = AttackSettings(steps=STEPS, amp="bf16")
    state = attack(backbone, target, batch, settings)
    x0 = batch[0]
    assert (state.x - x0).abs().max() <= settings.eps + 1e-6
    assert state.x.dtype == state.a.dtype == torch.float32
    assert torch.equal(state.adversary, quantize(state.adversary))
    assert state.output.dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(state.output, target(state.adversary), atol=1e-5)


def test_amp_other_than_bf16_is_refused():
    with pytest.raises(SiaError, match="only bf16"):
        AttackSettings(amp="fp16")


def test_channels_last_models_give_the_same_adversaries(batch):
    plain = attack(*models(), batch)
    backbone, target = models()
    speed.to_channels_last(backbone, target)
    first_conv = backbone.generator.enc_layers[0].layers[0].weight
    assert first_conv.is_contiguous(memory_format=torch.channels_last)
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)
               and not p.is_contiguous() for p in target.model.parameters())
    assert same_adversaries(attack(backbone, target, batch), plain)


def test_compiled_models_give_the_same_adversaries(batch):
    plain = attack(*models(), batch)
    backbone, target = models()
    speed.compile_models(backbone, target)
    compiled = attack(backbone, target, batch)
    assert backbone._compiled_call_impl is not None  # the generator really was compiled
    assert same_adversaries(compiled, plain)


# --------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faces")
    make_dataset(root, 3, seed=11)
    return root


def sia(*args):
    return CliRunner().invoke(app, [*map(str, args)], env={"COLUMNS": "200"})


def test_attack_accepts_batch_size_auto_and_records_the_size_used(faces, tmp_path):
    out = tmp_path / "run"
    result = sia("attack", TARGET, "--images", faces / "images", "--attrs-file", faces / "list_attr.txt",
                 "--steps", "2", "--batch-size", "auto", "--device", "cpu", "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    settings = json.loads((out / "report.json").read_text())["settings"]
    assert settings["batch_size"] == 3  # CPU_BATCH, capped at the 3 images
    assert settings["compile"] is False


def test_compile_flag_reaches_the_models(faces, tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(speed, "compile_models", lambda backbone, target: compiled.append((backbone, target)))
    out = tmp_path / "run"
    result = sia("attack", TARGET, "--images", faces / "images", "--attrs-file", faces / "list_attr.txt",
                 "--steps", "1", "--compile", "--device", "cpu", "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert len(compiled) == 1
    assert json.loads((out / "report.json").read_text())["settings"]["compile"] is True


@pytest.mark.parametrize("value", ["0", "-2", "many", "1.5"])
def test_bad_batch_size_is_a_usage_error(value, faces, tmp_path):
    result = sia("attack", TARGET, "--images", faces / "images", "--batch-size", value, "--out", tmp_path / "x")
    assert result.exit_code == 2
    assert "--batch-size" in result.output


def test_bad_amp_is_one_line_error(faces, tmp_path):
    result = sia("attack", TARGET, "--images", faces / "images", "--amp", "fp16", "--out", tmp_path / "x")
    assert result.exit_code == 2
    assert "only bf16" in result.output and "Traceback" not in result.output
