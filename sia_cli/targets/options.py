"""How to load and read a model under test: one frozen object, passed whole from the command line
to the loader and written whole into the `sia.yaml` of every model the tool writes.

Each field is None when not given: the model's own `sia.yaml` (or the export graph, or the
default) decides then (`settings.merge_settings`). The command line group that fills it is
declared once, in `sia_cli/cli/options.py` (`with_model_options`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class ModelOptions:
    task: str | None = None  # binary, multiclass, multilabel, keypoints, landmarks, regression
    input_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    channels: int | None = None  # 1 for grayscale models
    output: str | None = None  # logits or probability (binary, multiclass, multilabel heads)
    output_key: str | None = None  # which output of a tuple or dict
    label: str | None = None  # multilabel: the label under attack, name or index
    margin: float | None = None  # regression: success past this change
    eye_indices: tuple[int, int] | None = None  # keypoints/landmarks: NME over their distance
    landmark_layout: str | None = None  # (B, 2K) landmarks: xyxy (x1, y1, x2, ...) or xxyy (x1..xK, y1..yK)
    trust_pickle: bool = False  # load .pt2 archives holding pickles (they can run code)

    def explicit(self) -> dict:
        """The settings a model's sia.yaml may also hold, as given (None: not given)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("output_key", "trust_pickle")}

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
