"""Writing a model under test back to disk in its own format (TorchScript or `torch.export`), with
the `sia.yaml` it was loaded with: the counterpart of `load.py`."""

from __future__ import annotations

import io
import warnings
import zipfile
from pathlib import Path

import torch
import yaml

from sia_cli.runs.files import write_bytes_atomic


def stored_yaml(path: Path) -> str:
    """The sia.yaml a model file carries in its extra files ('' when none)."""
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith("extra/sia.yaml")]
        return archive.read(names[0]).decode("utf-8") if names else ""


def export_model(target, source: Path, out: Path) -> Path:
    """The fine-tuned model in its input's format, with the input's sia.yaml updated with every
    option the model was read with (`Target.read_with`: --output-key, --task, ... given on the
    command line are kept): TorchScript saved again; an exported program exported again from
    its trained graph. Never the input file."""
    stored = yaml.safe_load(stored_yaml(source) or "") or {}
    yaml_text = yaml.safe_dump({**stored, **target.read_with()}, sort_keys=False)
    buffer = io.BytesIO()
    model = target.model
    if target.format == "torchscript":
        path = out / "model.pt"
        with warnings.catch_warnings():  # torch's deprecation of TorchScript: the user's format is what we save
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(model, buffer, _extra_files={"sia.yaml": yaml_text})
    else:
        path = out / "model.pt2"
        height, width = target.resolved_input_size
        low, high = target.batch_range
        example = torch.rand(max(2, low) if high is None or high >= 2 else low, target.channels, height, width,
                             device=next(model.parameters()).device)
        dynamic = None
        if high != low:
            dynamic = ({0: torch.export.Dim("batch", min=low, max=high) if high else torch.export.Dim("batch", min=low)},)
        program = torch.export.export(model, (example,), dynamic_shapes=dynamic)
        torch.export.save(program, buffer, extra_files={"sia.yaml": yaml_text})
    write_bytes_atomic(path, buffer.getbuffer())
    return path


