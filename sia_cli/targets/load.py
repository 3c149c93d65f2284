"""`load_target`: read a model file, merge its settings, probe it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from sia_cli.errors import SiaError
from sia_cli.runs.files import file_sha256
from sia_cli.targets.formats import ExportFacts, detect_format, load_export, load_torchscript
from sia_cli.targets.model import Target
from sia_cli.targets.options import ModelOptions
from sia_cli.targets.probe import probe
from sia_cli.targets.settings import merge_settings, read_sia_yaml


def load_target(
    path: str | Path,
    device: str | torch.device = "cpu",
    task: str | None = None,
    input_size: int | Sequence[int] | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    output_key: int | str | None = None,
    probe_size: int = 64,
    *,
    options: ModelOptions | None = None,
    output: str | None = None,
    label: str | int | None = None,
    channels: int | None = None,
    margin: float | None = None,
    eye_indices: Sequence[int] | str | None = None,
    landmark_layout: str | None = None,
    trust_pickle: bool = False,
) -> Target:
    """Load a TorchScript file or torch.export archive and check it on probe images.

    Explicit arguments override the ``sia.yaml`` stored in the file; without either the
    image is passed at the generator's size (``probe_size``) in [0, 1], as RGB. For exported
    programs the graph's fixed image size and channel count are the defaults. The probe runs
    random ``probe_size`` images through preprocessing, model and one backward pass, infers
    the task kind from the output shape (or checks ``task`` against it) and inspects the
    outputs (see :mod:`sia_cli.targets.probe`); every problem found is a SiaError.

    ``output``: 'logits' or 'probability', what a binary, multiclass or multilabel head emits.
    ``label``: the label under attack of a multilabel model (name from sia.yaml's class_names,
    or index). ``channels``: 1 for grayscale models. ``margin``: regression success threshold.
    ``eye_indices``: two landmark/keypoint indices whose distance normalises the NME.
    ``trust_pickle``: load a .pt2 archive whose weights or sample inputs are pickles (refused
    otherwise: unpickling can run any code). ``options``: all of these as one `ModelOptions`
    (what the commands pass); a keyword given beside it overrides its field.
    """
    given = {"task": task, "input_size": input_size, "mean": mean, "std": std, "output_key": output_key,
             "output": output, "label": label, "channels": channels, "margin": margin, "eye_indices": eye_indices,
             "landmark_layout": landmark_layout}
    options = replace(options or ModelOptions(), **{k: v for k, v in given.items() if v is not None})
    if trust_pickle:
        options = replace(options, trust_pickle=True)
    path = Path(path)
    if not path.is_file():
        raise SiaError(f"{path}: no such model file")
    device = str(device)
    model_format = detect_format(path)
    facts = ExportFacts()
    if model_format == "torchscript":
        model, yaml_text = load_torchscript(path, device)
    else:
        model, yaml_text, facts = load_export(path, device, options.trust_pickle)
    stored = read_sia_yaml(yaml_text, path)
    settings = merge_settings(stored, path, options.explicit(), facts)
    output_key = options.output_key if options.output_key is not None else stored.get("output_key")
    target = Target(
        model, settings, path=path, sha256=file_sha256(path), format=model_format, batch_range=facts.batch_range,
        probe_size=probe_size,
    ).to(device)
    probe(target, probe_size, output_key)
    return target
