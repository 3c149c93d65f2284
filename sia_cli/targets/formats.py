"""Reading model files: TorchScript (``torch.jit.save``) and ``torch.export`` archives (``.pt2``).

Each loader returns the model, the text of the ``sia.yaml`` stored in the file's extra
files ('' when there is none) and, for exported programs, what the graph says about its
image input (:class:`ExportFacts`).
"""

from __future__ import annotations

import io
import itertools
import json
import math
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sia_cli.errors import SiaError
from sia_cli.text import first_few


def _not_a_model(path: Path, why: str = "") -> SiaError:
    return SiaError(f"{path} is not a TorchScript file or torch.export archive{why}")


def detect_format(path: Path) -> str:
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


def first_line(exc: BaseException) -> str:
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


def decode_yaml_text(raw: Any) -> str:
    return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw or "")


def load_torchscript(path: Path, device: str) -> tuple[torch.nn.Module, str]:
    extra = {"sia.yaml": ""}
    try:
        with warnings.catch_warnings():
            # The user chose the format; the deprecation notice is not theirs to act on.
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad file
        raise SiaError(f"{path}: TorchScript file could not be loaded: {first_line(exc)}") from None
    _refuse_weights_without_data(model, path, device)
    model.eval()
    return model, decode_yaml_text(extra["sia.yaml"])


def _refuse_weights_without_data(model: torch.nn.Module, path: Path, device: str) -> None:
    """Loading moves stored weights to `device`; weights on the meta device hold no data, so
    nothing can move them (the model was saved before real weights were loaded into it)."""
    stray = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if stray:
        raise SiaError(
            f"{path}: the model's weights ({first_few(stray, 1)}) are on the meta device, not {device}: "
            "they hold no data; save the model again after loading its real weights"
        )


@dataclass
class ExportFacts:
    """What the exported graph says about its image input."""

    batch_range: tuple[int, int | None] = (1, None)
    spatial_size: tuple[int, int] | None = None
    channels: int | None = None


PICKLE_FLAG = "--trust-pickle"


def pickled_entries(path: Path) -> list[str]:
    """Entries of a .pt2 archive that `torch.export.load` would unpickle without restriction
    (which can run any code): weights or constants saved with `use_pickle` (tensor subclasses,
    opaque objects), `.pkl` files and other pickles, and torch.save files (sample inputs, legacy
    weights) that the safe loader (weights_only) cannot read, from which torch falls back to
    plain unpickling. A plain `torch.export.save` of ordinary tensors has none: raw weight
    bytes, JSON configs and weights-only sample inputs."""
    found = []
    with zipfile.ZipFile(path) as archive:
        names = [name for name in archive.namelist() if "data" in name.split("/") and not name.endswith("/")]
        raw = set()  # payloads the configs declare as raw tensor bytes, never unpickled
        for name in names:
            parts = name.split("/")
            if name.endswith("_config.json") and ("weights" in parts or "constants" in parts):
                try:
                    config = json.loads(archive.read(name)).get("config", {})
                    found += [f"{fqn} (in {name})" for fqn, meta in config.items() if meta.get("use_pickle")]
                    raw |= {"/".join(parts[:-1] + [meta.get("path_name", "")]) for meta in config.values()
                            if not meta.get("use_pickle")}
                except (ValueError, AttributeError):
                    found.append(f"{name} (unreadable)")
        for name in names:
            if name.endswith("_config.json") or name in raw:
                continue
            data = archive.read(name)
            if name.endswith(".pkl") or (data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
                found.append(name)
            elif data[:2] == b"PK" or name.endswith(".pt") or "sample_inputs" in name.split("/"):
                try:  # a torch.save file: the safe loader must read it, or torch unpickles it freely
                    torch.load(io.BytesIO(data), weights_only=True)
                except Exception:  # noqa: BLE001 - anything the safe loader refuses
                    found.append(name)
    return found


def _refuse_pickles(path: Path) -> None:
    try:
        found = pickled_entries(path)
    except (zipfile.BadZipFile, OSError, EOFError):
        raise _not_a_model(path) from None
    if found:
        raise SiaError(
            f"{path}: {first_few(found, 1)} is stored as a pickle, which loading would run (a pickle can execute "
            f"any code); pass {PICKLE_FLAG} to load it anyway, only for a file you trust"
        )


def load_export(path: Path, device: str, trust_pickle: bool = False) -> tuple[torch.nn.Module, str, ExportFacts]:
    extra = {"sia.yaml": ""}
    if not trust_pickle:
        _refuse_pickles(path)
    try:
        program = torch.export.load(str(path), extra_files=extra)
        module = program.module()
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad file
        raise SiaError(f"{path}: torch.export archive could not be loaded: {first_line(exc)}") from None
    _refuse_training_graph(path, program)
    facts = _export_input_facts(path, program)
    _refuse_weights_without_data(module, path, device)
    return module.to(device), decode_yaml_text(extra["sia.yaml"]), facts


def _export_input_facts(path: Path, program: Any) -> ExportFacts:
    user_inputs = list(program.graph_signature.user_inputs)
    if len(user_inputs) != 1:
        raise SiaError(f"{path}: the exported model takes {len(user_inputs)} inputs; sia passes one image batch")
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == user_inputs[0])
    value = node.meta.get("val")
    shape = tuple(getattr(value, "shape", ()))
    if len(shape) != 4 or shape[1] not in (1, 3):
        shown = tuple(d if isinstance(d, int) else "dynamic" for d in shape)
        raise SiaError(
            f"{path}: the exported model takes input of shape {shown}; sia passes (B, 3, H, W) RGB "
            "or (B, 1, H, W) grayscale images"
        )
    spatial = (shape[2], shape[3]) if all(isinstance(d, int) for d in shape[2:]) else None
    return ExportFacts(_batch_range(program, shape[0]), spatial, int(shape[1]))


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
