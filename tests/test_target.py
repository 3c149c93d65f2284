"""Target loading and task logic, on real TorchScript and torch.export files."""

from __future__ import annotations

import math
import zipfile
from typing import Dict, Tuple

import pytest
import torch
import torch.nn.functional as F

from sia_cli.errors import SiaError
from sia_cli.targets import gaussian_heatmaps, load_target, read_labels

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.* deprecation notices

SIZE = 16


class Features(torch.nn.Module):
    def __init__(self, out_channels: int = 4, in_channels: int = 3):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(x)))


class Classifier(torch.nn.Module):
    def __init__(self, classes: int, flat: bool = False):
        super().__init__()
        self.features = Features()
        self.head = torch.nn.Linear(4, classes)
        self.flat = flat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.features(x).mean(dim=(2, 3)))
        return logits[:, 0] if self.flat else logits


class Heatmaps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = Features(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.features(x), 16)


class Wrapped(torch.nn.Module):
    """A classifier whose output passes through `how`; TorchScript has no super().forward."""

    def __init__(self, how: str, classes: int = 1):
        super().__init__()
        self.inner = Classifier(classes)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "detach":
            x = x.detach()
        logits = self.inner(x)
        if self.how == "sigmoid":
            return torch.sigmoid(logits)
        if self.how == "nan":
            return logits * float("nan")
        return logits


class TupleOutput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = Features(8)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        pooled = self.features(x).mean(dim=(2, 3))
        return self.head(pooled), pooled


class DictOutput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = TupleOutput()

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits, pooled = self.inner(x)
        return {"logits": logits, "features": pooled}


class WrongShape(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))[:, :2].unsqueeze(-1).expand(-1, 2, 3)


class Thresholded(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x > 0.5).float().mean(dim=(1, 2, 3))


def save_script(module: torch.nn.Module, path, sia_yaml: str | None = None, trace: bool = False):
    module = module.eval()
    scripted = torch.jit.trace(module, torch.rand(2, 3, SIZE, SIZE)) if trace else torch.jit.script(module)
    extra = {"sia.yaml": sia_yaml} if sia_yaml is not None else {}
    torch.jit.save(scripted, str(path), _extra_files=extra)
    return path


def save_export(module: torch.nn.Module, path, batch: int = 4, dynamic: bool = False, sia_yaml: str | None = None):
    example = (torch.rand(batch, 3, SIZE, SIZE),)
    shapes = {"x": {0: torch.export.Dim("batch", max=64)}} if dynamic else None
    extra = {"sia.yaml": sia_yaml} if sia_yaml is not None else None
    torch.export.save(torch.export.export(module, example, dynamic_shapes=shapes), str(path), extra_files=extra)
    return path


def images(batch: int, size: int = SIZE) -> torch.Tensor:
    return torch.rand(batch, 3, size, size) * 2 - 1


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models")
    keypoint_yaml = "eye_indices: [0, 1]\n"
    return {
        "binary": save_script(Classifier(1), folder / "binary.pt"),
        "binary_flat": save_script(Classifier(1, flat=True), folder / "binary_flat.pt", trace=True),
        "multiclass": save_script(Classifier(5), folder / "multiclass.pt"),
        "keypoints": save_script(Heatmaps(), folder / "keypoints.pt"),
        "keypoints_eyes": save_script(Heatmaps(), folder / "keypoints_eyes.pt", sia_yaml=keypoint_yaml),
    }


# ----------------------------------------------------------------- task kinds


@pytest.mark.parametrize("name", ["binary", "binary_flat"])
def test_binary_model(models, name):
    # The flat model's random logits happen to lie in [0, 1]: it must be told they are logits.
    target = load_target(models[name], probe_size=SIZE, output="logits" if name == "binary_flat" else None)
    assert target.kind == "binary" and target.format == "torchscript"
    out = target(images(6))
    assert out.shape == (6,)
    ref = target.reference(out)
    assert ref.dtype == torch.float32 and set(ref.tolist()) <= {0.0, 1.0}
    assert not target.success(out, ref).any()
    assert target.success(-out, ref).all()
    assert (target.loss(-out, ref) > target.loss(out, ref)).all()
    assert torch.allclose(target.predict(out), torch.sigmoid(out))
    assert (target.error(out, ref) < 0.5).all() and (target.error(-out, ref) > 0.5).all()


def test_multiclass_model(models):
    target = load_target(models["multiclass"], probe_size=SIZE)
    assert target.kind == "multiclass" and target.num_outputs == 5
    out = target(images(4))
    ref = target.reference(out)
    assert ref.dtype == torch.long and torch.equal(target.predict(out), out.argmax(1))
    assert not target.success(out, ref).any()
    assert target.success(-out, ref).all()
    assert target.loss(out, ref).shape == (4,)
    assert (target.loss(-out, ref) > target.loss(out, ref)).all()
    assert torch.allclose(target.distance(out, out), torch.zeros(4))


def test_keypoint_model(models):
    target = load_target(models["keypoints"], probe_size=SIZE)
    assert target.kind == "keypoints" and target.heatmap_size == (16, 16)
    out = target(images(3))
    ref = target.reference(out)
    assert torch.equal(ref, out.detach()) and not ref.requires_grad
    assert target.predict(out).shape == (3, 5, 2)
    assert torch.equal(target.loss(out, ref), torch.zeros(3))
    assert not target.success(out, ref).any()
    assert target.loss(out + 1, ref).allclose(torch.ones(3))


def test_binary_probability_output(tmp_path):
    path = save_script(Wrapped("sigmoid"), tmp_path / "p.pt", sia_yaml="output: probability\nclass_names: [absent, present]\n")
    target = load_target(path, probe_size=SIZE)
    assert target.output_is_probability and target.class_names == ["absent", "present"]
    out = target(images(4))
    ref = target.reference(out)
    assert torch.equal(target.predict(out), out.detach())
    assert not target.success(out, ref).any() and target.success(1 - out, ref).all()
    saturated = torch.tensor([0.0, 1.0])
    assert torch.isfinite(target.loss(saturated, torch.tensor([1.0, 0.0]))).all()


def test_nme_normaliser_eyes_versus_diagonal(models):
    coords = torch.tensor([[[4.0, 4], [10, 4], [7, 8], [5, 12], [9, 12]]])
    shifted = coords + torch.tensor([3.0, 0.0])
    for name, expected in [("keypoints_eyes", 3 / 6), ("keypoints", 3 / math.hypot(16, 16))]:
        target = load_target(models[name], probe_size=SIZE)
        ref = target.reference_from_labels(coords)
        out = gaussian_heatmaps(shifted, (16, 16))
        assert ref.shape == (1, 5, 16, 16) and ref.amax().item() == pytest.approx(1.0)
        assert target.error(out, ref).item() == pytest.approx(expected)
        assert target.success(out, ref, nme_threshold=expected - 0.01).item()
        assert not target.success(out, ref, nme_threshold=expected + 0.01).item()


# -------------------------------------------------------------- preprocessing


def test_sia_yaml_settings_and_explicit_override(tmp_path):
    text = "input_size: [12, 10]\nmean: [0.5, 0.5, 0.5]\nstd: [0.25, 0.25, 0.25]\noutput: logits\n"
    path = save_script(Classifier(1), tmp_path / "m.pt", sia_yaml=text)
    target = load_target(path, probe_size=SIZE)
    assert target.input_size == (12, 10) and target.mean == (0.5,) * 3 and target.std == (0.25,) * 3
    x = target.preprocess(torch.ones(1, 3, SIZE, SIZE))
    assert x.shape == (1, 3, 12, 10) and torch.allclose(x, torch.full_like(x, 2.0))
    assert torch.allclose(target.preprocess(torch.zeros(1, 3, SIZE, SIZE)), torch.zeros(1, 3, 12, 10), atol=1e-6)

    target = load_target(path, input_size=8, mean=[0, 0, 0], std=[1, 1, 1], probe_size=SIZE)
    x = target.preprocess(torch.zeros(2, 3, SIZE, SIZE))
    assert x.shape == (2, 3, 8, 8) and torch.allclose(x, torch.full_like(x, 0.5))


def test_no_settings_means_no_resize_and_unit_range(models):
    target = load_target(models["binary"], probe_size=SIZE)
    assert target.input_size is None
    img = images(2, size=20)
    assert torch.allclose(target.preprocess(img), (img + 1) / 2)


def test_preprocess_gradient_matches_finite_differences(models):
    target = load_target(models["binary"], input_size=(5, 4), mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.25], probe_size=SIZE)
    img = (torch.rand(1, 3, 7, 7, dtype=torch.float64) * 2 - 1).requires_grad_()
    assert torch.autograd.gradcheck(target.preprocess, (img,))


def test_eval_on_target_leaves_model_mode_alone(models):
    target = load_target(models["binary"], probe_size=SIZE)
    target.train()
    assert not target.model.training


# ------------------------------------------------------------- torch.export


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("export")
    module = Classifier(5).eval()
    return {
        "module": module,
        "script": save_script(module, folder / "m.pt"),
        "static": save_export(module, folder / "static.pt2", batch=4),
        "dynamic": save_export(module, folder / "dynamic.pt2", dynamic=True, sia_yaml="class_names: [a, b, c, d, e]\n"),
    }


@pytest.mark.parametrize("batch", [3, 6])
def test_static_batch_export_pads_and_chunks(exported, batch):
    target = load_target(exported["static"], probe_size=SIZE)
    reference = load_target(exported["script"], probe_size=SIZE)
    assert target.format == "export" and target.static_batch == 4 and target.kind == "multiclass"
    img = images(batch)
    torch.testing.assert_close(target(img), reference(img))


def test_dynamic_batch_export(exported):
    target = load_target(exported["dynamic"], probe_size=SIZE)
    # The exported image size is the default input size; sia.yaml is read from the archive too.
    assert target.static_batch is None and target.input_size == (SIZE, SIZE)
    assert target.class_names == ["a", "b", "c", "d", "e"]
    img = images(5, size=2 * SIZE)
    torch.testing.assert_close(target(img), load_target(exported["script"], input_size=SIZE, probe_size=SIZE)(img))


def test_gradients_flow_through_export(exported):
    target = load_target(exported["static"], probe_size=SIZE)
    script = load_target(exported["script"], probe_size=SIZE)
    img = images(6)
    gradients = []
    for model in (target, script):
        x = img.clone().requires_grad_()
        out = model(x)
        model.loss(out, model.reference(out)).sum().backward()
        gradients.append(x.grad)
    assert gradients[0].abs().sum() > 0
    torch.testing.assert_close(gradients[0], gradients[1])
    assert all(not p.requires_grad for p in target.parameters())


def test_export_in_training_mode_is_refused(tmp_path):
    path = save_export(Classifier(2).train(), tmp_path / "train.pt2")
    with pytest.raises(SiaError, match="exported in training mode.*model.eval"):
        load_target(path, probe_size=SIZE)


def test_aotinductor_package_is_refused(tmp_path):
    path = tmp_path / "compiled.pt2"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("compiled/archive_format", "pt2")
        archive.writestr("compiled/data/aotinductor/model/abc.wrapper.so", b"\0")
    with pytest.raises(SiaError, match="AOTInductor.*torch.export.save"):
        load_target(path)


def test_a_model_whose_output_hardly_depends_on_its_input_is_named(tmp_path):
    """torchvision's MobileNetV3 at random init answers about 1e-11 for every image and class:
    its argmax is a tie that rounding breaks, so every attack would 'succeed'. A ResNet-18 at
    random init varies with its input and is not flagged."""
    import torchvision

    torch.manual_seed(0)
    flat = save_script(torchvision.models.mobilenet_v3_small(num_classes=5), tmp_path / "flat.pt", trace=True)
    target = load_target(flat, probe_size=64)
    notes = [line for line in target.assumptions if "hardly depends on its input" in line]
    assert len(notes) == 1 and "over 13 probe images" in notes[0], target.assumptions
    varied = save_script(torchvision.models.resnet18(num_classes=5), tmp_path / "varied.pt", trace=True)
    assert not any("hardly depends" in line for line in load_target(varied, probe_size=64).assumptions)


# ------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(SiaError, match="no such model file"):
        load_target(tmp_path / "absent.pt")


def test_text_and_random_files_are_not_models(tmp_path):
    text = tmp_path / "model.pt"
    text.write_text("this is not a model\n")
    noise = tmp_path / "noise.pt"
    noise.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    for path in (text, noise):
        with pytest.raises(SiaError, match=f"{path.name} is not a TorchScript file or torch.export archive"):
            load_target(path)


def test_torch_save_checkpoint_is_named(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(Classifier(1).state_dict(), path)
    with pytest.raises(SiaError, match="torch.save checkpoint"):
        load_target(path)


def test_output_shape_that_fits_no_task(tmp_path):
    path = save_script(WrongShape(), tmp_path / "m.pt")
    with pytest.raises(SiaError, match=r"shape \(2, 2, 3\).*accepted shapes.*\(B, K, H, W\)"):
        load_target(path, probe_size=SIZE)


def test_model_expecting_one_channel(tmp_path):
    module = Classifier(1)
    module.features = Features(4, in_channels=1)
    path = save_script(module, tmp_path / "m.pt")
    with pytest.raises(SiaError, match=r"model wants 1-channel input.*pass --channels 1"):
        load_target(path, probe_size=SIZE)


@pytest.mark.parametrize("module", [Thresholded(), Wrapped("detach")], ids=["threshold", "detach"])
def test_non_differentiable_model(tmp_path, module):
    path = save_script(module, tmp_path / "m.pt")
    with pytest.raises(SiaError, match="model is not differentiable"):
        load_target(path, probe_size=SIZE)


def test_nan_output(tmp_path):
    with pytest.raises(SiaError, match="NaN"):
        load_target(save_script(Wrapped("nan"), tmp_path / "m.pt"), probe_size=SIZE)


def test_tuple_output_needs_a_key_when_ambiguous(tmp_path):
    path = save_script(TupleOutput(), tmp_path / "m.pt")
    with pytest.raises(SiaError, match=r"several outputs \(0: \(2, 1\), 1: \(2, 8\)\).*--output-key"):
        load_target(path, probe_size=SIZE)
    assert load_target(path, output_key=0, output="logits", probe_size=SIZE).kind == "binary"
    assert load_target(path, output_key="1", probe_size=SIZE).kind == "multiclass"
    assert load_target(path, task="binary", output="logits", probe_size=SIZE).output_key == 0
    with pytest.raises(SiaError, match="out of range"):
        load_target(path, output_key=2, probe_size=SIZE)


def test_dict_output_needs_a_key(tmp_path):
    path = save_script(DictOutput(), tmp_path / "m.pt")
    with pytest.raises(SiaError, match="'logits': \\(2, 1\\), 'features': \\(2, 8\\).*--output-key"):
        load_target(path, probe_size=SIZE)
    target = load_target(path, output_key="logits", output="logits", probe_size=SIZE)
    assert target.kind == "binary" and target(images(3)).shape == (3,)
    with pytest.raises(SiaError, match="'scores' is not among the model's outputs: logits, features"):
        load_target(path, output_key="scores", probe_size=SIZE)


def test_task_that_contradicts_the_output(models):
    with pytest.raises(SiaError, match=r"--task keypoints does not fit the model's output shape \(2, 1\)"):
        load_target(models["binary"], task="keypoints", probe_size=SIZE)


def test_bad_settings(models, tmp_path):
    with pytest.raises(SiaError, match="--std must be"):
        load_target(models["binary"], std=[1, 0, 1], probe_size=SIZE)
    with pytest.raises(SiaError, match="--task must be one of"):
        load_target(models["binary"], task="segmentation", probe_size=SIZE)
    path = save_script(Classifier(1), tmp_path / "m.pt", sia_yaml="- just\n- a list\n")
    with pytest.raises(SiaError, match="sia.yaml .* must be a mapping"):
        load_target(path, probe_size=SIZE)


# ------------------------------------------------------------------- labels


def test_read_labels(tmp_path):
    binary = tmp_path / "binary.csv"
    binary.write_text("file,label\na.png,1\nb.png,0\n\n")
    labels = read_labels(binary, "binary")
    assert labels == {"a.png": torch.tensor(1.0), "b.png": torch.tensor(0.0)}

    multiclass = tmp_path / "multi.csv"
    multiclass.write_text("a.png,3\nb.png,cat\n")
    labels = read_labels(multiclass, "multiclass", class_names=["dog", "cat"])
    assert labels["a.png"].item() == 3 and labels["b.png"].item() == 1

    keypoints = tmp_path / "points.csv"
    keypoints.write_text("file,x1,y1,x2,y2\na.png,1,2,3,4.5\n")
    assert torch.equal(read_labels(keypoints, "keypoints")["a.png"], torch.tensor([[1.0, 2.0], [3.0, 4.5]]))


@pytest.mark.parametrize(
    "kind, text, message",
    [
        ("binary", "file,label\na.png,1\nb.png,2\n", "line 3: a binary label must be 0 or 1"),
        ("binary", "a.png,1,0\n", "line 1: expected 'file,label'"),
        ("binary", "a.png,1\na.png,0\n", "line 2: a.png is listed twice"),
        ("multiclass", "a.png,-1\n", "line 1: a class label must be a non-negative integer"),
        ("keypoints", "a.png,1,2,3\n", "line 1: expected 'file,x1,y1,x2,y2,...'"),
        ("keypoints", "a.png,1,2\nb.png,1,2,3,4\n", "line 2: 2 keypoints, the first row has 1"),
        ("keypoints", "file,x1,y1\n", "no labels found"),
    ],
)
def test_read_labels_bad_rows(tmp_path, kind, text, message):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(SiaError, match=message):
        read_labels(path, kind)


def test_reference_from_class_labels(models):
    target = load_target(models["multiclass"], probe_size=SIZE)
    assert torch.equal(target.reference_from_labels([torch.tensor(2), torch.tensor(4)]), torch.tensor([2, 4]))
    with pytest.raises(SiaError, match="class indices 0..4"):
        target.reference_from_labels(torch.tensor([5]))
