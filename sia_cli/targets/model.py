"""`Target`: the model under attack with its preprocessing, delegating task questions to its task."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from sia_cli.errors import ModelRaised
from sia_cli.targets.formats import first_line
from sia_cli.targets.settings import Settings, parse_size
from sia_cli.targets.tasks import Task

# ITU-R BT.601 luma weights: RGB -> grayscale for 1-channel models.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Probed:
    """What the probe settled about a model (sia_cli.targets.probe): the model under test is
    built from it, whole."""

    settings: Settings  # as the probe completed them (the output kind, where each came from)
    task: Task
    output_key: int | str | None
    output_listing: str | None  # the model's outputs, when it returns several
    batch_range: tuple[int, int | None]
    static_batch: int | None
    assumptions: tuple[str, ...]


class Target(torch.nn.Module):
    """The model under attack with its preprocessing and task: loss, reference, success.

    Parameters are frozen (the attack needs input gradients only) and the wrapped
    model stays in the mode it was loaded in: ``Target.train()``/``eval()`` do not
    reach it. ``forward`` takes generator images in [-1, 1] of shape (B, 3, S, S) and
    returns the raw prediction: (B,) for binary and regression models, (B, C) for
    multiclass and multilabel, (B, K, H, W) heatmaps, landmarks as the model lays them out.
    What the output means is the task's business (``self.task``, see
    :mod:`sia_cli.targets.tasks`); the task methods here delegate to it.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        settings: Settings,
        *,
        path: Path,
        sha256: str,
        format: str,
        batch_range: tuple[int, int | None] = (1, None),
        probe_size: int = 64,
        probed: Probed | None = None,
    ):
        """`probed`: what the probe settled (load_target builds every model under test with it);
        without it the target is the probe's scratch copy, with no task yet."""
        super().__init__()
        if probed is not None:
            settings, batch_range = probed.settings, probed.batch_range
        self.model = model
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.path = str(path)
        self.sha256 = sha256
        self.format = format
        self.settings = settings
        self.input_size = settings.input_size
        self.mean = settings.mean
        self.std = settings.std
        self.channels = settings.channels
        self.class_names = settings.class_names
        self.eye_indices = settings.eye_indices
        self.probe_size = probe_size
        self.batch_range = batch_range
        self.static_batch = batch_range[0] if batch_range[0] == batch_range[1] else None
        shape = (1, self.channels, 1, 1)
        self.register_buffer("_mean", torch.tensor(self.mean).view(shape), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(shape), persistent=False)
        self.register_buffer("_luma", torch.tensor(LUMA_WEIGHTS).view(1, 3, 1, 1), persistent=False)
        self.task: Task | None = probed.task if probed else None
        self.output_key: int | str | None = probed.output_key if probed else None
        # the model's outputs, when it returns several
        self._output_listing: str | None = probed.output_listing if probed else None
        self.assumptions: list[str] = list(probed.assumptions) if probed else []
        if probed is not None:
            self.static_batch = probed.static_batch

    # The wrapped model keeps its load-time mode: exported programs cannot switch,
    # and an engine calling .eval()/.train() on the target must not put BN in training.
    def train(self, mode: bool = True) -> "Target":
        self.training = mode
        return self

    # ------------------------------------------------------------ properties

    @property
    def kind(self) -> str:
        return self.task.name if self.task is not None else ""

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.task.output_shape if self.task is not None else ()

    @property
    def output_is_probability(self) -> bool:
        return self.settings.output == "probability"

    @property
    def heatmap_size(self) -> tuple[int, int] | None:
        return getattr(self.task, "heatmap_size", None)

    @property
    def num_outputs(self) -> int:
        """Classes for multiclass, labels for multilabel, keypoints for keypoint/landmark models, else 1."""
        return self.task.num_outputs

    @property
    def resolved_input_size(self) -> tuple[int, int]:
        """The size the model is fed: --input-size / sia.yaml / export graph, else the generator's size."""
        return self.input_size or (self.probe_size, self.probe_size)

    def describe(self) -> dict[str, Any]:
        """JSON-friendly descriptor for reports: every resolved setting and where it came from."""
        task = self.task.describe() if self.task is not None else {}
        return {
            "path": self.path,
            "sha256": self.sha256,
            "format": self.format,
            "kind": self.kind,
            "input_size": list(self.resolved_input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "channels": self.channels,
            "output": task.get("output"),
            "output_key": self.output_key,
            "output_shape": list(self.output_shape),
            "class_names": self.class_names,
            "label": task.get("label"),
            "eye_indices": list(self.eye_indices) if self.eye_indices else None,
            "nme_normaliser": task.get("nme_normaliser"),
            "margin": task.get("margin"),
            "landmark_layout": task.get("landmark_layout"),
            "static_batch": self.static_batch,
            "assumptions": list(self.assumptions),
            "sources": dict(self.settings.sources),
        }

    def read_with(self) -> dict[str, Any]:
        """The options this model is read with, as sia.yaml holds them (set ones only): written
        into every model the tool writes, so it is read the same way again without repeating them."""
        found = self.describe()
        keys = ("input_size", "mean", "std", "channels", "output", "output_key", "class_names", "label",
                "eye_indices", "margin", "landmark_layout")
        options = {"task": self.kind, **{key: found[key] for key in keys}}
        return {key: value for key, value in options.items() if value is not None}

    # ----------------------------------------------------------- forward path

    def preprocess(self, img: torch.Tensor) -> torch.Tensor:
        """Generator images in [-1, 1] -> the target's input: [0, 1], grayscale for 1-channel
        models (ITU-R 601 luma), resized, normalised."""
        x = (img + 1) / 2
        if self.channels == 1 and x.shape[1] == 3:
            x = (x * self._luma.to(x.dtype)).sum(dim=1, keepdim=True)
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False, antialias=False)
        return (x - self._mean) / self._std

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.task.shape_output(self._run_model(self.preprocess(img)))

    def _run_model(self, x: torch.Tensor) -> torch.Tensor:
        try:
            outputs = [self._select(self.model(chunk))[:count] for chunk, count in self._batch_chunks(x)]
        except torch.cuda.OutOfMemoryError:
            raise  # sia_cli.engine.speed sizes batches by it; not the model's complaint about an image
        except Exception as exc:  # noqa: BLE001 - whatever the model raises, as its one-line message
            raise ModelRaised(first_line(exc)) from exc
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _select(self, raw: Any) -> torch.Tensor:
        return raw if self.output_key is None else raw[self.output_key]

    def _batch_chunks(self, x: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        """Pieces the model accepts, with how many real images each holds (fixed-batch models)."""
        smallest, largest = self.batch_range
        pieces = list(x.split(largest)) if largest is not None and x.shape[0] > largest else [x]
        return [(self._pad_batch(piece, smallest), piece.shape[0]) for piece in pieces]

    @staticmethod
    def _pad_batch(x: torch.Tensor, size: int) -> torch.Tensor:
        missing = size - x.shape[0]
        if missing <= 0:
            return x
        return torch.cat([x, x.new_zeros((missing, *x.shape[1:]))])

    # ------------------------------------------------------------------- task

    def probability(self, out: torch.Tensor) -> torch.Tensor:
        """Binary: P(class 1) (B,); multiclass: softmax (B, C); multilabel: P(chosen label) (B,);
        regression: the value; keypoints: the heatmaps; landmarks: the points."""
        return self.task.probability(out)

    def reference(self, out: torch.Tensor) -> torch.Tensor:
        """The model's own prediction, used as the label to move away from."""
        return self.task.reference(out)

    def loss(self, out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """Per-image loss (B,) that the attack maximises."""
        return self.task.loss(out, ref)

    def predict(self, out: torch.Tensor) -> torch.Tensor:
        """Per-image prediction: P(class 1), class index, P(label), value, or (B, K, 2) points."""
        return self.task.predict(out)

    def error(self, out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """Magnitude of the failure (B,): NME for points, 1 - P(reference) for classifiers, |dy| for regression."""
        return self.task.error(out, ref)

    def success(self, out: torch.Tensor, ref: torch.Tensor, nme_threshold: float = 0.1) -> torch.Tensor:
        """Bool (B,): the prediction left the reference (label flipped, NME or margin exceeded)."""
        return self.task.success(out, ref, nme_threshold)

    def distance(self, out_a: torch.Tensor, out_b: torch.Tensor) -> torch.Tensor:
        """How far two predictions are apart (B,): |p_a - p_b| (binary, multilabel), total variation
        (multiclass), NME of a against b (keypoints, landmarks), |y_a - y_b| / margin (regression)."""
        return self.task.distance(out_a, out_b)

    def explained_score(self, out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """The per-image score (B,) whose input gradient explains the prediction: the logit of the
        reference class (binary, multilabel, multiclass); other kinds refuse."""
        return self.task.explained_score(out, ref)

    def rival_score(self, out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """The per-image score (B,) of the most likely other class (attributional robustness training)."""
        return self.task.rival_score(out, ref)

    def check_class_scores(self, size: int, device) -> None:
        """One probe before any image is attacked: a zero image through the model and both class
        scores that an attribution map and ART read; kinds without a class score refuse in one line."""
        with torch.no_grad():
            out = self(torch.zeros(1, 3, size, size, device=device))
            reference = self.reference(out)
            self.explained_score(out, reference)
            self.rival_score(out, reference)

    def record_label(self, ref: torch.Tensor) -> torch.Tensor:
        """Per-image label value for a report record (points for keypoints/landmarks)."""
        return self.task.record_label(ref)

    def reference_from_labels(
        self, values: torch.Tensor | Sequence[torch.Tensor], heatmap_size: int | Sequence[int] | None = None
    ) -> torch.Tensor:
        """Labels from read_labels, stacked over the batch, as a reference for loss/success.

        Keypoint coordinates (B, K, 2) become Gaussian heatmaps (sigma 1.5 px, peak 1) of
        ``heatmap_size`` (default: the model's own heatmap size), so the loss stays MSE.
        """
        if not isinstance(values, torch.Tensor):
            values = torch.stack([torch.as_tensor(v) for v in values])
        values = values.to(self._mean.device)
        if heatmap_size is not None:
            heatmap_size = parse_size(heatmap_size if isinstance(heatmap_size, int) else list(heatmap_size),
                                      "heatmap_size")
        return self.task.reference_from_labels(values, heatmap_size)
