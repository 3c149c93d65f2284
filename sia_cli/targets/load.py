"""`load_target`: read a model file, merge its settings, probe it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

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
    probe_size: int = 64,
    *,
    options: ModelOptions | None = None,
    **given: Any,
) -> Target:
    """Load a TorchScript file or torch.export archive and check it on probe images.

    ``options`` (what the commands pass) and keywords named after its fields (``task``,
    ``input_size``, ``mean``, ``std``, ``output``, ``output_key``, ``label``, ``channels``,
    ``margin``, ``eye_indices``, ``landmark_layout``, ``trust_pickle``: see `ModelOptions`) say
    how to load and read the model; a keyword overrides the field. They override the ``sia.yaml``
    stored in the file; without either the image is passed at the generator's size
    (``probe_size``) in [0, 1], as RGB. For exported programs the graph's fixed image size and
    channel count are the defaults. The probe runs random ``probe_size`` images through
    preprocessing, model and one backward pass, infers the task kind from the output shape (or
    checks ``task`` against it) and inspects the outputs (see :mod:`sia_cli.targets.probe`);
    every problem found is a SiaError.
    """
    unknown = sorted(set(given) - set(ModelOptions.names()))
    if unknown:
        raise TypeError(f"load_target() got unexpected keyword(s) {', '.join(unknown)}")
    options = replace(options or ModelOptions(), **{k: v for k, v in given.items() if v is not None})
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
    facts_of_file = dict(path=path, sha256=file_sha256(path), format=model_format, probe_size=probe_size)
    scratch = Target(model, settings, batch_range=facts.batch_range, **facts_of_file).to(device)
    return Target(model, **facts_of_file, settings=settings, probed=probe(scratch, probe_size, output_key)).to(device)
