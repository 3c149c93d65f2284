"""The model under attack ("target"): loading, preprocessing and everything task-specific.

Two file formats are accepted:

* TorchScript (``torch.jit.save``). The model is switched to eval mode on load. A
  ``sia.yaml`` stored in the file's extra files can carry preprocessing defaults::

      torch.jit.save(scripted, "model.pt", _extra_files={"sia.yaml": "input_size: 224\\n..."})

* ``torch.export`` archives (``torch.export.save``, usually ``.pt2``). An exported
  program cannot be switched to eval mode after the fact: export it from a model
  already in eval mode (``model.eval()`` before ``torch.export.export``); archives
  whose graph still has training-mode batch norm or dropout are refused. Unless it
  was exported with a dynamic batch dimension, an exported program only accepts the
  batch size used at export: the target then pads smaller batches up to that size
  and splits larger ones into chunks, which costs compute but gives the same
  results. ``torch.export.save(..., extra_files={"sia.yaml": ...})`` is read too.

AOTInductor packages (``aoti_compile_and_package``) are compiled code without a
differentiable graph and are refused.

Loading a model runs code stored in the file (TorchScript code, or the exported
graph): treat model files like programs and load only files you trust.

Task kinds follow from the output shape: (B,) or (B, 1) binary, (B, C >= 2)
multiclass, (B, K, H, W) keypoint heatmaps.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import math
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
import yaml

from sia_cli.errors import SiaError

TASKS = ("binary", "multiclass", "keypoints")
ACCEPTED_SHAPES = "(B,) or (B, 1) for binary, (B, C) with C >= 2 for multiclass, (B, K, H, W) heatmaps for keypoints"
HEATMAP_SIGMA = 1.5
# Probabilities are clamped before the log so that a saturated model still gives a
# finite loss and gradient.
_PROBABILITY_EPS = 1e-6
_PROBE_BATCH = 2


# --------------------------------------------------------------------------- files


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _not_a_model(path: Path, why: str = "") -> SiaError:
    return SiaError(f"{path} is not a TorchScript file or torch.export archive{why}")


def _detect_format(path: Path) -> str:
    """'torchscript' or 'export', judged from the zip layout that both formats use."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            format_files = [n for n in names if n.split("/")[-1] == "archive_format"]
            is_pt2 = any(archive.read(n).strip() == b"pt2" for n in format_files)
    except (zipfile.BadZipFile, OSError, EOFError):
        raise _not_a_model(path) from None
    if is_pt2:
        if any("/models/" in n and n.endswith(".json") for n in names):
            return "export"
        if any("/aotinductor/" in n for n in names):
            raise SiaError(
                f"{path} is an AOTInductor package: compiled code without a differentiable graph; "
                "save the exported program with torch.export.save(torch.export.export(model.eval(), ...), path) instead"
            )
        raise _not_a_model(path, " (a .pt2 archive without an exported program)")
    if any("/code/" in n for n in names) and any(n.endswith("data.pkl") for n in names):
        return "torchscript"
    if any(n.endswith("data.pkl") for n in names):
        raise _not_a_model(
            path,
            " (it looks like a torch.save checkpoint; save the model with "
            "torch.jit.save(torch.jit.script(model), path) or torch.export.save)",
        )
    raise _not_a_model(path)


def _first_line(exc: BaseException) -> str:
    """The informative line of an exception; TorchScript puts it last, after a traceback."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].startswith("The following operation failed in the TorchScript interpreter"):
        for line in reversed(lines):
            match = re.match(r"^[\w.]*(Error|Exception): (.*)$", line)
            if match:
                return match.group(2)
    return lines[0]


def _decode_yaml_text(raw: Any) -> str:
    return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw or "")


def _load_torchscript(path: Path, device: str) -> tuple[torch.nn.Module, str]:
    extra = {"sia.yaml": ""}
    try:
        with warnings.catch_warnings():
            # The user chose the format; the deprecation notice is not theirs to act on.
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad file
        raise SiaError(f"{path}: TorchScript file could not be loaded: {_first_line(exc)}") from None
    _refuse_weights_without_data(model, path, device)
    model.eval()
    return model, _decode_yaml_text(extra["sia.yaml"])


def _refuse_weights_without_data(model: torch.nn.Module, path: Path, device: str) -> None:
    """Loading moves stored weights to `device`; weights on the meta device hold no data, so
    nothing can move them (the model was saved before real weights were loaded into it)."""
    stray = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if stray:
        more = f" and {len(stray) - 1} more" if len(stray) > 1 else ""
        raise SiaError(
            f"{path}: the model's weights ({stray[0]}{more}) are on the meta device, not {device}: "
            "they hold no data; save the model again after loading its real weights"
        )


@dataclass
class _ExportFacts:
    """What the exported graph says about its image input."""

    batch_range: tuple[int, int | None]
    spatial_size: tuple[int, int] | None


def _load_export(path: Path, device: str) -> tuple[torch.nn.Module, str, _ExportFacts]:
    extra = {"sia.yaml": ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
        module = program.module()
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad file
        raise SiaError(f"{path}: torch.export archive could not be loaded: {_first_line(exc)}") from None
    _refuse_training_graph(path, program)
    facts = _export_input_facts(path, program)
    _refuse_weights_without_data(module, path, device)
    return module.to(device), _decode_yaml_text(extra["sia.yaml"]), facts


def _export_input_facts(path: Path, program: Any) -> _ExportFacts:
    user_inputs = list(program.graph_signature.user_inputs)
    if len(user_inputs) != 1:
        raise SiaError(f"{path}: the exported model takes {len(user_inputs)} inputs; sia passes one image batch")
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == user_inputs[0])
    value = node.meta.get("val")
    shape = tuple(getattr(value, "shape", ()))
    if len(shape) != 4 or shape[1] != 3:
        shown = tuple(d if isinstance(d, int) else "dynamic" for d in shape)
        raise SiaError(f"{path}: the exported model takes input of shape {shown}; sia passes (B, 3, H, W) images")
    spatial = (shape[2], shape[3]) if all(isinstance(d, int) for d in shape[2:]) else None
    return _ExportFacts(_batch_range(program, shape[0]), spatial)


def _batch_range(program: Any, batch_dim: Any) -> tuple[int, int | None]:
    if isinstance(batch_dim, int):
        return batch_dim, batch_dim
    try:
        bounds = program.range_constraints[batch_dim.node.expr]
        low = max(1, int(bounds.lower))
        high = None if math.isinf(float(bounds.upper)) else int(bounds.upper)
        return low, high
    except Exception:  # noqa: BLE001 - unknown bounds: trust the graph to take any batch
        return 1, None


def _refuse_training_graph(path: Path, program: Any) -> None:
    """Exported programs keep the mode they were traced in; training mode makes outputs batch-dependent."""
    offenders = sorted({name for name in map(_training_op_name, program.graph.nodes) if name})
    if offenders:
        raise SiaError(
            f"{path} was exported in training mode ({', '.join(offenders)}); exported programs cannot be "
            "switched to eval mode: call model.eval() before torch.export.export and save it again"
        )


def _training_op_name(node: Any) -> str | None:
    if node.op != "call_function":
        return None
    name = str(node.target)
    if "batch_norm_legit_functional" in name:
        return name
    if "batch_norm" not in name and "dropout" not in name:
        return None
    schema = getattr(node.target, "_schema", None)
    for index, argument in enumerate(getattr(schema, "arguments", [])):
        if argument.name in ("training", "train"):
            if index < len(node.args):
                value = node.args[index]
            else:
                value = node.kwargs.get(argument.name, argument.default_value)
            return name if value is True else None
    return None


# ------------------------------------------------------------------------ settings


@dataclass
class _Settings:
    input_size: tuple[int, int] | None = None
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    task: str | None = None
    output_is_probability: bool = False
    class_names: list[str] | None = None
    eye_indices: tuple[int, int] | None = None


def _parse_size(value: Any, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    items = [value] * 2 if not isinstance(value, (list, tuple)) else list(value)
    if len(items) == 1:
        items = items * 2
    if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items):
        raise SiaError(f"{name} must be a positive integer or two of them (height width), got {value!r}")
    return items[0], items[1]


def _parse_channels(value: Any, name: str, positive: bool = False) -> tuple[float, float, float] | None:
    if value is None:
        return None
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(items) == 1:
        items = items * 3
    try:
        numbers = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != 3 or not all(math.isfinite(v) for v in numbers) or (positive and min(numbers) <= 0):
        kind = "positive numbers" if positive else "numbers"
        raise SiaError(f"{name} must be one or three {kind} (one per RGB channel), got {value!r}")
    return numbers  # type: ignore[return-value]


def _parse_task(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if value not in TASKS:
        raise SiaError(f"{name} must be one of {', '.join(TASKS)}, got {value!r}")
    return value


def _parse_output_type(value: Any, name: str) -> bool:
    if value is None or str(value).lower() in ("logits", "logit"):
        return False
    if str(value).lower() in ("probability", "probabilities"):
        return True
    raise SiaError(f"{name} must be 'logits' or 'probability', got {value!r}")


def _parse_class_names(value: Any, name: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, int)) for v in value):
        raise SiaError(f"{name} must be a list of names, got {value!r}")
    if any(isinstance(v, bool) for v in value):
        # YAML reads unquoted yes/no/on/off as booleans; the original word is lost.
        raise SiaError(f"{name} holds true/false values: quote names such as 'yes' and 'no'")
    return [str(v) for v in value]


def _parse_eye_indices(value: Any, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    items = list(value) if isinstance(value, (list, tuple)) else []
    valid = len(items) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in items)
    if not valid or items[0] == items[1]:
        raise SiaError(f"{name} must be two different keypoint indices, got {value!r}")
    return items[0], items[1]


def _read_sia_yaml(text: str, path: Path) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SiaError(f"sia.yaml in {path} is not valid YAML: {_first_line(exc)}") from None
    if not isinstance(data, dict):
        raise SiaError(f"sia.yaml in {path} must be a mapping (key: value lines)")
    # Accept `input-size` as well: a hyphen typo should not be silently ignored.
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def _merge_settings(stored: dict[str, Any], path: Path, explicit: dict[str, Any]) -> _Settings:
    """Explicit arguments win over sia.yaml; both are validated with the name the user wrote."""

    def pick(key: str, flag: str, parse, **extra):
        if explicit.get(key) is not None:
            return parse(explicit[key], flag, **extra)
        return parse(stored.get(key), f"{key} in sia.yaml of {path}", **extra)

    settings = _Settings(
        input_size=pick("input_size", "--input-size", _parse_size),
        task=pick("task", "--task", _parse_task),
        output_is_probability=_parse_output_type(stored.get("output"), f"output in sia.yaml of {path}"),
        class_names=_parse_class_names(stored.get("class_names"), f"class_names in sia.yaml of {path}"),
        eye_indices=_parse_eye_indices(stored.get("eye_indices"), f"eye_indices in sia.yaml of {path}"),
    )
    settings.mean = pick("mean", "--mean", _parse_channels) or settings.mean
    settings.std = pick("std", "--std", _parse_channels, positive=True) or settings.std
    return settings


# --------------------------------------------------------------- output selection


def _resolve_output_key(raw: Any, output_key: Any, task: str | None) -> int | str | None:
    """Which part of the model's output is the prediction: None (the tensor itself), an index or a key."""
    if isinstance(raw, torch.Tensor):
        return None
    if isinstance(raw, (tuple, list)):
        entries = {index: value for index, value in enumerate(raw)}
        key = _tuple_index(output_key, len(raw)) if output_key is not None else None
    elif isinstance(raw, dict):
        entries = dict(raw)
        key = str(output_key) if output_key is not None else None
        if key is not None and key not in entries:
            raise SiaError(f"--output-key {key!r} is not among the model's outputs: {', '.join(map(str, entries))}")
    else:
        raise SiaError(f"model returns {type(raw).__name__}; expected a tensor, a tuple/list or a dict of tensors")
    if key is None:
        key = _only_candidate(entries, task)
    if not isinstance(entries[key], torch.Tensor):
        raise SiaError(f"model output {key!r} is {type(entries[key]).__name__}, not a tensor")
    return key


def _tuple_index(output_key: Any, length: int) -> int:
    try:
        index = int(output_key)
    except (TypeError, ValueError):
        raise SiaError(f"the model returns a tuple of {length}: --output-key must be an index, got {output_key!r}") from None
    if not 0 <= index < length:
        raise SiaError(f"--output-key {index} is out of range: the model returns {length} outputs")
    return index


def _only_candidate(entries: dict[Any, Any], task: str | None) -> Any:
    tensors = {key: value for key, value in entries.items() if isinstance(value, torch.Tensor)}
    if len(tensors) > 1 and task is not None:
        fitting = {key: value for key, value in tensors.items() if _kind_of_shape(tuple(value.shape)) == task}
        tensors = fitting if len(fitting) == 1 else tensors
    if len(tensors) == 1:
        return next(iter(tensors))
    listing = ", ".join(f"{key!r}: {_shape_text(value)}" for key, value in entries.items())
    raise SiaError(f"the model returns several outputs ({listing}); choose one with --output-key")


def _shape_text(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def _kind_of_shape(shape: tuple[int, ...]) -> str | None:
    if len(shape) == 1 or (len(shape) == 2 and shape[1] == 1):
        return "binary"
    if len(shape) == 2 and shape[1] >= 2:
        return "multiclass"
    if len(shape) == 4:
        return "keypoints"
    return None


# -------------------------------------------------------------------------- target


class Target(torch.nn.Module):
    """The model under attack with its preprocessing and task: loss, reference, success.

    Parameters are frozen (the attack needs input gradients only) and the wrapped
    model stays in the mode it was loaded in: ``Target.train()``/``eval()`` do not
    reach it. ``forward`` takes generator images in [-1, 1] of shape (B, 3, S, S) and
    returns the raw prediction: logits (B,) for binary models (or probabilities when
    ``output_is_probability``), logits (B, C) for multiclass, heatmaps (B, K, H, W).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        settings: _Settings,
        *,
        path: Path,
        sha256: str,
        format: str,
        batch_range: tuple[int, int | None] = (1, None),
    ):
        super().__init__()
        self.model = model
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.path = str(path)
        self.sha256 = sha256
        self.format = format
        self.input_size = settings.input_size
        self.mean = settings.mean
        self.std = settings.std
        self.output_is_probability = settings.output_is_probability
        self.class_names = settings.class_names
        self.eye_indices = settings.eye_indices
        self.batch_range = batch_range
        self.static_batch = batch_range[0] if batch_range[0] == batch_range[1] else None
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        # Filled in by the probe in load_target.
        self.kind: str = ""
        self.output_key: int | str | None = None
        self.output_shape: tuple[int, ...] = ()

    # The wrapped model keeps its load-time mode: exported programs cannot switch,
    # and an engine calling .eval()/.train() on the target must not put BN in training.
    def train(self, mode: bool = True) -> "Target":
        self.training = mode
        return self

    @property
    def heatmap_size(self) -> tuple[int, int] | None:
        return tuple(self.output_shape[-2:]) if self.kind == "keypoints" else None  # type: ignore[return-value]

    @property
    def num_outputs(self) -> int:
        """Classes for multiclass, keypoints for keypoint models, 1 for binary."""
        return self.output_shape[0] if self.kind in ("multiclass", "keypoints") else 1

    def describe(self) -> dict[str, Any]:
        """JSON-friendly descriptor for reports."""
        return {
            "path": self.path,
            "sha256": self.sha256,
            "format": self.format,
            "kind": self.kind,
            "input_size": list(self.input_size) if self.input_size else None,
            "mean": list(self.mean),
            "std": list(self.std),
            "output": "probability" if self.output_is_probability else "logits",
            "output_key": self.output_key,
            "output_shape": list(self.output_shape),
            "class_names": self.class_names,
            "eye_indices": list(self.eye_indices) if self.eye_indices else None,
            "static_batch": self.static_batch,
        }

    # ----------------------------------------------------------- forward path

    def preprocess(self, img: torch.Tensor) -> torch.Tensor:
        """Generator images in [-1, 1] -> the target's input: [0, 1], resized, normalised."""
        x = (img + 1) / 2
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False, antialias=False)
        return (x - self._mean) / self._std

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        out = self._run_model(self.preprocess(img))
        return out.reshape(out.shape[0]) if self.kind == "binary" else out

    def _run_model(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [self._select(self.model(chunk))[:count] for chunk, count in self._batch_chunks(x)]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _select(self, raw: Any) -> torch.Tensor:
        return raw if self.output_key is None else raw[self.output_key]

    def _batch_chunks(self, x: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        """Pieces the model accepts, with how many real images each holds (exports with a fixed batch)."""
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
        """Binary: P(class 1) (B,); multiclass: softmax (B, C)."""
        out = out.float()
        if self.kind == "binary":
            return out if self.output_is_probability else torch.sigmoid(out)
        return out.softmax(dim=1)

    def reference(self, out: torch.Tensor) -> torch.Tensor:
        """The model's own prediction, used as the label to move away from."""
        out = out.detach()
        if self.kind == "binary":
            return (self.probability(out) > 0.5).float()
        if self.kind == "multiclass":
            return out.argmax(dim=1)
        return out.clone()

    def loss(self, out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """Per-image loss (B,) that the attack maximises."""
        if self.kind == "binary":
            if self.output_is_probability:
                p = out.float().clamp(_PROBABILITY_EPS, 1 - _PROBABILITY_EPS)
                return -(ref * p.log() + (1 - ref) * (1 - p).log())
            return F.binary_cross_entropy_with_logits(out.float(), ref.float(), reduction="none")
        if self.kind == "multiclass":
            return F.cross_entropy(out.float(), ref, reduction="none")
        return (out.float() - ref.float()).pow(2).flatten(1).mean(dim=1)

    def predict(self, out: torch.Tensor) -> torch.Tensor:
        """Binary: P(class 1) (B,); multiclass: class index (B,); keypoints: (B, K, 2) argmax (x, y)."""
        out = out.detach()
        if self.kind == "binary":
            return self.probability(out)
        if self.kind == "multiclass":
            return out.argmax(dim=1)
        return argmax_coordinates(out)

    def error(self, out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """Magnitude of the failure (B,): NME for keypoints, 1 - P(reference label) for classifiers."""
        out = out.detach()
        if self.kind == "binary":
            return (self.probability(out) - ref.float()).abs()
        if self.kind == "multiclass":
            return 1 - self.probability(out).gather(1, ref.view(-1, 1)).squeeze(1)
        return self._nme(argmax_coordinates(out), argmax_coordinates(ref.detach()), ref.shape[-2:])

    def success(self, out: torch.Tensor, ref: torch.Tensor, nme_threshold: float = 0.1) -> torch.Tensor:
        """Bool (B,): the prediction left the reference label, or the keypoint NME exceeds the threshold."""
        if self.kind == "binary":
            return (self.probability(out.detach()) > 0.5) != (ref > 0.5)
        if self.kind == "multiclass":
            return out.detach().argmax(dim=1) != ref
        return self.error(out, ref) > nme_threshold

    def distance(self, out_a: torch.Tensor, out_b: torch.Tensor) -> torch.Tensor:
        """How far two predictions are apart (B,): total-variation distance of the class
        probabilities (|p_a - p_b| for binary) or the NME of a against b for keypoints."""
        out_a, out_b = out_a.detach(), out_b.detach()
        if self.kind == "binary":
            return (self.probability(out_a) - self.probability(out_b)).abs()
        if self.kind == "multiclass":
            return (self.probability(out_a) - self.probability(out_b)).abs().sum(dim=1) / 2
        return self._nme(argmax_coordinates(out_a), argmax_coordinates(out_b), out_b.shape[-2:])

    def _nme(self, predicted: torch.Tensor, truth: torch.Tensor, heatmap_hw: Sequence[int]) -> torch.Tensor:
        mean_error = (predicted - truth).norm(dim=-1).mean(dim=-1)
        if self.eye_indices is not None:
            left, right = self.eye_indices
            # Coinciding eyes would divide by zero; one heatmap pixel is the finest scale there is.
            scale = (truth[:, left] - truth[:, right]).norm(dim=-1).clamp_min(1.0)
        else:
            scale = math.hypot(heatmap_hw[0], heatmap_hw[1])
        return mean_error / scale

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
        if self.kind == "binary":
            return values.float().reshape(-1)
        if self.kind == "multiclass":
            labels = values.long().reshape(-1)
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_outputs):
                raise SiaError(f"labels must be class indices 0..{self.num_outputs - 1} for this model")
            return labels
        size = _parse_size(heatmap_size, "heatmap_size") if heatmap_size is not None else self.heatmap_size
        if values.shape[-2:] != (self.num_outputs, 2):
            raise SiaError(f"keypoint labels have {values.shape[-2]} points; the model predicts {self.num_outputs}")
        return gaussian_heatmaps(values.float(), size)


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


# --------------------------------------------------------------------------- load


def load_target(
    path: str | Path,
    device: str | torch.device = "cpu",
    task: str | None = None,
    input_size: int | Sequence[int] | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    output_key: int | str | None = None,
    probe_size: int = 64,
) -> Target:
    """Load a TorchScript file or torch.export archive and check it on a probe batch.

    Explicit arguments override the ``sia.yaml`` stored in the file; without either the
    image is passed at the generator's size in [0, 1]. For exported programs with a
    fixed image size that size is the default ``input_size``. The probe runs two random
    ``probe_size`` images through preprocessing, model and one backward pass and infers
    the task kind from the output shape; every problem found is a SiaError.
    """
    path = Path(path)
    if not path.is_file():
        raise SiaError(f"{path}: no such model file")
    device = str(device)
    model_format = _detect_format(path)
    facts = _ExportFacts((1, None), None)
    if model_format == "torchscript":
        model, yaml_text = _load_torchscript(path, device)
    else:
        model, yaml_text, facts = _load_export(path, device)
    explicit = {"input_size": input_size, "mean": mean, "std": std, "task": task}
    settings = _merge_settings(_read_sia_yaml(yaml_text, path), path, explicit)
    if settings.input_size is None:
        settings.input_size = facts.spatial_size
    target = Target(
        model, settings, path=path, sha256=file_sha256(path), format=model_format, batch_range=facts.batch_range
    ).to(device)
    _probe(target, probe_size, settings.task, output_key)
    return target


def _probe(target: Target, probe_size: int, task: str | None, output_key: Any) -> None:
    device = target._mean.device
    images = (torch.rand(_PROBE_BATCH, 3, probe_size, probe_size, device=device) * 2 - 1).requires_grad_()
    with torch.enable_grad():
        inputs = target.preprocess(images)
        chunks = target._batch_chunks(inputs)
        try:
            raw = target.model(chunks[0][0])
        except Exception as exc:  # noqa: BLE001 - whatever the model raises is the user's to fix
            raise _probe_failure(target, probe_size, _first_line(exc)) from None
        target.output_key = _resolve_output_key(raw, output_key, task)
        out = target._select(raw)[: chunks[0][1]] if len(chunks) == 1 else target._run_model(inputs)
        _set_kind(target, tuple(out.shape), task)
        _check_probe_output(target, out)
        _check_input_gradient(target, out, images)


# How PyTorch words a tensor on the wrong device (or a CUDA device this machine lacks).
_DEVICE_PROBLEM = re.compile(r"device|cuda|nvidia", re.IGNORECASE)


def _probe_failure(target: Target, probe_size: int, why: str) -> SiaError:
    device = str(target._mean.device)
    if _DEVICE_PROBLEM.search(why):
        # A device written into the model's code: other input settings would not help.
        return SiaError(
            f"model fails on {device}: {why}; it uses tensors on another device (one fixed in its code?): "
            f"run it with --device set to that device, or save it for {device}"
        )
    return SiaError(
        f"model cannot take {_probe_input_text(target, probe_size)}: {why}; "
        "set --input-size/--mean/--std (or sia.yaml in the model file) to what it expects"
    )


def _probe_input_text(target: Target, probe_size: int) -> str:
    height, width = target.input_size or (probe_size, probe_size)
    text = f"{_PROBE_BATCH}x3x{height}x{width} images in range [0, 1]"
    if target.mean != (0.0, 0.0, 0.0) or target.std != (1.0, 1.0, 1.0):
        text += f" normalised with mean {list(target.mean)} and std {list(target.std)}"
    return text


def _set_kind(target: Target, shape: tuple[int, ...], task: str | None) -> None:
    kind = _kind_of_shape(shape) if shape and shape[0] == _PROBE_BATCH else None
    if kind is None:
        raise SiaError(
            f"model output has shape {shape} for a batch of {_PROBE_BATCH}; accepted shapes: {ACCEPTED_SHAPES}"
        )
    if task is not None and task != kind:
        raise SiaError(f"--task {task} does not fit the model's output shape {shape}, which is {kind} ({ACCEPTED_SHAPES})")
    target.kind = kind
    target.output_shape = shape[1:] if kind != "binary" else ()
    _check_task_settings(target)


def _check_task_settings(target: Target) -> None:
    if target.output_is_probability and target.kind != "binary":
        raise SiaError(f"sia.yaml says output: probability, which is for binary models; this one is {target.kind}")
    expected_names = {"binary": 2, "multiclass": target.num_outputs}.get(target.kind)
    if target.class_names is not None and len(target.class_names) != expected_names:
        raise SiaError(
            f"sia.yaml lists {len(target.class_names)} class_names; the {target.kind} model has {expected_names} classes"
        )
    if target.eye_indices is not None:
        if target.kind != "keypoints" or max(target.eye_indices) >= target.num_outputs:
            raise SiaError(f"eye_indices {list(target.eye_indices)} do not name two of the model's keypoints")


def _check_probe_output(target: Target, out: torch.Tensor) -> None:
    if not out.is_floating_point():
        raise SiaError(f"model is not differentiable: it returns {out.dtype} values")
    if out.grad_fn is None:
        raise SiaError(
            "model is not differentiable: its output carries no gradient to the input "
            "(it detaches, thresholds or leaves autograd)"
        )
    if not torch.isfinite(out).all():
        raise SiaError("model returns NaN or infinite values on a random probe image")
    if target.output_is_probability and (out.min() < 0 or out.max() > 1):
        raise SiaError("sia.yaml says output: probability but the model returns values outside [0, 1]")


def _check_input_gradient(target: Target, out: torch.Tensor, images: torch.Tensor) -> None:
    # A random projection of the output: any differentiable model gives it a non-zero input gradient.
    projection = torch.randn_like(out)
    try:
        (gradient,) = torch.autograd.grad((out * projection).sum(), images)
    except Exception as exc:  # noqa: BLE001 - a missing derivative is the model's problem
        raise SiaError(f"model is not differentiable: backward pass failed: {_first_line(exc)}") from None
    if not torch.isfinite(gradient).all():
        raise SiaError("model gives NaN or infinite input gradients on a random probe image")
    if not gradient.abs().sum() > 0:
        raise SiaError("model is not differentiable: its output does not change with the input (zero gradient)")


# ------------------------------------------------------------------------- labels


def read_labels(path: str | Path, kind: str, class_names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Read a labels CSV: ``file,label`` (binary 0/1, multiclass index or class name) or
    ``file,x1,y1,x2,y2,...`` (keypoints, heatmap pixels). A header line is optional.

    Returns file name -> scalar tensor (float for binary, long for multiclass) or (K, 2) float.
    """
    path = Path(path)
    rows = _csv_rows(path)
    if rows and _is_header(rows[0][1], class_names):
        rows = rows[1:]
    if not rows:
        raise SiaError(f"{path}: no labels found")
    parse = {"binary": _binary_label, "multiclass": _multiclass_label, "keypoints": _keypoint_label}.get(kind)
    if parse is None:
        raise SiaError(f"unknown task kind {kind!r}; expected one of {', '.join(TASKS)}")
    labels: dict[str, torch.Tensor] = {}
    for line, fields in rows:
        where = f"{path}, line {line}"
        name = fields[0]
        if not name:
            raise SiaError(f"{where}: empty file name")
        if name in labels:
            raise SiaError(f"{where}: {name} is listed twice")
        labels[name] = parse(fields[1:], where, class_names)
        first = next(iter(labels.values()))
        if labels[name].shape != first.shape:
            raise SiaError(f"{where}: {labels[name].shape[0]} keypoints, the first row has {first.shape[0]}")
    return labels


def _csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as stream:
            return [
                (line, [field.strip() for field in fields])
                for line, fields in enumerate(csv.reader(stream), start=1)
                if any(field.strip() for field in fields)
            ]
    except FileNotFoundError:
        raise SiaError(f"{path}: no such labels file") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise SiaError(f"{path} is not a readable CSV file: {_first_line(exc)}") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_header(fields: list[str], class_names: Sequence[str] | None) -> bool:
    if len(fields) < 2:
        return False
    return not _is_number(fields[1]) and fields[1] not in (class_names or ())


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


def _multiclass_label(values: list[str], where: str, class_names: Sequence[str] | None) -> torch.Tensor:
    _expect_fields(values, 1, where, "file,label")
    text = values[0]
    if class_names and text in class_names:
        return torch.tensor(list(class_names).index(text))
    if not re.fullmatch(r"\d+", text):
        known = f" or one of {', '.join(class_names)}" if class_names else ""
        raise SiaError(f"{where}: a class label must be a non-negative integer{known}, got {text!r}")
    return torch.tensor(int(text))


def _keypoint_label(values: list[str], where: str, class_names: Sequence[str] | None) -> torch.Tensor:
    if not values or len(values) % 2:
        raise SiaError(f"{where}: expected 'file,x1,y1,x2,y2,...' (pairs of coordinates), got {len(values)} numbers")
    if not all(_is_number(v) and math.isfinite(float(v)) for v in values):
        raise SiaError(f"{where}: keypoint coordinates must be numbers, got {','.join(values)}")
    return torch.tensor([float(v) for v in values]).view(-1, 2)
