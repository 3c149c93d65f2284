"""The AttGAN backbone: public checkpoint compatibility, attribute convention, checkpoint loading."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from sia_cli.backbone import registry
from sia_cli.backbone.attgan import (
    AttGAN,
    BackboneInfo,
    Detail,
    Discriminator,
    DiscriminatorConfig,
    Generator,
    GeneratorConfig,
    latest_checkpoint,
)
from sia_cli.errors import SiaError

# Copies of the project's shared/compat fixtures (public AttGAN checkpoint facts and test vector).
COMPAT = Path(__file__).parent / "fixtures" / "compat"
VECTOR = COMPAT / "attgan_tiny_vector.pt"
MANIFEST = COMPAT / "attgan_state_dict_keys.json"
PUBLIC_SETTING = COMPAT / "setting_128_shortcut1_inject1_none.txt"



TINY_ATTRS = ["Bangs", "Eyeglasses", "Male", "Smiling", "Young"]  # the attributes of conftest's tiny setting


def shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------- public compatibility


def test_tiny_vector_is_reproduced_by_a_strictly_loaded_generator():
    vector = torch.load(VECTOR, weights_only=False)
    g = Generator(**vector["generator_kwargs"])
    g.load_state_dict(vector["checkpoint"]["G"], strict=True)
    g.eval()
    with torch.no_grad():
        features = g.encode(vector["x"])
        y = g.decode(features, vector["attrs_input"])
    assert [list(f.shape) for f in features] == [list(s) for s in vector["latent_shapes"]]
    assert torch.allclose(y, vector["y_eval"], atol=1e-5)


def test_wrapper_on_01_attributes_reproduces_the_tiny_vector():
    # The vector's generator saw (a*2-1)*thres_int; the wrapper must do that conversion itself.
    vector = torch.load(VECTOR, weights_only=False)
    g = Generator(**vector["generator_kwargs"])
    g.load_state_dict(vector["checkpoint"]["G"], strict=True)
    info = BackboneInfo(name="tiny", attributes=list("abcde"), img_size=32, thres_int=vector["thres_int"])
    backbone = AttGAN(g, info).freeze()
    with torch.no_grad():
        y = backbone(vector["x"], vector["attrs01"])
    assert torch.allclose(y, vector["y_eval"], atol=1e-5)


@pytest.mark.parametrize("experiment", ["128_shortcut1_inject1_none", "128_shortcut1_inject0_none"])
def test_state_dict_keys_and_shapes_equal_the_public_manifest(experiment):
    expected = json.loads(MANIFEST.read_text())[experiment]
    setting = json.loads(PUBLIC_SETTING.read_text())
    setting["inject_layers"] = expected["generator_kwargs"]["inject_layers"]
    # The generator's settings must come out of setting.txt exactly as the public script passes them.
    config = GeneratorConfig.from_setting(setting)
    assert {k: asdict(config)[k] for k in expected["generator_kwargs"]} == expected["generator_kwargs"]
    with torch.device("meta"):  # shapes only: no 100 MB of real weights
        g = Generator(config)
        d = Discriminator(DiscriminatorConfig.from_setting(setting))
    assert shapes(g) == expected["G"]
    assert shapes(d) == expected["D"]


# ----------------------------------------------------------------------------- attribute convention


@pytest.mark.parametrize("thres_int", [0.5, 0.7])
def test_wrapper_maps_01_attributes_to_scaled_signed_inputs(tiny_setting, thres_int):
    torch.manual_seed(0)
    g = Generator(GeneratorConfig.from_setting(tiny_setting)).eval()
    backbone = AttGAN(g, BackboneInfo("tiny", TINY_ATTRS, 32, thres_int=thres_int))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    a01 = torch.tensor([[0.0, 1.0, 0.5, 1.0, 0.0], [1.0, 1.0, 0.0, 0.25, 1.0]])
    assert torch.allclose(backbone.attribute_input(a01), (a01 * 2 - 1) * thres_int)
    with torch.no_grad():
        assert torch.allclose(backbone(x, a01), g(x, (a01 * 2 - 1) * thres_int))
        # Guard against a vacuous pass: feeding raw 0/1 attributes gives a different image.
        assert not torch.allclose(backbone(x, a01), g(x, a01))


# ----------------------------------------------------------------------------- checkpoints on disk


def test_latest_checkpoint_compares_epoch_numbers_not_strings(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    for n in (9, 12, 100):
        (tmp_path / "checkpoint" / f"weights.{n}.pth").touch()
    assert latest_checkpoint(tmp_path).name == "weights.100.pth"
    assert latest_checkpoint(tmp_path / "empty") is None


def test_experiment_folder_loads_the_highest_epoch(tmp_path, make_experiment):
    folder = make_experiment(tmp_path / "exp", epochs=(0, 12))
    backbone = registry.load_backbone(str(folder))
    saved = torch.load(folder / "checkpoint" / "weights.12.pth", weights_only=True)
    for key, value in backbone.generator.state_dict().items():
        assert torch.equal(value, saved["G"][key]), key
    assert backbone.attributes == TINY_ATTRS and backbone.img_size == 32
    assert backbone.info.path.endswith("weights.12.pth")
    assert backbone.discriminator is not None
    assert backbone.predict_attributes(torch.zeros(1, 3, 32, 32)).shape == (1, len(TINY_ATTRS))
    # The attack only optimises attributes: the backbone comes back frozen and in eval mode.
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())


def test_checkpoint_file_finds_setting_one_folder_up(tmp_path, make_experiment):
    folder = make_experiment(tmp_path / "exp", epochs=(0, 12))
    backbone = registry.load_backbone(str(folder / "checkpoint" / "weights.0.pth"))
    saved = torch.load(folder / "checkpoint" / "weights.0.pth", weights_only=True)
    assert torch.equal(backbone.generator.enc_layers[0].layers[0].weight, saved["G"]["enc_layers.0.layers.0.weight"])
    assert backbone.attributes == TINY_ATTRS


def test_checkpoint_without_discriminator_still_loads(tmp_path, make_experiment, tiny_setting, tiny_state):
    folder = make_experiment(tmp_path / "exp", epochs=())
    torch.save({"G": tiny_state(tiny_setting, 0)["G"]}, folder / "checkpoint" / "weights.1.pth")
    backbone = registry.load_backbone(str(folder))
    assert backbone.discriminator is None


# ----------------------------------------------------------------------------- errors


def assert_one_line(exc: pytest.ExceptionInfo, *words: str) -> None:
    message = str(exc.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message


def test_missing_setting_is_a_clear_error(tmp_path, make_experiment):
    folder = make_experiment(tmp_path / "exp")
    (folder / "setting.txt").unlink()
    with pytest.raises(SiaError) as exc:
        registry.load_backbone(str(folder))
    assert_one_line(exc, "setting.txt")


def test_setting_with_more_attributes_than_the_weights_is_a_clear_error(tmp_path, make_experiment, tiny_setting):
    folder = make_experiment(tmp_path / "exp")
    thirteen = [f"Attr_{i}" for i in range(13)]
    (folder / "setting.txt").write_text(json.dumps({**tiny_setting, "attrs": thirteen, "n_attrs": 13}))
    with pytest.raises(SiaError) as exc:
        registry.load_backbone(str(folder))
    assert_one_line(exc, "do not match", "13 attributes")


def truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def random_bytes(path: Path) -> None:
    path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
                     .numpy().tobytes())


def empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [truncated, random_bytes, empty])
def test_corrupted_checkpoint_is_a_clear_error(tmp_path, make_experiment, damage):
    folder = make_experiment(tmp_path / "exp")
    damage(folder / "checkpoint" / "weights.0.pth")
    with pytest.raises(SiaError) as exc:
        registry.load_backbone(str(folder))
    assert_one_line(exc, "weights.0.pth", "corrupted")


@pytest.mark.parametrize("content", [{"model": {}}, {"g": {}}, [1, 2]])
def test_checkpoint_without_generator_is_a_clear_error(tmp_path, make_experiment, content):
    folder = make_experiment(tmp_path / "exp")
    torch.save(content, folder / "checkpoint" / "weights.0.pth")
    with pytest.raises(SiaError) as exc:
        registry.load_backbone(str(folder))
    assert_one_line(exc, "'G'")


def test_folder_without_checkpoint_is_a_clear_error(tmp_path, make_experiment):
    folder = make_experiment(tmp_path / "exp", epochs=())
    with pytest.raises(SiaError) as exc:
        registry.load_backbone(str(folder))
    assert_one_line(exc, "weights.<n>.pth")


def test_impossible_architecture_in_setting_is_a_clear_error(tmp_path, make_experiment, tiny_setting):
    # shortcut_layers must be below dec_layers; a hand-edited setting.txt must not crash with a traceback.
    folder = make_experiment(tmp_path / "exp")
    (folder / "setting.txt").write_text(json.dumps({**tiny_setting, "shortcut_layers": 5}))
    with pytest.raises(SiaError) as exc:
        registry.load_backbone(str(folder))
    assert_one_line(exc, "shortcut_layers")


def grown_by_one_block(added: dict, prefix: str) -> tuple[Generator, Generator, torch.Tensor, torch.Tensor]:
    """A small generator and the same one with the blocks `added` names, loaded from its weights:
    only the new blocks' keys are missing, and the grown one draws exactly what it drew."""
    torch.manual_seed(0)
    config = dict(enc_dim=8, dec_dim=8, enc_layers=3, dec_layers=3, n_attrs=3, img_size=32, shortcut_layers=2,
                  inject_layers=2)
    plain, grown = Generator(GeneratorConfig(**config)), Generator(GeneratorConfig(**{**config, **added}))
    missing, unexpected = grown.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(key.startswith(prefix) for key in missing)
    plain.eval(), grown.eval()
    x, a = torch.rand(2, 3, 32, 32) * 2 - 1, torch.tensor([[0.5, -0.5, 0.5], [-0.5, 0.5, 0.5]])
    with torch.no_grad():
        assert torch.equal(plain(x, a), grown(x, a))
    return plain, grown, x, a


def test_refine_blocks_start_as_the_identity_and_load_where_absent_they_are_not():
    """A refine block added to a trained generator leaves its images as they were (its second
    convolution starts at zero), and a public checkpoint without refine blocks builds none: its
    keys stay the public ones."""
    plain, _, _, _ = grown_by_one_block({"refine_layers": 1}, "refine.")
    assert not any(key.startswith("refine") for key in plain.state_dict())
    assert GeneratorConfig.from_setting(json.loads(PUBLIC_SETTING.read_text())).refine_layers == 0


def test_detail_blocks_start_as_the_identity_then_carry_the_input_image_into_the_output():
    """A detail block added to a trained generator draws what it drew (its second convolution
    starts at zero); once trained it reads the encoded image at full resolution, so a one-pixel
    change of the input reaches the output pixels around it by a path the coarse decoder lacks.
    Its keys sit apart from the public ones, and decoding without the image is refused."""
    plain, detailed, x, a = grown_by_one_block({"detail_layers": 1}, "detail.")
    with torch.no_grad():
        torch.nn.init.normal_(detailed.detail[0].outer.weight, std=0.1)
        nudged = x.clone()
        nudged[:, :, 16, 16] += 0.5
        change = (detailed(nudged, a) - detailed(x, a)).abs().sum(dim=(0, 1))
        coarse_change = (plain(nudged, a) - plain(x, a)).abs().sum(dim=(0, 1))
    assert (change - coarse_change)[15:18, 15:18].abs().min() > 1e-3
    with pytest.raises(ValueError, match="encoded image"):
        detailed.decode(detailed.encode(x), a)


def gated_and_open(gate: float) -> tuple[Detail, Detail]:
    torch.manual_seed(0)
    open_block = Detail(n_attrs=2)
    torch.nn.init.normal_(open_block.outer.weight, std=0.1)
    torch.nn.init.normal_(open_block.outer.bias, std=0.1)
    gated = Detail(n_attrs=2, gate=gate)
    gated.load_state_dict(open_block.state_dict())
    return gated, open_block


def test_a_gated_detail_block_adds_all_it_would_where_the_image_is_kept_and_little_where_an_edit_moved_it():
    """The gate reads how far the decoder's image departs from the input: where the two agree,
    or differ only by fine zero-mean error (the blur the block exists to sharpen), it adds what
    an ungated block adds; over a region an edit moved one way (by 0.25 in [0, 1]) it adds
    almost nothing, so the decoder's edit stands."""
    gated, open_block = gated_and_open(0.03)
    image, a = torch.rand(1, 3, 32, 32) * 2 - 1, torch.tensor([[0.5, -0.5]])
    checker = (torch.arange(32).view(-1, 1) + torch.arange(32)) % 2 * 0.2 - 0.1  # +-0.05 in [0, 1]
    edit = torch.zeros(32, 32)
    edit[8:24, 8:24] = 0.5  # 0.25 in [0, 1]
    with torch.no_grad():
        for departure, inside, share in ((torch.zeros(32, 32), slice(None), (0.999, 1.001)),
                                         (checker, slice(None), (0.9, 1.001)),
                                         (edit, slice(12, 20), (0.0, 0.001))):
            logits = torch.atanh((image + departure).clamp(-0.99, 0.99))
            drawn = torch.tanh(logits)
            added_gated = gated(logits, drawn - departure, a) - logits
            added_open = open_block(logits, drawn - departure, a) - logits
            ratio = added_gated[..., inside, inside].abs().sum() / added_open[..., inside, inside].abs().sum()
            assert share[0] <= float(ratio) <= share[1], (departure.abs().max(), float(ratio))


def test_the_gate_comes_from_the_setting_and_none_is_the_ungated_block():
    gated = Generator(GeneratorConfig.from_setting({"detail_layers": 1, "detail_gate": 0.03, "img_size": 32,
                                                    "enc_layers": 3, "dec_layers": 3}))
    assert [block.gate for block in gated.detail] == [0.03]
    assert Generator(GeneratorConfig(detail_layers=1, img_size=32, enc_layers=3, dec_layers=3)).detail[0].gate == 0.0
