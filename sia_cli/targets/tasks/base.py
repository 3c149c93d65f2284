"""What every task kind shares: the `Task` base class, label-field parsing, coordinates and NME.
One kind per module beside it; the registry is the package's `__init__`."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Sequence

import torch

from sia_cli.errors import SiaError

HEATMAP_SIGMA = 1.5
# Probabilities are clamped before the log so that a saturated model still gives a
# finite loss and gradient.
PROBABILITY_EPS = 1e-6
DEFAULT_MARGIN = 1.0
# Explanations (`--explanations`) and ART (`--method art`) read the same class scores.
_NO_CLASS_SCORES = ("explanations and attributional robustness training need class scores (logits); "
                    "a {name} model has none")


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


def _rows_sum_to_one(values: torch.Tensor) -> bool:
    """Whether each row of (N, C) outputs sums to 1: one softmax, not independent scores."""
    return (values.float().sum(dim=1) - 1).abs().max().item() < 1e-3


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
    # The task-specific options this kind reads; the base check refuses the others when given.
    accepts: ClassVar[frozenset[str]] = frozenset()

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
        if settings.eye_indices is not None and "eye_indices" not in self.accepts:
            raise SiaError(
                f"eye_indices {list(settings.eye_indices)} do not name two of the model's keypoints "
                f"(a {self.name} model has none; pass --task landmarks or --task keypoints if its outputs are points)"
            )
        if settings.label is not None and "label" not in self.accepts:
            raise SiaError(
                f"{settings.flag_text('label', settings.label)} picks a label of a multilabel model; this one is "
                f"{self.name} (pass --task multilabel if its outputs are independent labels)"
            )
        if settings.sources.get("landmark_layout") not in (None, "default") and "landmark_layout" not in self.accepts:
            raise SiaError(
                f"{settings.flag_text('landmark_layout', settings.landmark_layout)} says how (B, 2K) landmark "
                f"coordinates are laid out; this model is {self.name} (pass --task landmarks if its outputs are points)"
            )
        if settings.margin is not None and "margin" not in self.accepts:
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

    def explained_score(self, out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """The per-image score (B,) whose input gradient is the model's explanation: the logit of
        the reference class. Kinds without a class score refuse."""
        raise SiaError(_NO_CLASS_SCORES.format(name=self.name))

    def rival_score(self, out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """The per-image score (B,) of the most likely class other than the reference: the
        negative of attributional robustness training's triplet. Kinds without a class score refuse."""
        raise SiaError(_NO_CLASS_SCORES.format(name=self.name))

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
