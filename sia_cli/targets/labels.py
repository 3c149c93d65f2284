"""Label files (``--labels``): a CSV of reference labels, one image a row.

The layout follows the task (:meth:`Task.parse_label`): ``file,label`` (binary 0/1 or a class
name, multiclass index or class name, multilabel 0/1 for the label under attack),
``file,value`` (regression) or ``file,x1,y1,x2,y2,...`` (keypoints in heatmap pixels,
landmarks in input pixels). A header line is optional.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import torch

from sia_cli.errors import SiaError
from sia_cli.targets.formats import first_line
from sia_cli.targets.tasks import TASKS, Task
from sia_cli.targets.tasks.base import _is_number


def read_labels(
    path: str | Path, kind: str | Task | type[Task], class_names: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """Read a labels CSV for task `kind` (a name, a task or its class).

    Returns file name -> label tensor of one image: a scalar (float for binary, multilabel
    and regression, long for multiclass) or (K, 2) float points.
    """
    path = Path(path)
    task = _task_class(kind)
    rows = _csv_rows(path)
    if rows and _is_header(rows[0][1], class_names):
        rows = rows[1:]
    if not rows:
        raise SiaError(f"{path}: no labels found")
    labels: dict[str, torch.Tensor] = {}
    for line, fields in rows:
        where = f"{path}, line {line}"
        name = fields[0]
        if not name:
            raise SiaError(f"{where}: empty file name")
        if name in labels:
            raise SiaError(f"{where}: {name} is listed twice")
        labels[name] = task.parse_label(fields[1:], where, class_names)
        first = next(iter(labels.values()))
        if labels[name].shape != first.shape:
            raise SiaError(f"{where}: {labels[name].shape[0]} keypoints, the first row has {first.shape[0]}")
    return labels


def _task_class(kind: str | Task | type[Task]) -> type[Task]:
    if isinstance(kind, Task):
        return type(kind)
    if isinstance(kind, type) and issubclass(kind, Task):
        return kind
    if kind not in TASKS:
        raise SiaError(f"unknown task kind {kind!r}; expected one of {', '.join(TASKS)}")
    return TASKS[kind]


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
        raise SiaError(f"{path} is not a readable CSV file: {first_line(exc)}") from None


def _is_header(fields: list[str], class_names: Sequence[str] | None) -> bool:
    if len(fields) < 2:
        return False
    return not _is_number(fields[1]) and fields[1] not in (class_names or ())
