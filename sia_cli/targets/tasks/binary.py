"""Sigmoid heads: `Binary` (one logit or probability) and `Multilabel` (one label of many)."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from sia_cli.errors import SiaError
from sia_cli.targets.tasks.base import PROBABILITY_EPS, Task, _binary_label, _rows_sum_to_one, _value_range


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
        shape = "".join(f", {size}" for size in self.output_shape)  # (B,) and (B, 1) alike
        return (
            f"output (B{shape}) read as binary (one score of class 1 per image); pass --task regression "
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

    def explained_score(self, out, ref):
        """The log-odds of the reference class: the logit for class 1, its negative for class 0
        (a probability head's log-odds, computed from it)."""
        scores = self._scores(out).float()
        if self.output_is_probability:
            scores = torch.logit(scores.clamp(PROBABILITY_EPS, 1 - PROBABILITY_EPS))
        return torch.where(ref > 0.5, scores, -scores)

    def rival_score(self, out, ref):
        """The other class's log-odds: the reference class's, negated."""
        return -self.explained_score(out, ref)

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


class Multilabel(Binary):
    """C independent sigmoids (B, C) (logits, or probabilities with ``--output probability``);
    ``--label NAME_OR_INDEX`` picks the label under attack, which is then a binary task on
    that column: BCE loss, success when its thresholded prediction changes, predictions and
    distances are that label's probability."""

    name = "multilabel"
    shapes = "(B, C) for multilabel (with --task multilabel --label NAME)"
    accepts = frozenset({"label"})
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
        super()._check_settings()
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

    def inspect(self, values, inferred):
        """Rows that sum to 1 are one softmax, not independent labels: a label's probability then
        falls as any other class rises, and crossing 0.5 is no change of the model's answer."""
        softmax = bool(values.numel()) and 0 <= values.min().item() and values.max().item() <= 1 \
            and _rows_sum_to_one(values)
        label = self.settings.flag_text("label", self.settings.label)
        if softmax and self.settings.task is None:
            raise SiaError(
                f"{label} reads this (B, {self.num_outputs}) output as independent labels, but each row sums to 1 "
                "as a softmax does: drop --label to attack the class (multiclass), or pass --task multilabel "
                "to read the label's column as its own probability anyway")
        lines = super().inspect(values, inferred)
        if softmax:
            lines.append(f"each output row sums to 1 as a softmax does; read as independent labels (--task "
                         f"multilabel): {label} succeeds when its probability crosses 0.5, not when the arg-max changes")
        return lines

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
