"""`Multiclass`: C logits or softmax probabilities."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from sia_cli.errors import SiaError
from sia_cli.targets.tasks.base import PROBABILITY_EPS, Task, _expect_fields, _rows_sum_to_one, _value_range


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
        if _rows_sum_to_one(values):
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

    def explained_score(self, out, ref):
        """The reference class's logit (a probability head's log-probability)."""
        return self._class_scores(out).gather(1, ref.view(-1, 1)).squeeze(1)

    def rival_score(self, out, ref):
        """The largest logit (log-probability) of the other classes."""
        return self._class_scores(out).scatter(1, ref.view(-1, 1), float("-inf")).amax(dim=1)

    def _class_scores(self, out):
        """Logits, or a probability head's log-probabilities: the scores explanations use."""
        return out.float().clamp(PROBABILITY_EPS, 1.0).log() if self.output_is_probability else out.float()

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
