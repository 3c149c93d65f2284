"""The shipped example backbone: its attribute inputs must control what they name, and little else.

A classifier of every synth attribute (examples/targets/attribute_judge.pt, trained on
synth faces by examples/train_targets.py) judges edits of fresh faces (a seed no training
set used); it is itself checked on those faces first. An untrained or collapsed backbone
scores near 0: its edits do not show. One whose edits change other attributes too fails
the off-target bound.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sia_cli.backbone.judging import edit_success, judge_accuracy
from sia_cli.backbone.registry import load_backbone
from sia_cli.inputs.images import load_image, read_attributes
from sia_cli.inputs.synth import make_dataset
from sia_cli.targets import load_target

JUDGE = Path(__file__).parents[1] / "examples" / "targets" / "attribute_judge.pt"
SHIPPED = Path(__file__).parents[1] / "sia_cli" / "backbone" / "builtin" / "synth-faces-64"
# The shipped backbone, trained with the renderer's counterfactuals and given a gated detail
# block (docs/backbone.md). Measured with examples/measure_backbone.py on 300 faces (seed 77):
# mean edit success 0.815, clean edit success 0.54, reconstruction error 0.020, every attribute
# at 0.6 or more (lowest Male 0.63); on the first 120 of those faces, the fixture's: mean 0.816,
# lowest Smiling 0.633, clean 0.533, error 0.0201, off-target 0.030. The bounds leave about two
# standard errors of 120 faces below those figures. (The AttGAN-recipe backbone it replaced:
# mean 0.24, clean 0.12, error 0.054; an 18-step backbone 0.01 and 0.177.)
MEAN_EDIT_SUCCESS = 0.78
MIN_EDIT_SUCCESS = 0.55
MEAN_CLEAN_EDIT_SUCCESS = 0.48
MAX_RECONSTRUCTION_L1 = 0.03
# Same script, 300 faces: the judge's lowest accuracy 0.903 (Smiling), lowest balanced accuracy
# 0.898 (Blond_Hair). The shipped backbone's edits change each other attribute on 0.032 of the
# faces (mean over edited and other attributes; much of it the judge's misreadings, which make
# the renderer's own edits change "some other attribute" on 0.30 of faces against this one's 0.34).
MIN_JUDGE_ACCURACY = 0.9
MIN_JUDGE_BALANCED_ACCURACY = 0.85
MAX_MEAN_OFF_TARGET = 0.045


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faces")
    make_dataset(folder, 120, seed=77, size=64)
    table = read_attributes(folder / "list_attr.txt")
    images = torch.stack([load_image(folder / "images" / f, 64) for f in table.rows])
    return images, table


@pytest.fixture(scope="module")
def judge():
    return load_target(JUDGE, task="multiclass", probe_size=64)


@pytest.fixture(scope="module")
def shipped(faces, judge):
    images, table = faces
    backbone = load_backbone(None)
    attrs = torch.from_numpy(np.stack([table.select(backbone.attributes).rows[f] for f in table.rows]))
    with torch.no_grad():
        return backbone, edit_success(backbone, judge, images, attrs)


def mean(rates: dict) -> float:
    return sum(rates.values()) / len(rates)


def test_judge_recognises_every_attribute_on_clean_faces(faces, judge):
    images, table = faces
    truth = torch.from_numpy(np.stack([table.rows[f] for f in table.rows]))
    with torch.no_grad():
        judged = judge_accuracy(judge, table.names, images, truth)
    assert set(judged["accuracy"]) == set(table.names)
    assert min(judged["accuracy"].values()) >= MIN_JUDGE_ACCURACY, judged["accuracy"]
    # Not by answering the majority label: right on the faces with the attribute and without.
    assert min(judged["balanced_accuracy"].values()) >= MIN_JUDGE_BALANCED_ACCURACY, judged["balanced_accuracy"]


def test_shipped_backbone_edits_what_it_names_and_reconstructs_closely(shipped):
    backbone, result = shipped
    rates = result["edit_success"]
    assert set(rates) == set(backbone.attributes)
    assert mean(rates) >= MEAN_EDIT_SUCCESS, rates
    assert min(rates.values()) >= MIN_EDIT_SUCCESS, rates
    assert result["reconstruction_l1"] <= MAX_RECONSTRUCTION_L1, result["reconstruction_l1"]


def test_shipped_backbone_edits_change_little_else(shipped):
    """The other way round: an edit that changes attributes it should not is a failure. (A
    backbone whose edits change nothing has no off-target change either: hence clean edit
    success, which asks for the edit to show as well.)"""
    backbone, result = shipped
    for key in ("off_target_change", "off_target_change_mean", "clean_edit_success"):
        assert set(result[key]) == set(backbone.attributes) and all(0 <= v <= 1 for v in result[key].values())
    assert all(result["clean_edit_success"][k] <= result["edit_success"][k] for k in backbone.attributes)
    assert mean(result["off_target_change_mean"]) <= MAX_MEAN_OFF_TARGET, result["off_target_change_mean"]
    assert mean(result["clean_edit_success"]) >= MEAN_CLEAN_EDIT_SUCCESS, result["clean_edit_success"]


def test_the_shipped_backbones_card_is_what_it_measures(shipped):
    """The card that names blind spots in every report agrees with a fresh measurement, and
    names none: every attribute is edited in more than half of the faces."""
    from sia_cli.measures import trust

    backbone, result = shipped
    card = backbone.info.card["edit_success"]
    assert set(card) == set(backbone.attributes)
    assert all(abs(card[name] - result["edit_success"][name]) <= 0.15 for name in card), (card, result["edit_success"])
    assert trust.blind_spots(backbone.info.card, backbone.attributes) == []


def _domain(backbone, images: torch.Tensor) -> tuple[list, list]:
    """Per image, as a run without --attrs-file judges it: in the domain by the card's whole rule,
    and by the critic margin alone."""
    from sia_cli.measures import trust

    x = images * 2 - 1
    with torch.no_grad():
        score, margin = backbone.critic_scores(x, backbone(x, backbone.predict_attributes(x)))
    card = backbone.info.card
    margin_only = {"domain": {k: v for k, v in card["domain"].items() if k != "critic_score_floor"}}
    return ([trust.in_domain(float(m), card, float(s)) for m, s in zip(margin, score)],
            [trust.in_domain(float(m), margin_only) for m in margin])


def test_the_shipped_backbones_critic_tells_real_faces_from_its_own(tmp_path):
    """A backbone that reconstructs sharply narrows the critic's margin on every image, photos
    included: the margin alone let through real faces. The critic's own score, calibrated on the
    card, keeps every LFW face and the astronaut out and fresh synth faces in (measured: the margin
    alone let 15 of the 41 in; with the score none, and 60 of 60 synth faces in)."""
    import skimage.data
    from PIL import Image

    backbone = load_backbone(None)
    make_dataset(tmp_path / "synth", 60, seed=5150, size=64)
    synth = torch.stack([load_image(p, 64) for p in sorted((tmp_path / "synth" / "images").glob("*.png"))])
    lfw = skimage.data.lfw_subset()[:40]  # faces, 25x25 grey, upscaled as a user's small photos would be
    for i, face in enumerate(lfw):
        Image.fromarray((face * 255).astype(np.uint8)).resize((178, 218)).save(tmp_path / f"lfw_{i}.png")
    Image.fromarray(skimage.data.astronaut()[0:300, 100:400]).save(tmp_path / "astronaut_face.png")
    real = torch.stack([load_image(p, 64) for p in sorted(tmp_path.glob("*.png"))])
    synth_in, _ = _domain(backbone, synth)
    real_in, real_margin_only = _domain(backbone, real)
    assert np.mean(synth_in) >= 0.85, np.mean(synth_in)
    assert not any(real_in), np.mean(real_in)
    assert np.mean(real_margin_only) >= 0.2  # what the margin alone said of them


def test_the_measure_gives_the_renderers_own_edits_nearly_full_marks(faces, judge):
    """Against the truth: judged as a backbone, the renderer (the faces drawn again with each
    edit) must score near the top of the measure. Measured on 300 faces: mean 0.92, lowest 0.80
    (Mustache, Blond_Hair); off-target 0.30, nearly all of it the judge's own misreadings."""
    import sys

    sys.path.insert(0, str(JUDGE.parents[1]))
    from measure_backbone import Renderer

    images, table = faces
    names = load_backbone(None).attributes
    subset = images[:40]
    attrs = torch.from_numpy(np.stack([table.select(names).rows[f] for f in list(table.rows)[:40]]))
    with torch.no_grad():
        truth = edit_success(Renderer(names, subset, seed=77), judge, subset, attrs)
    assert truth["reconstruction_l1"] == 0.0  # given its own attributes it returns the face itself
    assert mean(truth["edit_success"]) >= 0.85, truth["edit_success"]
    assert min(truth["edit_success"].values()) >= 0.6, truth["edit_success"]


def test_remeasure_puts_a_candidate_in_the_defaults_place_for_every_command(tmp_path, monkeypatch):
    """examples/remeasure_backbone.py: its registry file makes the name `synth-faces-64` load the
    candidate folder, with the candidate's own setting (here the shipped weights with the detail
    block's gate off, which the built-in entry sets); a folder without setting.txt is refused
    before any job runs."""
    import subprocess
    import sys

    sys.path.insert(0, str(JUDGE.parents[1]))
    from remeasure_backbone import registry
    from train_backbone import export

    candidate = tmp_path / "candidate"
    export(SHIPPED, candidate, detail_gate=0.0)
    default = load_backbone("synth-faces-64")
    monkeypatch.setenv("SIA_WEIGHTS", str(registry(candidate, tmp_path)))
    loaded = load_backbone("synth-faces-64")
    assert Path(loaded.info.path).parent.parent == candidate.resolve()
    assert [block.gate for block in default.generator.detail] == [0.03]
    assert [block.gate for block in loaded.generator.detail] == [0.0]
    x, a = torch.rand(2, 3, 64, 64) * 2 - 1, torch.randint(0, 2, (2, 15)).float()
    with torch.no_grad():
        assert torch.equal(loaded(x, a), load_backbone(str(candidate))(x, a))
        assert not torch.equal(loaded(x, a), default(x, a))
    script = JUDGE.parents[1] / "remeasure_backbone.py"
    result = subprocess.run([sys.executable, str(script), str(tmp_path), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "not a backbone folder" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_detail_stage_exports_the_runs_generator_and_on_request_the_starting_critic(tmp_path):
    """examples/train_backbone.py: warm_start carries the shipped weights, detail block included;
    export writes the run's generator and, with critic_from, the starting backbone's critic in
    place of the run's (a detail stage keeps the critic whose scores backbone fit reads)."""
    import sys

    sys.path.insert(0, str(JUDGE.parents[1]))
    from train_backbone import export, warm_start

    run = tmp_path / "run"
    warm_start(SHIPPED, run, refine_layers=1, detail_layers=1)
    setting = json.loads((run / "setting.txt").read_text())
    # as train-gan writes it for a block trained without the gate (the fifth stage)
    (run / "setting.txt").write_text(json.dumps({**setting, "detail_layers": 1, "detail_gate": 0.0}))
    checkpoint = next((run / "checkpoint").glob("weights.*.pth"))
    state = torch.load(checkpoint, weights_only=True)
    state["G"]["detail.0.outer.bias"] += 0.1  # as if trained
    state["D"] = {k: v + 1.0 if v.is_floating_point() else v for k, v in state["D"].items()}
    torch.save(state, checkpoint)
    trained, start = load_backbone(str(run)), load_backbone(str(SHIPPED))
    x, a = torch.rand(2, 3, 64, 64) * 2 - 1, torch.randint(0, 2, (2, 15)).float()
    with torch.no_grad():
        assert not torch.equal(trained(x, a), start(x, a))
        assert not torch.equal(trained.discriminator(x)[0], start.discriminator(x)[0])
        for critic_from, critic in ((None, trained), (SHIPPED, start)):
            written = export(run, tmp_path / f"out-{critic_from is None}", critic_from)
            exported = load_backbone(str(written.parent.parent))
            assert torch.equal(exported(x, a), trained(x, a))
            assert torch.equal(exported.discriminator(x)[0], critic.discriminator(x)[0])
        # The gate has no weights: exported with one, the same block adds less where the image
        # departs from the input (random x: everywhere), and the setting says so.
        gated = load_backbone(str(export(run, tmp_path / "gated", SHIPPED, detail_gate=0.03).parent.parent))
        assert [block.gate for block in gated.generator.detail] == [0.03]
        assert json.loads((tmp_path / "gated" / "setting.txt").read_text())["detail_gate"] == 0.03
        assert not torch.equal(gated(x, a), trained(x, a))
        assert (gated(x, a) - start(x, a)).abs().mean() < (trained(x, a) - start(x, a)).abs().mean()


def test_the_edits_picture_has_a_row_per_face_and_a_column_per_edit(tmp_path):
    """examples/backbone_edits.py (docs/backbone_edits.png): original, reconstruction and the 15
    edits of each face, 64x64 tiles with make_grid's 2-pixel padding."""
    import subprocess
    import sys

    from PIL import Image

    out = tmp_path / "edits.png"
    subprocess.run([sys.executable, str(JUDGE.parents[1] / "backbone_edits.py"), str(out), "--n", "2"], check=True)
    picture = np.asarray(Image.open(out).convert("RGB"))
    assert picture.shape == (2 + 2 * 66, 2 + 17 * 66, 3)
    tiles = [picture[2:66, 2 + 66 * c:66 + 66 * c] for c in range(17)]
    assert all(np.abs(tile.astype(int) - tiles[1]).mean() > 0 for tile in tiles[2:])  # every edit draws something else
