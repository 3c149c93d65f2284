"""sia_cli.engine.attribution: captum's maps of real TorchScript and torch.export files, checked
against what is known of them (a linear model's gradient is its weights; integrated gradients
add up to the score's change from the baseline)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sia_cli.engine.attribution import attribution_maps
from sia_cli.measures.explanations import top_k_intersection
from sia_cli.errors import SiaError
from sia_cli.targets import load_target

SIZE = 16


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3 * SIZE * SIZE))

    def forward(self, x):
        return (x.flatten(1) * self.weight).sum(dim=1, keepdim=True)


class Small(nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Linear(6, classes)

    def forward(self, x):
        return self.head(torch.nn.functional.softplus(self.conv(x)).mean(dim=(2, 3)))


def scripted(module: nn.Module, path) -> str:
    torch.manual_seed(0)
    module.eval()
    torch.jit.script(module).save(str(path))
    return str(path)


@pytest.fixture()
def images():
    torch.manual_seed(1)
    return torch.rand(3, 3, SIZE, SIZE) * 2 - 1


def test_saliency_of_a_linear_model_is_its_weight_through_the_preprocessing(tmp_path, images):
    torch.manual_seed(0)
    module = Linear()
    target = load_target(scripted(module, tmp_path / "linear.pt"), task="binary", output="logits",
                         probe_size=SIZE, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    reference = torch.tensor([1.0, 0.0, 1.0])
    found = attribution_maps(target, images, reference, "saliency")
    # [-1, 1] -> [0, 1] halves, the std of 0.25 multiplies by 4: d logit / dx = 2 w
    expected = (2 * module.weight.detach()).abs().view(3, SIZE, SIZE)
    for i in range(3):
        assert torch.allclose(found[i], expected, atol=1e-5)


@pytest.mark.parametrize("fmt", ["torchscript", "export"])
def test_integrated_gradients_add_up_to_the_change_of_the_reference_logit(tmp_path, images, fmt):
    torch.manual_seed(0)
    module = Small(4).eval()
    if fmt == "torchscript":
        path = scripted(module, tmp_path / "small.pt")
    else:
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(module, (torch.rand(2, 3, SIZE, SIZE),), dynamic_shapes=({0: batch},))
        path = tmp_path / "small.pt2"
        torch.export.save(program, str(path))
    target = load_target(path, task="multiclass", probe_size=SIZE)
    reference = torch.tensor([0, 2, 3])
    found = attribution_maps(target, images, reference, "integrated_gradients", steps=200)
    with torch.no_grad():
        change = target.explained_score(target(images), reference) - \
            target.explained_score(target(torch.zeros_like(images)), reference)
    assert torch.allclose(found.sum(dim=(1, 2, 3)), change, rtol=0.02, atol=1e-3)
    # another class explains something else
    other = attribution_maps(target, images, torch.tensor([1, 1, 1]), "integrated_gradients", steps=50)
    assert not torch.allclose(found, other)


def test_the_binary_reference_class_zero_explains_the_negative_logit(tmp_path, images):
    target = load_target(scripted(Linear(), tmp_path / "l.pt"), task="binary", output="logits", probe_size=SIZE)
    ones = attribution_maps(target, images, torch.ones(3), "integrated_gradients", steps=20)
    zeros = attribution_maps(target, images, torch.zeros(3), "integrated_gradients", steps=20)
    assert torch.allclose(ones, -zeros, atol=1e-6)


def test_gradient_shap_is_seeded_and_runs_on_a_model_file(tmp_path, images):
    target = load_target(scripted(Small(2), tmp_path / "s.pt"), task="multiclass", probe_size=SIZE)
    first = attribution_maps(target, images, torch.tensor([0, 1, 0]), "gradient_shap", samples=8, seed=3)
    again = attribution_maps(target, images, torch.tensor([0, 1, 0]), "gradient_shap", samples=8, seed=3)
    assert first.shape == images.shape and torch.equal(first, again) and first.abs().sum() > 0


def test_a_model_without_a_class_score_is_refused_in_one_line(tmp_path, images):
    target = load_target(scripted(Small(1), tmp_path / "r.pt"), task="regression", probe_size=SIZE)
    with pytest.raises(SiaError, match="need class scores"):
        attribution_maps(target, images, torch.zeros(3), "saliency")


class Rippled(nn.Module):
    """A confident binary logit: 10, plus a linear part that rests on a few pixels (weight 1 on
    `k` of them, 0.001 elsewhere), plus a ripple. Without the ripple the map is x * w: its top k
    are those pixels whatever a few grey levels change. With it, each pixel's integrated gradient
    is dominated by amplitude * sin(frequency * x) / frequency, which a change of a few grey
    levels reorders while the prediction stays."""

    def __init__(self, amplitude: float, k: int, frequency: float = 150.0, size: int = SIZE):
        super().__init__()
        torch.manual_seed(0)
        weight = torch.full((size * size,), 0.001)
        weight[torch.randperm(size * size)[:k]] = 1.0
        self.weight = nn.Parameter(weight.repeat(3))
        self.ripple = nn.Parameter(torch.rand(3 * size * size) + 0.5)
        self.amplitude, self.frequency = amplitude, frequency

    def forward(self, x):
        flat = x.flatten(1)
        ripple = self.amplitude * (self.ripple * torch.sin(self.frequency * flat)).sum(dim=1) / self.frequency
        return (10 + (flat * self.weight).sum(dim=1) * 0.01 + ripple).unsqueeze(1)


def test_the_feature_importance_attack_moves_a_fragile_map_and_not_a_stable_one(tmp_path, images):
    from sia_cli.engine.attribution import feature_importance_attack
    from sia_cli.measures.explanations import kendall_tau, top_k

    found = {}
    k = top_k(SIZE * SIZE)
    for name, amplitude in (("stable", 0.0), ("fragile", 20.0)):
        target = load_target(scripted(Rippled(amplitude, k), tmp_path / f"{name}.pt"), task="binary", output="logits",
                             probe_size=SIZE, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        reference = torch.ones(3)
        result = feature_importance_attack(target, images, reference, k=k, epsilon=8 / 255, steps=8,
                                           step_size=1 / 255, path_steps=8, measure_steps=40)
        moved = (result["adversaries"] - images).abs().amax()
        assert moved <= 2 * 8 / 255 + 1e-6  # within epsilon ([0, 1] units; images in [-1, 1])
        with torch.no_grad():
            assert not target.success(target(result["adversaries"]), reference).any()  # prediction kept
        found[name] = (float(top_k_intersection(result["clean_maps"], result["attacked_maps"], k).mean()),
                       float(kendall_tau(result["clean_maps"], result["attacked_maps"]).mean()))
    assert found["stable"][0] > 0.9 and found["stable"][1] > 0.9, found
    # the attack aims at the top k: they move most; the order of all pixels follows less
    assert found["fragile"][0] < found["stable"][0] - 0.4, found
    assert found["fragile"][1] < found["stable"][1] - 0.1, found


class ReluNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_the_attack_can_move_a_relu_torchscript_model_whose_second_derivative_is_zero(tmp_path, images):
    """A ReLU graph's gradient is piecewise constant, so an attack on its saliency map has
    nothing to follow; the integrated-gradient map x * (mean path gradient) still moves with x."""
    from sia_cli.engine.attribution import _path_gradients

    target = load_target(scripted(ReluNet(), tmp_path / "relu.pt"), task="multiclass", probe_size=SIZE)
    x = images.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(_path_gradients(target, x, torch.tensor([0, 1, 2]), 8).abs().sum(), x)
    assert gradient.abs().sum() > 0


class DarkInRegion(nn.Module):
    """A confident binary logit (10) plus a little for each dark pixel in `mask` (darker than
    `darkness` in [-1, 1]: -0.3 is 0.35 in [0, 1]): no edit changes its prediction, and its
    explanation is the dark pixels of the mask."""

    def __init__(self, mask: torch.Tensor, darkness: float = -0.3):
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter((torch.rand(3, *mask.shape) + 0.5) * mask)
        self.darkness = darkness

    def forward(self, x):
        return (10 + 0.01 * (torch.relu(self.darkness - x) * self.weight).sum(dim=(1, 2, 3))).unsqueeze(1)


def test_the_edit_that_moves_a_planted_explanation_most_is_the_one_planted(tmp_path):
    """Against the truth: the renderer as the backbone (each face drawn again with one attribute
    changed), and a model whose explanation rests on the pixels that eyeglasses cover and whose
    prediction no edit changes. Drawing eyeglasses moves that explanation most."""
    import sys
    from pathlib import Path

    from sia_cli.backbone.registry import load_backbone
    from sia_cli.engine.attribution import explanation_shifts
    from sia_cli.inputs.faces import render_index
    from sia_cli.inputs.images import image_tensor

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from measure_backbone import Renderer, fresh_faces

    names = load_backbone(None).attributes
    images, attrs = fresh_faces(10, 77, 64, names)
    covered = torch.zeros(64, 64, dtype=torch.bool)
    for index, row in enumerate(attrs):
        drawn = {name: bool(v > 0.5) for name, v in zip(names, row)}
        on, off = ({**drawn, "Eyeglasses": state} for state in (True, False))
        pair = [image_tensor(render_index(a, 77, index, 64)[0], 64) for a in (on, off)]
        covered |= (pair[0] - pair[1]).abs().amax(dim=0) > 0.05
    target = load_target(scripted(DarkInRegion(covered.float()), tmp_path / "region.pt"), task="binary", output="logits",
                         probe_size=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = images * 2 - 1
    shifts = explanation_shifts(target, Renderer(names, images, seed=77), x, attrs, torch.ones(len(x)),
                                k=40, steps=20)
    assert all(entry["flipped"] == 0 for entry in shifts.values())  # no edit changes the prediction
    mean = {name: sum(e["top_k_intersection"]) / len(e["top_k_intersection"]) for name, e in shifts.items()}
    assert min(mean, key=mean.get) == "Eyeglasses", mean
    others = sorted(v for name, v in mean.items() if name != "Eyeglasses")
    assert mean["Eyeglasses"] < others[len(others) // 2] - 0.2, mean
