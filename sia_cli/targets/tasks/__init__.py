"""Task kinds: what a model's output means, and so what the attack maximises and what success is.

One class per kind, registered in :data:`TASKS` (name -> class). A task object is made by
the probe once the output shape is known; :class:`sia_cli.targets.Target` delegates every
task-specific question to it. Adding a kind is one new module beside these, with its class,
registered below (plus its tests): nothing else switches on the kind.

Every method takes the model's raw output ``out`` for a batch, as ``Target.forward`` returns
it, and a reference ``ref`` as :meth:`Task.reference` (or :meth:`Task.reference_from_labels`)
made it.
"""

from __future__ import annotations

from sia_cli.targets.tasks.base import (
    DEFAULT_MARGIN,
    HEATMAP_SIGMA,
    PROBABILITY_EPS,
    Task,
    _is_number,
    argmax_coordinates,
    gaussian_heatmaps,
    normalised_mean_error,
)
from sia_cli.targets.tasks.binary import Binary, Multilabel
from sia_cli.targets.tasks.multiclass import Multiclass
from sia_cli.targets.tasks.points import Keypoints, Landmarks
from sia_cli.targets.tasks.regression import Regression

TASKS: dict[str, type[Task]] = {
    task.name: task for task in (Binary, Multiclass, Multilabel, Keypoints, Landmarks, Regression)
}
ACCEPTED_SHAPES = ", ".join(task.shapes for task in TASKS.values())


def infer_task(shape: tuple[int, ...]) -> type[Task] | None:
    """The kind a per-image output shape is read as without --task (first fit in TASKS order)."""
    for task in TASKS.values():
        if task.inferred and task.infers(shape):
            return task
    return None


__all__ = [
    "ACCEPTED_SHAPES", "DEFAULT_MARGIN", "HEATMAP_SIGMA", "PROBABILITY_EPS", "TASKS", "Binary", "Keypoints",
    "Landmarks", "Multiclass", "Multilabel", "Regression", "Task", "_is_number", "argmax_coordinates",
    "gaussian_heatmaps", "infer_task", "normalised_mean_error",
]
