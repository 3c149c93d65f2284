"""The probe: run a freshly loaded target on a few images and settle what its output is.

It picks the output (``--output-key``), finds the batch sizes the model takes (a model
traced with one example image may only take batch 1), reads the task kind off the output
shape (or checks ``--task`` against it), checks the model is differentiable and finite, and
looks at the outputs of a dozen images (random and constant) for what the shape cannot say:
whether a sigmoid head emits logits or probabilities. Whatever it has to take for granted
goes to ``target.assumptions``; whatever cannot work is one SiaError line naming the fix.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from sia_cli.errors import SiaError
from sia_cli.targets.formats import first_line
from sia_cli.targets.model import Probed, Target
from sia_cli.targets.tasks import ACCEPTED_SHAPES, TASKS, Binary, Multiclass, Multilabel, Regression, Task, infer_task

PROBE_BATCH = 2
VALUE_IMAGES = 8  # random images, plus black, white and grey, whose outputs are inspected
# Outputs that vary across the probe images by less than this (relative to their size, at least
# 1) are one output: torchvision's MobileNetV3 at random init answers about 1e-11 for every image
# and class, so its predictions are ties that rounding decides and an attack "succeeds" on all.
CONSTANT_OUTPUT_SPREAD = 1e-6

# How PyTorch words a tensor on the wrong device (or a CUDA device this machine lacks).
_DEVICE_PROBLEM = re.compile(r"device|cuda|nvidia", re.IGNORECASE)
# How a convolution words an input with the wrong number of channels.
_CHANNEL_PROBLEM = re.compile(r"to have (\d+) channels, but got (\d+) channels")


class _BatchProblem(Exception):
    """The model failed at this batch size; another batch size may work."""

    def __init__(self, error: SiaError):
        super().__init__(str(error))
        self.error = error


def probe(target: Target, probe_size: int, output_key: Any) -> Probed:
    """The output key, the task, the batch sizes the model takes, the output kind and the
    assumptions made, settled on `target`: a scratch target load_target made for the probe (it
    fills it in as it goes) and then builds the model under test from the result, whole."""
    with torch.enable_grad():
        images, out = _probe_batches(target, probe_size, output_key)
        shape = tuple(out.shape[1:])
        task_class, how = _choose_task(target, tuple(out.shape))
        task = task_class(shape, target.settings, target.resolved_input_size)
        target.task = task
        _check_probe_output(target, out)
        _check_input_gradient(target, out, images)
    values = _probe_values(target, probe_size, out)
    sources = target.settings.sources
    sources["task"] = how
    if how == "output shape":
        line = task.assumption()
        if line:
            target.assumptions.append(line)
    target.assumptions.extend(task.inspect(values, inferred=how == "output shape"))
    constant = _constant_output_note(values)
    if constant:
        target.assumptions.append(constant)
    _settle_output_type(target, task)
    return Probed(settings=target.settings, task=task, output_key=target.output_key,
                  output_listing=target._output_listing, batch_range=target.batch_range,
                  static_batch=target.static_batch, assumptions=tuple(target.assumptions))


def _probe_batches(target: Target, probe_size: int, output_key: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Probe at batch 2; a TorchScript model that fails there gets a second try at batch 1."""
    try:
        return _probe_at(target, PROBE_BATCH, probe_size, output_key)
    except _BatchProblem as first:
        if target.batch_range != (1, None):  # an exported graph states its batch sizes
            raise first.error from None
        target.batch_range = (1, 1)
        try:
            result = _probe_at(target, 1, probe_size, output_key)
        except _BatchProblem:
            # Batch 1 fails too: the batch is not the problem, the first error says what is.
            target.batch_range = (1, None)
            raise first.error from None
        target.static_batch = 1
        target.settings.sources["static_batch"] = "probe (fails at batch 2, runs at batch 1)"
        return result


def _probe_at(target: Target, batch: int, probe_size: int, output_key: Any) -> tuple[torch.Tensor, torch.Tensor]:
    device = target._mean.device
    images = (torch.rand(batch, 3, probe_size, probe_size, device=device) * 2 - 1).requires_grad_()
    inputs = target.preprocess(images)
    chunks = target._batch_chunks(inputs)
    try:
        raw = target.model(chunks[0][0])
    except Exception as exc:  # noqa: BLE001 - whatever the model raises is the user's to fix
        raise _BatchProblem(_probe_failure(target, probe_size, batch, first_line(exc))) from None
    target.output_key, note = _resolve_output_key(raw, output_key, target.settings.task)
    target._output_listing = _listing(raw)
    selected = target._select(raw)
    expected = chunks[0][0].shape[0]
    if selected.dim() == 0 or selected.shape[0] != expected:
        raise _BatchProblem(SiaError(
            f"model output has shape {tuple(selected.shape)} for a batch of {expected}; "
            f"accepted shapes: {ACCEPTED_SHAPES}{_choose_other(target)}"
        ))
    if note:
        target.assumptions.append(note)
    out = selected[: chunks[0][1]] if len(chunks) == 1 else target._run_model(inputs)
    return images, out


def _probe_failure(target: Target, probe_size: int, batch: int, why: str) -> SiaError:
    device = str(target._mean.device)
    if _DEVICE_PROBLEM.search(why):
        # A device written into the model's code: other input settings would not help.
        return SiaError(
            f"model fails on {device}: {why}; it uses tensors on another device (one fixed in its code?): "
            f"run it with --device set to that device, or save it for {device}"
        )
    channels = _CHANNEL_PROBLEM.search(why)
    if channels and int(channels.group(1)) != target.channels:
        wanted = int(channels.group(1))
        fix = (
            f"pass --channels {wanted} (or channels: {wanted} in sia.yaml)" if wanted in (1, 3)
            else "sia passes 1-channel (grayscale) or 3-channel (RGB) images"
        )
        return SiaError(f"model wants {wanted}-channel input, sia passed {target.channels} ({why}); {fix}")
    return SiaError(
        f"model cannot take {_probe_input_text(target, probe_size, batch)}: {why}; "
        "set --input-size/--mean/--std (or sia.yaml in the model file) to what it expects"
    )


def _probe_input_text(target: Target, probe_size: int, batch: int) -> str:
    height, width = target.input_size or (probe_size, probe_size)
    kind = " grayscale" if target.channels == 1 else ""
    text = f"{batch}x{target.channels}x{height}x{width}{kind} images in range [0, 1]"
    if set(target.mean) != {0.0} or set(target.std) != {1.0}:
        text += f" normalised with mean {list(target.mean)} and std {list(target.std)}"
    return text


# --------------------------------------------------------------- output selection


def _resolve_output_key(raw: Any, output_key: Any, task: str | None) -> tuple[int | str | None, str | None]:
    """Which part of the model's output is the prediction (None: the tensor itself, an index or a
    key), and a line to record when it was chosen for fitting --task among several."""
    if isinstance(raw, torch.Tensor):
        if output_key is not None:  # ignored, it would hide a model that is not the one meant
            raise SiaError(f"--output-key {output_key!r} picks one of several outputs; this model returns one tensor "
                           f"{_shape_text(raw)}: drop --output-key")
        return None, None
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
    note = None
    if key is None:
        key, note = _only_candidate(entries, task)
    if not isinstance(entries[key], torch.Tensor):
        raise SiaError(f"model output {key!r} is {type(entries[key]).__name__}, not a tensor")
    return key, note


def _tuple_index(output_key: Any, length: int) -> int:
    try:
        index = int(output_key)
    except (TypeError, ValueError):
        raise SiaError(
            f"the model returns a tuple of {length}: --output-key must be an index, got {output_key!r}"
        ) from None
    if not 0 <= index < length:
        raise SiaError(f"--output-key {index} is out of range: the model returns {length} outputs")
    return index


def _only_candidate(entries: dict[Any, Any], task: str | None) -> tuple[Any, str | None]:
    tensors = {key: value for key, value in entries.items() if isinstance(value, torch.Tensor)}
    listing = ", ".join(f"{key!r}: {_shape_text(value)}" for key, value in entries.items())
    if len(tensors) > 1 and task is not None:
        fitting = {key: value for key, value in tensors.items()
                   if value.dim() >= 1 and TASKS[task].fits(tuple(value.shape[1:]))}
        if len(fitting) == 1:
            key = next(iter(fitting))
            return key, (f"the model returns several outputs ({listing}); output {key!r} is used, the only one "
                         f"that fits task {task}; choose another with --output-key")
    if len(tensors) == 1:
        return next(iter(tensors)), None
    raise SiaError(f"the model returns several outputs ({listing}); choose one with --output-key")


def _listing(raw: Any) -> str | None:
    if isinstance(raw, (tuple, list)) and len(raw) > 1:
        return ", ".join(f"{index}: {_shape_text(value)}" for index, value in enumerate(raw))
    if isinstance(raw, dict) and len(raw) > 1:
        return ", ".join(f"{key!r}: {_shape_text(value)}" for key, value in raw.items())
    return None


def _choose_other(target: Target) -> str:
    """For errors about the chosen output of a model with several: how to choose another."""
    listing = getattr(target, "_output_listing", None)
    if not listing:
        return ""
    return f"; it is output {target.output_key!r} of several ({listing}): choose another with --output-key"


def _shape_text(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


# ------------------------------------------------------------------------ task


def _choose_task(target: Target, shape: tuple[int, ...]) -> tuple[type[Task], str]:
    """The task class for an output of `shape` (with its batch dimension), and where it came from."""
    settings = target.settings
    per_image = shape[1:]
    inferred = infer_task(per_image)
    said = settings.task
    # A label to attack or a regression margin says what the shape alone cannot.
    if said is None and settings.label is not None and inferred is Multiclass and Multilabel.fits(per_image):
        return Multilabel, f"{settings.flag_text('label', settings.label)} (a (B, C) output with a label to attack)"
    if said is None and settings.margin is not None and inferred is Binary and Regression.fits(per_image):
        return Regression, f"{settings.flag_text('margin', settings.margin)} (one output with a regression margin)"
    if said is not None:
        if not TASKS[said].fits(per_image):
            found = inferred.name if inferred is not None else "no task"
            raise SiaError(
                f"{settings.flag_text('task', said)} does not fit the model's output shape {shape}, which is "
                f"{found} ({ACCEPTED_SHAPES}){_choose_other(target)}"
            )
        return TASKS[said], settings.sources.get("task", "option")
    if inferred is None:
        raise SiaError(
            f"model output has shape {shape} for a batch of {shape[0]}; accepted shapes: {ACCEPTED_SHAPES}"
            f"{_choose_other(target)}"
        )
    return inferred, "output shape"


def _settle_output_type(target: Target, task: Task) -> None:
    settings, sources = target.settings, target.settings.sources
    if not task.reads_output_type:
        settings.output = None
        sources.pop("output", None)
    elif settings.output is None:
        settings.output = "logits"
        if task.name != "multiclass":
            sources["output"] = "probe (values outside [0, 1])"


# ---------------------------------------------------------------------- checks


def _check_probe_output(target: Target, out: torch.Tensor) -> None:
    if not out.is_floating_point():
        raise SiaError(f"model is not differentiable: it returns {out.dtype} values{_choose_other(target)}")
    if out.grad_fn is None:
        raise SiaError(
            "model is not differentiable: its output carries no gradient to the input "
            f"(it detaches, thresholds or leaves autograd){_choose_other(target)}"
        )
    if not torch.isfinite(out).all():
        raise SiaError("model returns NaN or infinite values on a random probe image")


def _check_input_gradient(target: Target, out: torch.Tensor, images: torch.Tensor) -> None:
    # A random projection of the output: any differentiable model gives it a non-zero input gradient.
    projection = torch.randn_like(out)
    try:
        (gradient,) = torch.autograd.grad((out * projection).sum(), images)
    except Exception as exc:  # noqa: BLE001 - a missing derivative is the model's problem
        raise SiaError(f"model is not differentiable: backward pass failed: {first_line(exc)}") from None
    if not torch.isfinite(gradient).all():
        raise SiaError("model gives NaN or infinite input gradients on a random probe image")
    if not gradient.abs().sum() > 0:
        raise SiaError(
            "model is not differentiable: its output does not change with the input (zero gradient)"
            f"{_choose_other(target)}"
        )


# ---------------------------------------------------------------------- values


@torch.no_grad()
def _probe_values(target: Target, probe_size: int, out: torch.Tensor) -> torch.Tensor:
    """Raw outputs (N, *output_shape) of the probe batch and a dozen more images, finite rows only.

    A TorchScript model that ran at batch 2 may take no other batch (traced with two example
    images): when the dozen fail together they are run in pairs, and the target keeps that batch.
    """
    size, device = probe_size, target._mean.device
    constant = torch.stack([torch.full((3, size, size), value, device=device) for value in (-1.0, 1.0, 0.0)])
    images = torch.cat([torch.rand(VALUE_IMAGES, 3, size, size, device=device) * 2 - 1, constant])
    values = _run_values(target, images)
    if values is None and target.batch_range == (1, None):
        target.batch_range = (PROBE_BATCH, PROBE_BATCH)
        values = _run_values(target, images)
        if values is None:
            target.batch_range = (1, None)
        else:
            target.static_batch = PROBE_BATCH
            target.settings.sources["static_batch"] = f"probe (runs at batch {PROBE_BATCH} only)"
    parts = [out.detach().float()] + ([values.float()] if values is not None else [])
    values = torch.cat(parts)
    finite = torch.isfinite(values.reshape(len(values), -1)).all(dim=1)
    return values[finite]


def _constant_output_note(values: torch.Tensor) -> str | None:
    """A warning when the outputs of the probe images hardly differ (CONSTANT_OUTPUT_SPREAD)."""
    if len(values) < 2:
        return None
    flat = values.reshape(len(values), -1).double()
    spread = float((flat.max(dim=0).values - flat.min(dim=0).values).max())
    scale = float(flat.abs().max())
    if spread > CONSTANT_OUTPUT_SPREAD * max(scale, 1.0):
        return None
    return (f"the model's output hardly depends on its input: over {len(values)} probe images (random noise, "
            f"black, white, grey) it varies by at most {spread:.2g} (values up to {scale:.2g}): an untrained or "
            "collapsed head? Then rounding decides its predictions, and what an attack counts as a success")


def _run_values(target: Target, images: torch.Tensor) -> torch.Tensor | None:
    try:
        values = target._run_model(target.preprocess(images))
    except Exception:  # noqa: BLE001 - the probe batch ran; these images only add evidence
        return None
    if not isinstance(values, torch.Tensor) or values.dim() == 0 or values.shape[0] != len(images):
        return None
    if tuple(values.shape[1:]) != target.output_shape:
        return None
    return values
