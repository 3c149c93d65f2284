"""Task kinds: what a model's output means, and so what the attack maximises and what success is.

One class per kind, registered in :data:`TASKS` (name -> class). A task object is made by
the probe once the output shape is known; :class:`sia_cli.targets.Target` delegates every
task-specific question to it. Adding a kind is one new class here (plus its tests): nothing
else switches on the kind.

Every method takes the model's raw output ``out`` for a batch, as ``Target.forward`` returns
it, and a reference ``ref`` as :meth:`Task.reference` (or :meth:`Task.reference_from_labels`)
made it.
"""

from __future__ import annotations

import math
import re
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F

from sia_cli.errors import SiaError

HEATMAP_SIGMA = 1.5
# Probabilities are clamped before the log so that a saturated model still gives a
# finite loss and gradient.
PROBABILITY_EPS = 1e-6
DEFAULT_MARGIN = 1.0


# ------------------------------------------------------------------ coordinates


def argmax_coordinates(heatmaps: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) -> (B, K, 2) float (x, y) of each heatmap's maximum, in heatmap pixels."""
    width = heatmaps.shape[-1]
    flat_index = heatmaps.flatten(2).argmax(dim=-1)
    return torch.stack([flat_index % width, flat_index // width], dim=-1).float()


def gaussian_heatmaps(coordinates: torch.Tensor, size: Sequence[int], sigma: float = HEATMAP_SIGMA) -> torch.Tensor:
    """(B, K, 2) (x, y) -> (B, K, H, W) Gaussians with peak 1."""
    height, width = size
    ys = torch.arange(height, device=coordinates.device, dtype=coordinates.dtype).view(1, 1, height, 1)
    xs = torch.arange(width, device=coordinates.device, dtype=coordinates.dtype).view(1, 1, 1, width)
    dx = xs - coordinates[..., 0, None, None]
    dy = ys - coordinates[..., 1, None, None]
    return torch.exp(-(dx**2 + dy**2) / (2 * sigma**2))


def normalised_mean_error(
    predicted: torch.Tensor, truth: torch.Tensor, eye_indices: tuple[int, int] | None, frame_hw: Sequence[int]
) -> torch.Tensor:
    """(B, K, 2) points -> (B,) mean point error over the inter-ocular distance of `truth`
    (when `eye_indices` are known) or over the diagonal of the frame the points live in."""
    mean_error = (predicted - truth).norm(dim=-1).mean(dim=-1)
    if eye_indices is not None:
        left, right = eye_indices
        # Coinciding eyes would divide by zero; one pixel is the finest scale there is.
        scale = (truth[:, left] - truth[:, right]).norm(dim=-1).clamp_min(1.0)
    else:
        scale = math.hypot(frame_hw[0], frame_hw[1])
    return mean_error / scale


# ---------------------------------------------------------------- label fields


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _expect_fields(values: list[str], count: int, where: str, layout: str) -> None:
    if len(values) != count:
        raise SiaError(f"{where}: expected '{layout}', got {len(values) + 1} fields")


def _binary_label(values: list[str], where: str, class_names: Sequence[str] | None) -> torch.Tensor:
    _expect_fields(values, 1, where, "file,label")
    if class_names and values[0] in class_names:
        return torch.tensor(float(list(class_names).index(values[0])))
    if not _is_number(values[0]) or float(values[0]) not in (0.0, 1.0):
        raise SiaError(f"{where}: a binary label must be 0 or 1, got {values[0]!r}")
    return torch.tensor(float(values[0]))


def _point_label(values: list[str], where: str) -> torch.Tensor:
    if not values or len(values) % 2:
        raise SiaError(f"{where}: expected 'file,x1,y1,x2,y2,...' (pairs of coordinates), got {len(values)} numbers")
    if not all(_is_number(v) and math.isfinite(float(v)) for v in values):
        raise SiaError(f"{where}: keypoint coordinates must be numbers, got {','.join(values)}")
    return torch.tensor([float(v) for v in values]).view(-1, 2)


def _value_range(values: torch.Tensor) -> tuple[float, float]:
    return values.min().item(), values.max().item()


# ------------------------------------------------------------------------ tasks


class Task:
    """One task kind. Subclasses set the class attributes and override what differs.

    ``output_shape`` is the model's output shape without the batch dimension; ``settings``
    the resolved :class:`sia_cli.targets.settings.Settings`; ``input_hw`` the (height, width)
    the model is fed (the resolved input size).
    """

    name: ClassVar[str] = ""
    shapes: ClassVar[str] = ""  # accepted output shapes, in words, for error messages
    inferred: ClassVar[bool] = False  # may be read off the output shape without --task
    writes_class_labels: ClassVar[bool] = False  # its reference is a class index `sia augment` can write
    reads_output_type: ClassVar[bool] = False  # --output logits|probability applies
    effect_unit: ClassVar[str] = "output units"  # what `distance` measures in (each kind says)
    label_layout: ClassVar[str] = "file,label"

    def __init__(self, output_shape: Sequence[int], settings: Any, input_hw: Sequence[int]):
        self.output_shape = tuple(int(d) for d in output_shape)
        self.settings = settings
        self.input_hw = tuple(input_hw)
        self.output_is_probability = settings.output == "probability"
        self._check_settings()

    # ------------------------------------------------------------ what fits

    @classmethod
    def fits(cls, shape: tuple[int, ...]) -> bool:
        """Whether a per-image output `shape` (no batch dimension) can be this task."""
        raise NotImplementedError

    @classmethod
    def infers(cls, shape: tuple[int, ...]) -> bool:
        """Whether the shape alone says it is this task (only for kinds with `inferred`)."""
        return cls.fits(shape)

    @property
    def num_outputs(self) -> int:
        """Classes for multiclass, labels for multilabel, points for keypoints/landmarks, else 1."""
        return 1

    @property
    def class_count(self) -> int | None:
        """How many values the reference label takes when it is a class index, else None."""
        return None

    @property
    def class_labels(self) -> list[str] | None:
        """Names of those classes (from sia.yaml class_names), or None."""
        return None

    def expected_class_names(self) -> int | None:
        """How many class_names sia.yaml must list for this task (None: none are expected)."""
        return None

    def _check_settings(self) -> None:
        settings = self.settings
        expected = self.expected_class_names()
        if settings.class_names is not None and len(settings.class_names) != expected:
            raise SiaError(
                f"sia.yaml lists {len(settings.class_names)} class_names; the {self.name} model has {expected} classes"
            )
        if settings.output == "probability" and not self.reads_output_type:
            raise SiaError(
                f"{settings.flag_text('output', 'probability')} is for binary, multiclass and multilabel "
                f"models; this one is {self.name}"
            )
        if settings.eye_indices is not None:
            raise SiaError(
                f"eye_indices {list(settings.eye_indices)} do not name two of the model's keypoints "
                f"(a {self.name} model has none)"
            )
        if settings.label is not None:
            raise SiaError(
                f"{settings.flag_text('label', settings.label)} picks a label of a multilabel model; this one is "
                f"{self.name} (pass --task multilabel if its outputs are independent labels)"
            )
        if settings.margin is not None:
            raise SiaError(
                f"{settings.flag_text('margin', settings.margin)} is for regression models; this one is {self.name}"
            )

    def inspect(self, values: torch.Tensor, inferred: bool) -> list[str]:
        """Look at raw outputs (N, *output_shape) of the probe images: refuse outputs that do not fit
        the settings, and return the assumptions made (human-readable lines)."""
        return []

    # ------------------------------------------------------------ per batch

    def shape_output(self, out: torch.Tensor) -> torch.Tensor:
        """The model's output as forward returns it."""
        return out

    def probability(self, out: torch.Tensor) -> torch.Tensor:
        """Probability or score of the prediction."""
        raise NotImplementedError

    def reference(self, out: torch.Tensor) -> torch.Tensor:
        """The model's own prediction, used as the label to move away from."""
        raise NotImplementedError

    def loss(self, out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """Per-image loss (B,) that the attack maximises."""
        raise NotImplementedError

    def predict(self, out: torch.Tensor) -> torch.Tensor:
        """Per-image prediction for the report (rows become JSON numbers or lists)."""
        raise NotImplementedError

    def error(self, out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """Magnitude of the failure (B,)."""
        raise NotImplementedError

    def success(self, out: torch.Tensor, ref: torch.Tensor, nme_threshold: float = 0.1) -> torch.Tensor:
        """Bool (B,): the attack moved the prediction far enough from the reference."""
        raise NotImplementedError

    def distance(self, out_a: torch.Tensor, out_b: torch.Tensor) -> torch.Tensor:
        """How far two predictions are apart (B,), `out_b` taken as the reference."""
        raise NotImplementedError

    def record_label(self, ref: torch.Tensor) -> torch.Tensor:
        """Per-image label value written to a report record."""
        return ref

    # --------------------------------------------------------------- labels

    @classmethod
    def parse_label(cls, values: list[str], where: str, class_names: Sequence[str] | None) -> torch.Tensor:
        """One CSV row's fields after the file name -> the label tensor of one image."""
        raise NotImplementedError

    def reference_from_labels(self, values: torch.Tensor, heatmap_size: Sequence[int] | None = None) -> torch.Tensor:
        """Labels from read_labels, stacked over the batch, as a reference for loss/success."""
        raise NotImplementedError

    # ------------------------------------------------------------ reporting

    def assumption(self) -> str | None:
        """What reading this shape as this task takes for granted, when the kind was inferred."""
        return None

    def describe(self) -> dict[str, Any]:
        """Task-specific entries of Target.describe()."""
        return {"output": None}


# ------------------------------------------------------------ sigmoid heads


def _output_type_check(task: Task, values: torch.Tensor) -> None:
    """Binary and multilabel heads: logits or probabilities are never guessed silently."""
    if not values.numel():
        return
    low, high = _value_range(values)
    settings = task.settings
    if settings.output is None and low >= 0 and high <= 1:
        raise SiaError(
            f"model outputs all lie in [0, 1] ({low:.3g}..{high:.3g}): they look like probabilities; "
            "pass --output probability (or --output logits if they are logits)"
        )
    if task.output_is_probability and (low < 0 or high > 1):
        raise SiaError(
            f"{settings.flag_text('output', 'probability')} but the model returns values outside [0, 1] "
            f"({low:.3g}..{high:.3g}); pass --output logits if they are logits"
        )


class Binary(Task):
    """One logit (or, with ``--output probability``, one probability) of class 1 per image; loss
    BCE; success when the thresholded prediction (p > 0.5) changes."""

    name = "binary"
    effect_unit = "probability"
    shapes = "(B,) or (B, 1) for binary"
    inferred = True
    writes_class_labels = True
    reads_output_type = True

    @classmethod
    def fits(cls, shape):
        return len(shape) == 0 or shape == (1,)

    @property
    def class_count(self):
        return 2

    @property
    def class_labels(self):
        return self.settings.class_names

    def expected_class_names(self):
        return 2

    def inspect(self, values, inferred):
        _output_type_check(self, values)
        return []

    def assumption(self):
        return (
            "output (B, 1) read as binary (one score of class 1 per image); pass --task regression "
            "if it is one continuous value such as an age"
        )

    def shape_output(self, out):
        return out.reshape(out.shape[0])

    def _scores(self, out: torch.Tensor) -> torch.Tensor:
        """The (B,) logits or probabilities of the class under attack."""
        return out

    def probability(self, out):
        """P(class 1) (B,)."""
        scores = self._scores(out).float()
        return scores if self.output_is_probability else torch.sigmoid(scores)

    def reference(self, out):
        return (self.probability(out.detach()) > 0.5).float()

    def loss(self, out, ref):
        scores = self._scores(out).float()
        if self.output_is_probability:
            p = scores.clamp(PROBABILITY_EPS, 1 - PROBABILITY_EPS)
            return -(ref * p.log() + (1 - ref) * (1 - p).log())
        return F.binary_cross_entropy_with_logits(scores, ref.float(), reduction="none")

    def predict(self, out):
        """P(class 1) (B,)."""
        return self.probability(out.detach())

    def error(self, out, ref):
        """|P(class 1) - label|."""
        return (self.probability(out.detach()) - ref.float()).abs()

    def success(self, out, ref, nme_threshold=0.1):
        return (self.probability(out.detach()) > 0.5) != (ref > 0.5)

    def distance(self, out_a, out_b):
        """|p_a - p_b|."""
        return (self.probability(out_a.detach()) - self.probability(out_b.detach())).abs()

    @classmethod
    def parse_label(cls, values, where, class_names):
        return _binary_label(values, where, class_names)

    def reference_from_labels(self, values, heatmap_size=None):
        return values.float().reshape(-1)

    def describe(self):
        return {"output": "probability" if self.output_is_probability else "logits"}


class Multiclass(Task):
    """C logits (or, with ``--output probability``, C softmax probabilities); loss cross-entropy;
    success when the arg-max changes."""

    name = "multiclass"
    effect_unit = "total variation of the class probabilities"
    shapes = "(B, C) with C >= 2 for multiclass"
    inferred = True
    writes_class_labels = True
    reads_output_type = True

    @classmethod
    def fits(cls, shape):
        return len(shape) == 1 and shape[0] >= 2

    @property
    def num_outputs(self):
        return self.output_shape[0]

    @property
    def class_count(self):
        return self.num_outputs

    @property
    def class_labels(self):
        return self.settings.class_names

    def expected_class_names(self):
        return self.num_outputs

    def assumption(self):
        classes = self.num_outputs
        text = (
            f"output (B, {classes}) read as {classes}-class softmax (multiclass); pass --task multilabel "
            f"--label NAME if it is {classes} independent labels"
        )
        if classes >= 4 and classes % 2 == 0:
            text += f", or --task landmarks for {classes // 2} (x, y) points"
        return text

    def inspect(self, values, inferred):
        if not values.numel() or self.settings.output is not None:
            return []
        low, high = _value_range(values)
        if low < 0 or high > 1:
            return []
        # Outputs that look like probabilities are refused alike, whatever the head: reading
        # softmax probabilities as logits would flatten every loss and every measured effect.
        sums = values.float().sum(dim=1)
        if (sums - 1).abs().max().item() < 1e-3:
            raise SiaError(
                f"model outputs lie in [0, 1] ({low:.3g}..{high:.3g}) and each row sums to 1: they look like "
                "softmax probabilities; pass --output probability (or --output logits if they are logits)"
            )
        # Rows in [0, 1] that do not sum to 1 may be sigmoids, or small logits (a model with
        # random weights gives them): said, not refused.
        if inferred:
            return [
                f"output values all lie in [0, 1] ({low:.3g}..{high:.3g}) and rows do not sum to 1, as "
                f"{self.num_outputs} independent sigmoids would: pass --task multilabel --label NAME "
                "--output probability if that is what they are"
            ]
        return []

    def probability(self, out):
        """Class probabilities (B, C)."""
        out = out.float()
        return out if self.output_is_probability else out.softmax(dim=1)

    def reference(self, out):
        return out.detach().argmax(dim=1)

    def loss(self, out, ref):
        if self.output_is_probability:
            p = out.float().clamp(PROBABILITY_EPS, 1.0)
            return F.nll_loss(p.log(), ref, reduction="none")
        return F.cross_entropy(out.float(), ref, reduction="none")

    def predict(self, out):
        """Class index (B,)."""
        return out.detach().argmax(dim=1)

    def error(self, out, ref):
        """1 - P(reference class)."""
        return 1 - self.probability(out.detach()).gather(1, ref.view(-1, 1)).squeeze(1)

    def success(self, out, ref, nme_threshold=0.1):
        return out.detach().argmax(dim=1) != ref

    def distance(self, out_a, out_b):
        """Total-variation distance of the class probabilities."""
        return (self.probability(out_a.detach()) - self.probability(out_b.detach())).abs().sum(dim=1) / 2

    @classmethod
    def parse_label(cls, values, where, class_names):
        _expect_fields(values, 1, where, "file,label")
        text = values[0]
        if class_names and text in class_names:
            return torch.tensor(list(class_names).index(text))
        if not re.fullmatch(r"\d+", text):
            known = f" or one of {', '.join(class_names)}" if class_names else ""
            raise SiaError(f"{where}: a class label must be a non-negative integer{known}, got {text!r}")
        return torch.tensor(int(text))

    def reference_from_labels(self, values, heatmap_size=None):
        labels = values.long().reshape(-1)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_outputs):
            raise SiaError(f"labels must be class indices 0..{self.num_outputs - 1} for this model")
        return labels

    def describe(self):
        return {"output": "probability" if self.output_is_probability else "logits"}


class Multilabel(Binary):
    """C independent sigmoids (B, C) (logits, or probabilities with ``--output probability``);
    ``--label NAME_OR_INDEX`` picks the label under attack, which is then a binary task on
    that column: BCE loss, success when its thresholded prediction changes, predictions and
    distances are that label's probability."""

    name = "multilabel"
    shapes = "(B, C) for multilabel (with --task multilabel --label NAME)"
    inferred = False  # a (B, C) output is read as multiclass unless told (see Multiclass.assumption)

    @classmethod
    def fits(cls, shape):
        return len(shape) == 1 and shape[0] >= 2

    def __init__(self, output_shape, settings, input_hw):
        self.label_index = 0
        super().__init__(output_shape, settings, input_hw)

    def _check_settings(self):
        settings = self.settings
        label = settings.label
        names = list(settings.class_names or [])
        settings.label = None  # checked here, not refused by the base class
        try:
            super()._check_settings()
        finally:
            settings.label = label
        count = self.num_outputs
        known = f" (labels: {', '.join(names)})" if names else f" (an index 0..{count - 1})"
        if label is None:
            raise SiaError(f"a multilabel model needs the label under attack: pass --label NAME_OR_INDEX{known}")
        if str(label) in names:
            self.label_index = names.index(str(label))
        elif re.fullmatch(r"\d+", str(label)) and int(label) < count:
            self.label_index = int(label)
        else:
            raise SiaError(f"{settings.flag_text('label', label)} is not one of the model's {count} labels{known}")

    @property
    def num_outputs(self):
        return self.output_shape[0]

    @property
    def label_name(self) -> str | None:
        names = self.settings.class_names
        return names[self.label_index] if names else None

    @property
    def class_labels(self):
        name = self.label_name
        return [f"not {name}", name] if name is not None else None

    def expected_class_names(self):
        return self.num_outputs

    def assumption(self):
        return None

    def shape_output(self, out):
        return out

    def _scores(self, out):
        return out[:, self.label_index]

    @classmethod
    def parse_label(cls, values, where, class_names):
        """``file,label``: 0 or 1, whether the label under attack is present."""
        return _binary_label(values, where, None)

    def describe(self):
        return {
            "output": "probability" if self.output_is_probability else "logits",
            "label": self.label_name if self.label_name is not None else self.label_index,
            "label_index": self.label_index,
        }


class _Points(Task):
    """Shared by keypoint heatmaps and coordinate landmarks: judged by normalised mean error."""

    label_layout = "file,x1,y1,x2,y2,..."

    def _check_settings(self):
        eyes = self.settings.eye_indices
        self.settings.eye_indices = None  # checked here, not refused by the base class
        try:
            super()._check_settings()
        finally:
            self.settings.eye_indices = eyes
        if eyes is not None and max(eyes) >= self.num_outputs:
            raise SiaError(f"eye_indices {list(eyes)} do not name two of the model's {self.num_outputs} keypoints")

    def success(self, out, ref, nme_threshold=0.1):
        """NME above `nme_threshold`."""
        return self.error(out, ref) > nme_threshold

    @classmethod
    def parse_label(cls, values, where, class_names):
        return _point_label(values, where)

    def _normaliser(self, frame_hw: Sequence[int], unit: str) -> str:
        if self.settings.eye_indices is not None:
            left, right = self.settings.eye_indices
            return f"inter-ocular distance (points {left} and {right})"
        return f"diagonal of the {frame_hw[0]}x{frame_hw[1]} {unit}"


class Keypoints(_Points):
    """Heatmaps (B, K, H, W); loss MSE to the reference heatmaps; error is the NME of the
    arg-max points (heatmap pixels), over the inter-ocular distance when ``eye_indices`` are
    given, else over the heatmap diagonal."""

    name = "keypoints"
    effect_unit = "NME"
    shapes = "(B, K, H, W) heatmaps for keypoints"
    inferred = True

    @classmethod
    def fits(cls, shape):
        return len(shape) == 3

    @property
    def num_outputs(self):
        return self.output_shape[0]

    @property
    def heatmap_size(self) -> tuple[int, int]:
        return self.output_shape[-2], self.output_shape[-1]

    def probability(self, out):
        """The heatmaps themselves (the score of each location)."""
        return out.float()

    def reference(self, out):
        return out.detach().clone()

    def loss(self, out, ref):
        return (out.float() - ref.float()).pow(2).flatten(1).mean(dim=1)

    def predict(self, out):
        """(B, K, 2) arg-max (x, y) in heatmap pixels."""
        return argmax_coordinates(out.detach())

    def error(self, out, ref):
        """NME of the arg-max points."""
        out = out.detach()
        ref = ref.detach()
        return normalised_mean_error(
            argmax_coordinates(out), argmax_coordinates(ref), self.settings.eye_indices, ref.shape[-2:]
        )

    def distance(self, out_a, out_b):
        return self.error(out_a, out_b)

    def record_label(self, ref):
        return argmax_coordinates(ref.detach())

    def reference_from_labels(self, values, heatmap_size=None):
        """Keypoint coordinates (B, K, 2) in heatmap pixels become Gaussian heatmaps (sigma 1.5 px,
        peak 1) of ``heatmap_size`` (default: the model's own heatmap size), so the loss stays MSE."""
        size = tuple(heatmap_size) if heatmap_size is not None else self.heatmap_size
        if values.shape[-2:] != (self.num_outputs, 2):
            raise SiaError(f"keypoint labels have {values.shape[-2]} points; the model predicts {self.num_outputs}")
        return gaussian_heatmaps(values.float(), size)

    def describe(self):
        return {"output": None, "nme_normaliser": self._normaliser(self.heatmap_size, "heatmap")}


class Landmarks(_Points):
    """Coordinate regression: (B, K, 2), or (B, 2K) laid out x1, y1, x2, y2, ... (``xyxy``, the
    default) or x1..xK, y1..yK (``xxyy``, as MTCNN-style heads emit; --landmark-layout), in the model's
    input pixels. Loss: mean squared point distance to the reference (input pixels squared).
    Error: normalised mean error over the inter-ocular distance when ``eye_indices`` are given
    (sia.yaml or --eye-indices), else over the diagonal of the model's input size. (B, K, 2) is
    read as landmarks without --task; (B, 2K) needs --task landmarks."""

    name = "landmarks"
    effect_unit = "NME"
    shapes = "(B, K, 2) or (B, 2K) (x, y) points for landmarks"
    inferred = True

    @classmethod
    def fits(cls, shape):
        return (len(shape) == 2 and shape[1] == 2 and shape[0] >= 1) or (
            len(shape) == 1 and shape[0] >= 2 and shape[0] % 2 == 0
        )

    @classmethod
    def infers(cls, shape) -> bool:
        return len(shape) == 2 and shape[1] == 2

    @property
    def num_outputs(self):
        return self.output_shape[0] if len(self.output_shape) == 2 else self.output_shape[0] // 2

    def points(self, out: torch.Tensor) -> torch.Tensor:
        """(B, K, 2) float (x, y) in input pixels."""
        if out.dim() == 2 and self.settings.landmark_layout == "xxyy":
            return out.float().reshape(out.shape[0], 2, self.num_outputs).transpose(1, 2)
        return out.float().reshape(out.shape[0], self.num_outputs, 2)

    def inspect(self, values, inferred):
        if not values.numel():
            return []
        low, high = _value_range(values)
        if low >= -1.5 and high <= 1.5 and min(self.input_hw) > 8 and self.settings.eye_indices is None:
            return [
                f"landmark coordinates all lie in [-1.5, 1.5] ({low:.2f}..{high:.2f}), as normalised coordinates "
                f"would, but are read as pixels of the {self.input_hw[0]}x{self.input_hw[1]} input: NME over the "
                "input diagonal then understates errors; give eye_indices (--eye-indices) for a scale-free NME"
            ]
        return []

    def probability(self, out):
        """The predicted points (B, K, 2)."""
        return self.points(out)

    def reference(self, out):
        return out.detach().clone()

    def loss(self, out, ref):
        return (self.points(out) - self.points(ref)).pow(2).flatten(1).mean(dim=1)

    def predict(self, out):
        """(B, K, 2) (x, y) in input pixels."""
        return self.points(out.detach())

    def error(self, out, ref):
        """NME of the points."""
        return normalised_mean_error(
            self.points(out.detach()), self.points(ref.detach()), self.settings.eye_indices, self.input_hw
        )

    def distance(self, out_a, out_b):
        return self.error(out_a, out_b)

    def record_label(self, ref):
        return self.points(ref.detach())

    def reference_from_labels(self, values, heatmap_size=None):
        """Coordinates (B, K, 2) in input pixels, in the model's output layout."""
        if values.shape[-2:] != (self.num_outputs, 2):
            raise SiaError(f"landmark labels have {values.shape[-2]} points; the model predicts {self.num_outputs}")
        values = values.float()
        if len(self.output_shape) == 1 and self.settings.landmark_layout == "xxyy":
            values = values.transpose(-1, -2)
        return values.reshape(values.shape[0], *self.output_shape)

    def describe(self):
        layout = self.settings.landmark_layout if len(self.output_shape) == 1 else None
        return {"output": None, "nme_normaliser": self._normaliser(self.input_hw, "input (pixels)"),
                "landmark_layout": layout}


class Regression(Task):
    """One continuous output per image (e.g. an age): loss squared deviation from the reference
    (in units of the margin); success when |y_adv - y_ref| > margin (``--margin``, default 1.0
    in the output's own units)."""

    name = "regression"
    effect_unit = "margins"
    shapes = "(B,) or (B, 1) for regression (with --task regression)"

    @classmethod
    def fits(cls, shape):
        return len(shape) == 0 or shape == (1,)

    @property
    def margin(self) -> float:
        return self.settings.margin if self.settings.margin is not None else DEFAULT_MARGIN

    def _check_settings(self):
        margin = self.settings.margin
        if margin is None:
            self.settings.sources["margin"] = "default"
        self.settings.margin = None  # checked here, not refused by the base class
        try:
            super()._check_settings()
        finally:
            self.settings.margin = margin

    def shape_output(self, out):
        return out.reshape(out.shape[0])

    def probability(self, out):
        """The predicted value (B,) (a score, not a probability)."""
        return out.float()

    def reference(self, out):
        return out.detach().float().clone()

    def loss(self, out, ref):
        return ((out.float() - ref.float()) / self.margin).pow(2)

    def predict(self, out):
        """The predicted value (B,)."""
        return out.detach().float()

    def error(self, out, ref):
        """|y - y_ref| in the output's units."""
        return (out.detach().float() - ref.float()).abs()

    def success(self, out, ref, nme_threshold=0.1):
        return self.error(out, ref) > self.margin

    def distance(self, out_a, out_b):
        """|y_a - y_b| / margin."""
        return self.error(out_a, out_b.detach().float()) / self.margin

    @classmethod
    def parse_label(cls, values, where, class_names):
        _expect_fields(values, 1, where, "file,value")
        if not _is_number(values[0]) or not math.isfinite(float(values[0])):
            raise SiaError(f"{where}: a regression label must be a finite number, got {values[0]!r}")
        return torch.tensor(float(values[0]))

    def reference_from_labels(self, values, heatmap_size=None):
        return values.float().reshape(-1)

    def describe(self):
        return {"output": None, "margin": self.margin}


TASKS: dict[str, type[Task]] = {
    task.name: task for task in (Binary, Multiclass, Multilabel, Keypoints, Landmarks, Regression)
}
ACCEPTED_SHAPES = ", ".join(task.shapes for task in TASKS.values())


def infer_task(shape: tuple[int, ...]) -> type[Task] | None:
    """The kind a per-image output shape is read as without --task (first fit in TASKS order)."""
    for task in TASKS.values():
        if task.inferred and task.infers(shape):
            return task
    return None

