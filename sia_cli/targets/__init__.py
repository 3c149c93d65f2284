"""The model under attack ("target"): loading, preprocessing and everything task-specific.

Two file formats are accepted (:mod:`sia_cli.targets.formats`):

* TorchScript (``torch.jit.save``). The model is switched to eval mode on load. A
  ``sia.yaml`` stored in the file's extra files can carry its settings::

      torch.jit.save(scripted, "model.pt", _extra_files={"sia.yaml": "input_size: 224\\n..."})

* ``torch.export`` archives (``torch.export.save``, usually ``.pt2``). An exported
  program cannot be switched to eval mode after the fact: export it from a model
  already in eval mode (``model.eval()`` before ``torch.export.export``); archives
  whose graph still has training-mode batch norm or dropout are refused. Unless it
  was exported with a dynamic batch dimension, an exported program only accepts the
  batch size used at export: the target then pads smaller batches up to that size
  and splits larger ones into chunks, which costs compute but gives the same
  results. ``torch.export.save(..., extra_files={"sia.yaml": ...})`` is read too. An
  exported graph taking (B, 1, H, W) input is a grayscale model (``channels: 1``).

AOTInductor packages (``aoti_compile_and_package``) are compiled code without a
differentiable graph and are refused.

Loading a model runs code stored in the file (TorchScript code, or the exported
graph): treat model files like programs and load only files you trust.

Settings (:mod:`sia_cli.targets.settings`) come from options, ``sia.yaml``, the export graph
or defaults. Task kinds (:mod:`sia_cli.targets.tasks`): (B,) or (B, 1) binary, (B, C >= 2)
multiclass, (B, K, H, W) keypoint heatmaps and (B, K, 2) landmarks follow from the output
shape; multilabel ((B, C), with ``--label``), landmarks laid out (B, 2K) and regression
((B,) or (B, 1)) need ``--task``. Readings the shape does not settle are recorded in
``Target.assumptions``. The probe (:mod:`sia_cli.targets.probe`) checks all of it on a few
images before any attack runs.
"""

from sia_cli.runs.files import file_sha256
from sia_cli.targets.labels import read_labels
from sia_cli.targets.load import load_target
from sia_cli.targets.model import Target
from sia_cli.targets.tasks import (
    ACCEPTED_SHAPES,
    HEATMAP_SIGMA,
    TASKS,
    Task,
    argmax_coordinates,
    gaussian_heatmaps,
    normalised_mean_error,
)

__all__ = [
    "ACCEPTED_SHAPES", "HEATMAP_SIGMA", "TASKS", "Target", "Task", "argmax_coordinates", "file_sha256",
    "gaussian_heatmaps", "load_target", "normalised_mean_error", "read_labels",
]
