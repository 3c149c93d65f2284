"""What the user said about the model: command-line options, the file's ``sia.yaml``, the export graph.

Options win over ``sia.yaml``, which wins over what an exported graph shows, which wins
over defaults. Every value is validated with the name the user wrote (``--mean`` or
``mean in sia.yaml of model.pt``), and :attr:`Settings.sources` records where each came
from: ``option``, ``sia.yaml``, ``export graph`` or ``default``.

``sia.yaml`` keys: ``input_size``, ``mean``, ``std``, ``channels`` (1 or 3), ``task``,
``output`` (logits or probability), ``class_names``, ``label`` (multilabel: the label under
attack), ``eye_indices``, ``margin`` (regression).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sia_cli.errors import SiaError
from sia_cli.targets.formats import ExportFacts, first_line
from sia_cli.targets.tasks import TASKS

FLAGS = {
    "input_size": "--input-size", "mean": "--mean", "std": "--std", "channels": "--channels", "task": "--task",
    "output": "--output", "label": "--label", "margin": "--margin", "eye_indices": "--eye-indices",
    "landmark_layout": "--landmark-layout",
}
LANDMARK_LAYOUTS = ("xyxy", "xxyy")


@dataclass
class Settings:
    input_size: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    channels: int = 3
    task: str | None = None
    output: str | None = None  # "logits", "probability", or None: not said
    class_names: list[str] | None = None
    eye_indices: tuple[int, int] | None = None
    label: str | None = None
    margin: float | None = None
    landmark_layout: str = "xyxy"  # how (B, 2K) coordinates are laid out
    sources: dict[str, str] = field(default_factory=dict)

    def flag_text(self, key: str, value: Any) -> str:
        """How the user wrote a setting: `--output probability` or `output: probability in sia.yaml`."""
        if self.sources.get(key) == "sia.yaml":
            return f"{key}: {value} in sia.yaml"
        return f"{FLAGS.get(key, key)} {value}"


def parse_size(value: Any, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    items = [value] * 2 if not isinstance(value, (list, tuple)) else list(value)
    if len(items) == 1:
        items = items * 2
    if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items):
        raise SiaError(f"{name} must be a positive integer or two of them (height width), got {value!r}")
    return items[0], items[1]


def _parse_per_channel(value: Any, name: str, channels: int, positive: bool = False) -> tuple[float, ...] | None:
    if value is None:
        return None
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(items) == 1:
        items = items * channels
    try:
        numbers = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != channels or not all(math.isfinite(v) for v in numbers) or (positive and min(numbers) <= 0):
        kind = "positive numbers" if positive else "numbers"
        if channels == 1:
            raise SiaError(f"{name} must be one {kind[:-1]} for a 1-channel (grayscale) model, got {value!r}")
        raise SiaError(f"{name} must be one or three {kind} (one per RGB channel), got {value!r}")
    return numbers


def _parse_channel_count(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or str(value).strip() not in ("1", "3"):
        raise SiaError(f"{name} must be 1 (grayscale) or 3 (RGB), got {value!r}")
    return int(str(value).strip())


def _parse_task(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if value not in TASKS:
        raise SiaError(f"{name} must be one of {', '.join(TASKS)}, got {value!r}")
    return value


def _parse_output_type(value: Any, name: str) -> str | None:
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in ("logits", "logit"):
        return "logits"
    if text in ("probability", "probabilities", "prob", "probs"):
        return "probability"
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


def _parse_label(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise SiaError(f"{name} must be a label name or index, got {value!r}")
    return str(value).strip()


def _parse_margin(value: Any, name: str) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
        raise SiaError(f"{name} must be a positive number, got {value!r}")
    return number


def _parse_eye_indices(value: Any, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    items: list[Any] = list(value) if isinstance(value, (list, tuple)) else []
    if isinstance(value, str):
        items = [int(v) if v.strip().isdigit() else v for v in value.split(",")]
    valid = len(items) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in items)
    if not valid or items[0] == items[1]:
        raise SiaError(f"{name} must be two different keypoint indices, got {value!r}")
    return items[0], items[1]


def read_sia_yaml(text: str, path: Path) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SiaError(f"sia.yaml in {path} is not valid YAML: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise SiaError(f"sia.yaml in {path} must be a mapping (key: value lines)")
    # Accept `input-size` as well: a hyphen typo should not be silently ignored.
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def _parse_layout(value: Any, name: str) -> str:
    text = str(value).strip().lower()
    if text not in LANDMARK_LAYOUTS:
        raise SiaError(f"{name} must be xyxy (x1, y1, x2, y2, ...) or xxyy (x1, ..., xK, y1, ..., yK), got {value!r}")
    return text


def merge_settings(stored: dict[str, Any], path: Path, explicit: dict[str, Any], facts: ExportFacts) -> Settings:
    """Explicit arguments win over sia.yaml, sia.yaml over the export graph; all validated."""
    settings = Settings()
    sources = settings.sources

    def pick(key: str, parse, **extra):
        if explicit.get(key) is not None:
            sources[key] = "option"
            return parse(explicit[key], FLAGS[key], **extra)
        if stored.get(key) is not None:
            sources[key] = "sia.yaml"
            return parse(stored[key], f"{key} in sia.yaml of {path}", **extra)
        return None

    settings.input_size = pick("input_size", parse_size)
    if settings.input_size is None and facts.spatial_size is not None:
        settings.input_size, sources["input_size"] = facts.spatial_size, "export graph"
    settings.channels = _channels(pick("channels", _parse_channel_count), facts, settings, path)
    settings.task = pick("task", _parse_task)
    settings.output = pick("output", _parse_output_type)
    settings.label = pick("label", _parse_label)
    settings.margin = pick("margin", _parse_margin)
    settings.eye_indices = pick("eye_indices", _parse_eye_indices)
    settings.landmark_layout = pick("landmark_layout", _parse_layout) or "xyxy"
    settings.class_names = _parse_class_names(stored.get("class_names"), f"class_names in sia.yaml of {path}")
    if settings.class_names is not None:
        sources["class_names"] = "sia.yaml"
    channels = settings.channels
    settings.mean = pick("mean", _parse_per_channel, channels=channels) or (0.0,) * channels
    settings.std = pick("std", _parse_per_channel, channels=channels, positive=True) or (1.0,) * channels
    sources.setdefault("input_size", "default (the generator's image size)")
    for key in ("mean", "std", "channels", "output", "landmark_layout"):
        sources.setdefault(key, "default")
    return settings


def _channels(said: int | None, facts: ExportFacts, settings: Settings, path: Path) -> int:
    if said is not None and facts.channels is not None and said != facts.channels:
        raise SiaError(
            f"{settings.flag_text('channels', said)} contradicts {path}: its exported graph takes "
            f"{facts.channels}-channel input"
        )
    if said is None and facts.channels is not None:
        settings.sources["channels"] = "export graph"
        return facts.channels
    return said or 3
