"""`Regression`: one continuous output, success past a margin."""

from __future__ import annotations

import math

import torch

from sia_cli.errors import SiaError
from sia_cli.targets.tasks.base import DEFAULT_MARGIN, Task, _expect_fields, _is_number


class Regression(Task):
    """One continuous output per image (e.g. an age): loss squared deviation from the reference
    (in units of the margin); success when |y_adv - y_ref| > margin (``--margin``, default 1.0
    in the output's own units)."""

    name = "regression"
    effect_unit = "margins"
    shapes = "(B,) or (B, 1) for regression (with --task regression)"
    accepts = frozenset({"margin"})

    @classmethod
    def fits(cls, shape):
        return len(shape) == 0 or shape == (1,)

    @property
    def margin(self) -> float:
        return self.settings.margin if self.settings.margin is not None else DEFAULT_MARGIN

    def _check_settings(self):
        if self.settings.margin is None:
            self.settings.sources["margin"] = "default"
        super()._check_settings()

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
