"""Task kinds and the probe's readings of model outputs, on real TorchScript / torch.export files.

Each model either runs with the right semantics (loss direction, success, describe()) or is
refused with one line that names the fix.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Tuple

import pytest
import torch

import sia_cli
from sia_cli.errors import SiaError
from sia_cli.targets import TASKS, Task, load_target, read_labels

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.* deprecation notices

SIZE = 16
POINTS = [[4.0, 4.0], [11.0, 4.0], [8.0, 8.0], [5.0, 12.0], [11.0, 12.0]]
LABELS_40 = [f"attr{i}" for i in range(39)] + ["Smiling"]


class Pooled(torch.nn.Module):
    """conv, global average, linear: `outputs` numbers per image, times `scale`, plus `offset`."""

    def __init__(self, outputs: int, scale: float = 1.0, offset: float = 0.0, sigmoid: bool = False, in_channels: int = 3):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, outputs)
        self.scale = scale
        self.offset = offset
        self.sigmoid = sigmoid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3))) * self.scale + self.offset
        return torch.sigmoid(out) if self.sigmoid else out


class Landmarks(torch.nn.Module):
    """Five (x, y) points in input pixels: fixed positions plus a small image-dependent offset."""

    def __init__(self, flat: bool):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 10, 3, padding=1)
        self.register_buffer("base", torch.tensor(POINTS).flatten())
        self.flat = flat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        points = self.base + self.conv(x).mean(dim=(2, 3))
        return points if self.flat else points.view(-1, 5, 2)


class FlatBatch(torch.nn.Module):
    """Flattens with a batch size written into the code, as a model traced with one example does."""

    def __init__(self, batch: int):
        super().__init__()
        self.fc = torch.nn.Linear(3 * SIZE * SIZE, 3)
        self.batch = batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(self.batch, -1))


class LogitsAndFeatures(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Pooled(8)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        features = self.inner(x)
        return self.head(features) * 10, features


class DetachedSecond(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Pooled(3, scale=10)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        logits = self.inner(x)
        return logits, logits.detach() * 2


def save_script(module: torch.nn.Module, path, sia_yaml: str | None = None, example_batch: int | None = None):
    module = module.eval()
    if example_batch is None:
        scripted = torch.jit.script(module)
    else:
        scripted = torch.jit.trace(module, torch.rand(example_batch, 3, SIZE, SIZE))
    torch.jit.save(scripted, str(path), _extra_files={"sia.yaml": sia_yaml} if sia_yaml else {})
    return path


def images(batch: int) -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE) * 2 - 1


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("task_models")
    names_yaml = f"class_names: {LABELS_40}\n"
    return {
        "sigmoid": save_script(Pooled(1, scale=5, sigmoid=True), folder / "sigmoid.pt"),
        "landmarks": save_script(Landmarks(flat=False), folder / "landmarks.pt"),
        "landmarks_flat": save_script(Landmarks(flat=True), folder / "landmarks_flat.pt"),
        "multilabel": save_script(Pooled(40, scale=5), folder / "multilabel.pt", sia_yaml=names_yaml),
        "multilabel_sigmoid": save_script(Pooled(40, scale=5, sigmoid=True), folder / "ml_sigmoid.pt", sia_yaml=names_yaml),
        "age": save_script(Pooled(1, scale=10, offset=30), folder / "age.pt"),
        "batch1": save_script(FlatBatch(1), folder / "batch1.pt", example_batch=1),
        "gray": save_script(Pooled(3, scale=10, in_channels=1), folder / "gray.pt"),
        "tuple": save_script(LogitsAndFeatures(), folder / "tuple.pt"),
        "detached": save_script(DetachedSecond(), folder / "detached.pt"),
    }


# -------------------------------------------------------------- the registry


def test_every_kind_is_one_registered_class():
    assert set(TASKS) == {"binary", "multiclass", "multilabel", "keypoints", "landmarks", "regression"}
    assert all(issubclass(task, Task) and task.name == name for name, task in TASKS.items())


def test_no_module_switches_on_the_task_kind():
    """Task-specific behaviour lives in the task classes: a new kind is one new class."""
    root = Path(sia_cli.__file__).parent
    switch = re.compile(r"\bkind\s*(==|!=|\bin\b|\bnot in\b)\s*[\"'(\[]")
    offenders = [
        f"{path.relative_to(root)}:{number}: {line.strip()}"
        for path in sorted(root.rglob("*.py")) if path.name != "attgan.py"  # norm/activation kinds, not tasks
        for number, line in enumerate(path.read_text().splitlines(), start=1) if switch.search(line)
    ]
    assert not offenders, offenders


# ---------------------------------------------------------- logits or probability


def test_sigmoid_binary_without_output_type_is_refused_with_the_flag(models):
    with pytest.raises(SiaError) as error:
        load_target(models["sigmoid"], probe_size=SIZE)
    line = one_line(error)
    assert line.startswith("model outputs all lie in [0, 1] (")
    assert "--output probability" in line and "--output logits" in line


def test_sigmoid_binary_with_output_probability(models):
    target = load_target(models["sigmoid"], output="probability", probe_size=SIZE)
    assert target.kind == "binary" and target.output_is_probability
    described = target.describe()
    assert described["output"] == "probability" and described["sources"]["output"] == "option"
    out = target(images(4))
    ref = target.reference(out)
    # The output is P(class 1) itself: not squashed a second time.
    assert torch.equal(target.predict(out), out.detach())
    assert not target.success(out, ref).any() and target.success(1 - out, ref).all()
    assert (target.loss(1 - out, ref) > target.loss(out, ref)).all()


def test_probability_output_outside_unit_range_is_refused(models):
    with pytest.raises(SiaError) as error:
        load_target(models["age"], output="probability", probe_size=SIZE)
    assert "outside [0, 1]" in one_line(error) and "--output logits" in one_line(error)


# ------------------------------------------------------------------ landmarks


@pytest.mark.parametrize("name, task", [("landmarks", None), ("landmarks_flat", "landmarks")])
def test_landmarks_in_both_layouts(models, name, task):
    target = load_target(models[name], task=task, probe_size=SIZE)
    assert target.kind == "landmarks" and target.num_outputs == 5
    described = target.describe()
    assert described["nme_normaliser"] == "diagonal of the 16x16 input (pixels)"
    assert described["sources"]["task"] == ("output shape" if task is None else "option")
    out = target(images(3))
    ref = target.reference(out)
    assert target.predict(out).shape == (3, 5, 2)
    assert torch.allclose(target.predict(out).reshape(3, -1), out.detach().reshape(3, -1))
    assert torch.equal(target.loss(out, ref), torch.zeros(3))
    shifted = (target.predict(out) + torch.tensor([3.0, 0.0])).reshape(out.shape)
    assert (target.loss(shifted, ref) > 0).all()
    expected = 3 / math.hypot(SIZE, SIZE)
    assert torch.allclose(target.error(shifted, ref), torch.full((3,), expected))
    assert target.success(shifted, ref, nme_threshold=expected - 0.01).all()
    assert not target.success(shifted, ref, nme_threshold=expected + 0.01).any()
    assert torch.allclose(target.distance(shifted, out), torch.full((3,), expected))
    assert torch.equal(target.record_label(ref), target.predict(out))


def test_flat_landmarks_without_task_are_multiclass_with_an_assumption(models):
    target = load_target(models["landmarks_flat"], probe_size=SIZE)
    assert target.kind == "multiclass"
    assert any("--task landmarks for 5 (x, y) points" in line for line in target.assumptions)
    assert target.describe()["assumptions"] == target.assumptions


def test_landmark_nme_over_the_eyes_and_labels(models, tmp_path):
    target = load_target(models["landmarks_flat"], task="landmarks", eye_indices="0,1", probe_size=SIZE)
    assert target.describe()["nme_normaliser"] == "inter-ocular distance (points 0 and 1)"
    labels = tmp_path / "points.csv"
    labels.write_text("file," + ",".join(f"x{i},y{i}" for i in range(1, 6)) + "\na.png," +
                      ",".join(str(v) for point in POINTS for v in point) + "\n")
    values = read_labels(labels, target.task)
    ref = target.reference_from_labels([values["a.png"]])
    assert ref.shape == (1, 10)
    shifted = ref + torch.tensor([2.0, 0.0]).repeat(5)
    assert target.error(shifted, ref).item() == pytest.approx(2 / 7)  # eyes 7 px apart
    with pytest.raises(SiaError, match="do not name two of the model's 5 keypoints"):
        load_target(models["landmarks"], eye_indices=[0, 5], probe_size=SIZE)


# ----------------------------------------------------------------- multilabel


def test_multilabel_attacks_the_chosen_label(models):
    target = load_target(models["multilabel"], task="multilabel", label="Smiling", probe_size=SIZE)
    assert target.kind == "multilabel" and target.num_outputs == 40
    described = target.describe()
    assert described["label"] == "Smiling" and described["output"] == "logits"
    out = target(images(4))
    assert out.shape == (4, 40)
    column = out[:, 39]
    assert torch.allclose(target.predict(out), torch.sigmoid(column))
    ref = target.reference(out)
    assert torch.equal(ref, (column > 0).float())
    flipped = out.clone()
    flipped[:, 39] = -column
    assert not target.success(out, ref).any() and target.success(flipped, ref).all()
    assert (target.loss(flipped, ref) > target.loss(out, ref)).all()
    other = out.clone()
    other[:, :39] = -other[:, :39]  # every other label changes: nothing the attack counts
    assert not target.success(other, ref).any() and torch.equal(target.distance(other, out), torch.zeros(4))
    assert torch.allclose(target.distance(flipped, out), (torch.sigmoid(column) - torch.sigmoid(-column)).abs())
    assert target.task.class_labels == ["not Smiling", "Smiling"]
    # An index picks the same label; --label alone reads (B, C) as multilabel.
    assert load_target(models["multilabel"], task="multilabel", label="39", probe_size=SIZE).task.label_index == 39
    assert load_target(models["multilabel"], label=39, probe_size=SIZE).kind == "multilabel"


def test_forty_outputs_without_task_record_the_multiclass_reading(models):
    target = load_target(models["multilabel"], probe_size=SIZE)
    assert target.kind == "multiclass"
    line = next(line for line in target.assumptions if "(B, 40)" in line)
    assert "40-class softmax" in line and "--task multilabel --label NAME" in line and "20 (x, y) points" in line


def test_forty_sigmoids_without_task_say_they_look_independent(models):
    target = load_target(models["multilabel_sigmoid"], probe_size=SIZE)
    assert target.kind == "multiclass"
    assert any("do not sum to 1" in line and "--task multilabel" in line for line in target.assumptions)


class Softmax(torch.nn.Module):
    """A two-class softmax head, as MTCNN's ONet and many exported classifiers end."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.inner = Pooled(2, scale=5)
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.inner(x) / self.temperature).softmax(dim=1)


def test_a_softmax_head_is_refused_without_output_like_a_sigmoid_one(tmp_path):
    torch.manual_seed(0)
    path = save_script(Softmax(), tmp_path / "softmax.pt")
    with pytest.raises(SiaError) as error:
        load_target(path, probe_size=SIZE)
    line = one_line(error)
    assert "sums to 1" in line and "softmax probabilities" in line and "--output probability" in line
    target = load_target(path, output="probability", probe_size=SIZE)
    assert target.kind == "multiclass" and target.output_is_probability


def test_a_label_on_a_softmax_head_is_refused_unless_multilabel_is_said(tmp_path):
    """--label alone reads (B, C) as independent labels; a softmax's rows sum to 1, so that
    reading was silently wrong (a class's probability below 0.5 can still be the arg-max)."""
    torch.manual_seed(0)
    path = save_script(Softmax(), tmp_path / "softmax.pt")
    with pytest.raises(SiaError) as error:
        load_target(path, output="probability", label="1", probe_size=SIZE)
    line = one_line(error)
    assert "--label 1" in line and "sums to 1" in line and "drop --label" in line and "--task multilabel" in line
    said = load_target(path, output="probability", label="1", task="multilabel", probe_size=SIZE)
    assert said.kind == "multilabel" and any("sums to 1" in text for text in said.assumptions)


def test_the_refusal_shows_the_range_with_digits_that_mean_something(tmp_path):
    torch.manual_seed(0)
    path = save_script(Pooled(1, scale=0.01, offset=-9, sigmoid=True), tmp_path / "tiny.pt")  # p about 1.2e-4
    with pytest.raises(SiaError) as error:
        load_target(path, probe_size=SIZE)
    line = one_line(error)
    assert re.search(r"\(0\.000\d{3}\.\.0\.000\d{3}\)", line), line  # three significant digits, never 0.00..0.00


@pytest.mark.parametrize("kwargs, words", [
    ({"task": "multilabel"}, ["needs the label under attack", "--label", "Smiling"]),
    ({"task": "multilabel", "label": "Frowning"}, ["--label Frowning", "not one of the model's 40 labels"]),
    ({"task": "multilabel", "label": "40"}, ["--label 40", "not one of"]),
])
def test_multilabel_label_problems_name_the_flag(models, kwargs, words):
    with pytest.raises(SiaError) as error:
        load_target(models["multilabel"], probe_size=SIZE, **kwargs)
    for word in words:
        assert word in one_line(error)


def test_multilabel_sigmoid_outputs_need_the_output_type(models):
    with pytest.raises(SiaError) as error:
        load_target(models["multilabel_sigmoid"], task="multilabel", label="Smiling", probe_size=SIZE)
    assert "--output probability" in one_line(error)
    target = load_target(models["multilabel_sigmoid"], task="multilabel", label="Smiling", output="probability",
                         probe_size=SIZE)
    out = target(images(2))
    assert torch.equal(target.predict(out), out[:, 39])


# ----------------------------------------------------------------- regression


def test_regression_with_a_margin(models):
    target = load_target(models["age"], task="regression", margin=2.0, probe_size=SIZE)
    assert target.kind == "regression"
    described = target.describe()
    assert described["margin"] == 2.0 and described["sources"]["margin"] == "option" and described["output"] is None
    out = target(images(3))
    assert out.shape == (3,)
    ref = target.reference(out)
    assert torch.equal(target.predict(out), out.detach())
    assert torch.equal(target.loss(out, ref), torch.zeros(3)) and (target.loss(out + 1, ref) > 0).all()
    assert not target.success(out + 1.5, ref).any() and target.success(out - 2.5, ref).all()
    assert torch.allclose(target.distance(out + 3, out), torch.full((3,), 1.5))


class Squeezed(torch.nn.Module):
    """One number per image as (B,), not (B, 1): how many regression heads end."""

    def __init__(self):
        super().__init__()
        self.inner = Pooled(1, scale=10, offset=30)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).squeeze(1)


def test_the_assumption_names_the_shape_the_model_returns(tmp_path):
    target = load_target(save_script(Squeezed(), tmp_path / "squeezed.pt"), probe_size=SIZE)
    assert target.kind == "binary" and any(line.startswith("output (B) read as binary") for line in target.assumptions)


def test_one_output_without_task_is_binary_with_an_assumption(models):
    target = load_target(models["age"], probe_size=SIZE)
    assert target.kind == "binary" and target.describe()["sources"]["output"].startswith("probe")
    assert any("output (B, 1) read as binary" in line and "--task regression" in line for line in target.assumptions)
    assert load_target(models["age"], task="regression", probe_size=SIZE).describe()["margin"] == 1.0
    with pytest.raises(SiaError) as error:
        load_target(models["landmarks"], margin=2.0, probe_size=SIZE)
    assert "--margin 2.0 is for regression models" in one_line(error)


# ------------------------------------------------------------ grayscale models


def test_one_channel_model(models, tmp_path):
    with pytest.raises(SiaError) as error:
        load_target(models["gray"], probe_size=SIZE)
    assert "model wants 1-channel input" in one_line(error) and "--channels 1" in one_line(error)
    target = load_target(models["gray"], channels=1, mean=0.5, std=0.25, probe_size=SIZE)
    described = target.describe()
    assert described["channels"] == 1 and described["mean"] == [0.5] and described["std"] == [0.25]
    img = images(2)
    rgb = (img + 1) / 2
    luma = 0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]
    torch.testing.assert_close(target.preprocess(img), (luma - 0.5) / 0.25)
    with pytest.raises(SiaError, match="--mean must be one number for a 1-channel"):
        load_target(models["gray"], channels=1, mean=[0.5, 0.5, 0.5], probe_size=SIZE)
    yaml_model = save_script(Pooled(3, in_channels=1), tmp_path / "gray_yaml.pt", sia_yaml="channels: 1\n")
    assert load_target(yaml_model, probe_size=SIZE).describe()["sources"]["channels"] == "sia.yaml"


def test_exported_one_channel_graph_sets_the_channels(tmp_path):
    path = tmp_path / "gray.pt2"
    module = Pooled(3, in_channels=1).eval()
    torch.export.save(torch.export.export(module, (torch.rand(2, 1, SIZE, SIZE),)), str(path))
    target = load_target(path, probe_size=SIZE)
    assert target.channels == 1 and target.describe()["sources"]["channels"] == "export graph"
    with pytest.raises(SiaError, match="--channels 3 contradicts .* takes 1-channel input"):
        load_target(path, channels=3, probe_size=SIZE)


# ---------------------------------------------------------- fixed-batch models


def test_model_traced_with_one_example_runs_at_batch_one(models):
    target = load_target(models["batch1"], probe_size=SIZE)
    assert target.static_batch == 1 and target.batch_range == (1, 1)
    assert target.describe()["static_batch"] == 1
    eager = torch.jit.load(str(models["batch1"]))
    img = images(5)
    expected = torch.cat([eager((image[None] + 1) / 2) for image in img])
    torch.testing.assert_close(target(img), expected)


def test_model_traced_with_two_examples_keeps_batch_two(tmp_path):
    path = save_script(FlatBatch(2), tmp_path / "batch2.pt", example_batch=2)
    target = load_target(path, probe_size=SIZE)
    assert target.static_batch == 2 and target(images(5)).shape == (5, 3)


def test_fixed_batch_model_failing_for_another_reason_is_not_blamed_on_the_batch(models):
    with pytest.raises(SiaError) as error:
        load_target(models["batch1"], input_size=8, probe_size=SIZE)
    line = one_line(error)
    assert "--input-size" in line and "batch 1" not in line


# --------------------------------------------------------------- tuple outputs


def test_tuple_element_that_does_not_fit_is_refused_naming_output_key(models):
    with pytest.raises(SiaError) as error:
        load_target(models["tuple"], output_key=1, task="binary", probe_size=SIZE)
    line = one_line(error)
    assert "--task binary does not fit" in line and "(2, 8)" in line and "--output-key" in line
    # Picked for fitting --task among several: said, with the way to pick another.
    target = load_target(models["tuple"], task="multiclass", probe_size=SIZE)
    assert target.output_key == 1
    assert any("output 1 is used" in line and "--output-key" in line for line in target.assumptions)


@pytest.mark.parametrize("kwargs, words", [
    ({"output_key": 5}, ["--output-key 5", "returns one tensor", "drop --output-key"]),
    ({"landmark_layout": "xxyy"}, ["--landmark-layout xxyy", "this model is multiclass", "--task landmarks"]),
])
def test_options_that_would_change_nothing_are_refused_not_ignored(models, kwargs, words):
    """An option the model gives no use to is a sign the user meant another model or reading."""
    with pytest.raises(SiaError) as error:
        load_target(models["multilabel"], probe_size=SIZE, **kwargs)
    for word in words:
        assert word in one_line(error)


def test_tuple_element_without_gradient_is_refused_naming_output_key(models):
    with pytest.raises(SiaError) as error:
        load_target(models["detached"], output_key=1, probe_size=SIZE)
    line = one_line(error)
    assert "not differentiable" in line and "--output-key" in line
    assert load_target(models["detached"], output_key=0, probe_size=SIZE).kind == "multiclass"


# ---------------------------------------------------------------- provenance


def test_describe_gives_the_resolved_settings_and_their_sources(models):
    target = load_target(models["sigmoid"], output="probability", probe_size=SIZE)
    described = target.describe()
    assert described["input_size"] == [SIZE, SIZE]  # the generator's size: never null
    for key in ("mean", "std", "channels", "output", "task", "input_size"):
        assert key in described["sources"]
    assert described["sources"]["input_size"].startswith("default")
    assert described["static_batch"] is None and described["kind"] == "binary"


class XXYYHead(torch.nn.Module):
    """Five points emitted MTCNN's way, (B, 10) as x1..x5, y1..y5, moving a little with the image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = torch.tensor([10.0, 20.0, 15.0, 11.0, 19.0])
        ys = torch.tensor([12.0, 12.0, 18.0, 24.0, 24.0])
        shift = x.mean(dim=(1, 2, 3)).unsqueeze(1)
        return torch.cat([xs + shift, ys - shift], dim=1)


def test_an_mtcnn_style_head_reads_its_points_with_landmark_layout_xxyy(tmp_path):
    path = save_script(XXYYHead(), tmp_path / "xxyy.pt")
    target = load_target(path, task="landmarks", landmark_layout="xxyy", eye_indices=(0, 1), probe_size=SIZE)
    points = target.predict(target(torch.zeros(1, 3, SIZE, SIZE)))  # images in [-1, 1]: 0 is mid-grey
    expected = torch.tensor([[10.0, 12.0], [20.0, 12.0], [15.0, 18.0], [11.0, 24.0], [19.0, 24.0]]) + torch.tensor([0.5, -0.5])
    assert torch.allclose(points[0], expected, atol=1e-4), points
    assert target.describe()["landmark_layout"] == "xxyy"
    # Read as x1, y1, x2, ... the same numbers are other points: the eyes would sit 8 px apart, not 10.
    wrong = load_target(path, task="landmarks", eye_indices=(0, 1), probe_size=SIZE)
    assert not torch.allclose(wrong.predict(wrong(torch.zeros(1, 3, SIZE, SIZE)))[0], expected)
    labels = expected.unsqueeze(0)
    assert torch.equal(target.task.points(target.task.reference_from_labels(labels)), labels)
    with pytest.raises(SiaError, match="--landmark-layout must be xyxy"):
        load_target(path, task="landmarks", landmark_layout="yxyx", probe_size=SIZE)
