"""Points: `Keypoints` (heatmaps) and `Landmarks` (coordinates), judged by NME."""

from __future__ import annotations

from typing import Sequence

import torch

from sia_cli.errors import SiaError
from sia_cli.targets.tasks.base import (
    Task,
    _point_label,
    _value_range,
    argmax_coordinates,
    gaussian_heatmaps,
    normalised_mean_error,
)


class _Points(Task):
    """Shared by keypoint heatmaps and coordinate landmarks: judged by normalised mean error."""

    label_layout = "file,x1,y1,x2,y2,..."
    accepts = frozenset({"eye_indices"})

    def _check_settings(self):
        eyes = self.settings.eye_indices
        super()._check_settings()
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
    accepts = frozenset({"eye_indices", "landmark_layout"})

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
