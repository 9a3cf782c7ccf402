"""An insightface model pack (e.g. ``buffalo_l``) from a local directory: the production
alternative to the default face models.

insightface's pretrained models are licensed for **non-commercial research only**; whoever
points the service at a pack is responsible for that licence. Nothing is downloaded: the
directory must already hold the ONNX files. The detector (SCRFD: one input, 6 or 9 outputs) and
the recogniser (ArcFace: a 112x112 input, one embedding output) are recognised by their
signatures, as insightface itself does, and served as the ``face_detector`` and
``face_embedder`` roles.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from easyphoto.imaging.geometry import Face, align_face, clip_box
from easyphoto.rpc.errors import EngineUnavailable

from ..interface import Backend
from ..roles.description import RoleDescription
from ..shapes import AxisRange, Dim, TensorSpec, sym
from .mtcnn import nms
from .onnx_runner import OnnxRunner, onnx_role, signature

SCRFD_STRIDES = (8, 16, 32)
SCRFD_ANCHORS = 2
SCRFD_SIZE = 640
SCRFD_MEAN, SCRFD_STD = 127.5, 128.0
ARCFACE_MEAN, ARCFACE_STD = 127.5, 127.5
ARCFACE_SIZE = 112
# Not measured here (no real pack weights can be downloaded): the cosine commonly used to verify
# ArcFace r50/r100 pairs. Measure it on real weights before relying on it (engines/README.md).
ARCFACE_SAME_PERSON_THRESHOLD = 0.3


@dataclass
class PackFiles:
    detector: Path
    recognizer: Path


def find_pack_files(directory: Path) -> PackFiles:
    """Picks the detector and the recogniser among a pack's ONNX files by their signatures."""
    if not directory.is_dir():
        raise EngineUnavailable(f"insightface pack directory not found: {directory}")
    detector = recognizer = None
    for path in sorted(directory.glob("*.onnx")):
        inputs, outputs = signature(OnnxRunner(path))
        shape = inputs[0][2]
        if len(outputs) >= 6 and detector is None:
            detector = path
        elif len(outputs) == 1 and shape[2:] == [ARCFACE_SIZE, ARCFACE_SIZE] and recognizer is None:
            recognizer = path
    if detector is None or recognizer is None:
        raise EngineUnavailable(
            f"{directory} holds no {'SCRFD detector' if detector is None else 'ArcFace recogniser'} ONNX file"
        )
    return PackFiles(detector, recognizer)


def describe_pack_roles(files: PackFiles) -> dict[str, RoleDescription]:
    detector, recognizer = OnnxRunner(files.detector), OnnxRunner(files.recognizer)
    det_in, det_out = signature(detector)
    rec_in, rec_out = signature(recognizer)
    height, width, batch = sym("image_height"), sym("image_width"), sym("batch")
    levels = len(det_out) // 3
    strides = SCRFD_STRIDES[:levels]
    widths = (1, 4, 10)  # score, box distances, 5 landmark offsets
    outputs = []
    for group, width_k in enumerate(widths):
        for stride in strides:
            name = det_out[group * levels + strides.index(stride)][0]
            anchors = Dim(f"anchors_{stride}")
            shape = det_out[group * levels + strides.index(stride)][2]
            outputs.append(
                TensorSpec(name, "float32", (1, anchors, width_k) if len(shape) == 3 else (anchors, width_k))
            )
    derived = {
        f"anchors_{s}": (lambda v, s=s: (v["image_height"] // s) * (v["image_width"] // s) * SCRFD_ANCHORS)
        for s in strides
    }
    side = AxisRange(128, SCRFD_SIZE, 1920, multiple=32)
    embedding_size = int(rec_out[0][2][-1])
    return {
        "face_detector": onnx_role(
            "face_detector",
            detector,
            (TensorSpec(det_in[0][0], "float32", (1, 3, height, width)),),
            tuple(outputs),
            {"image_height": side, "image_width": side},
            derived,  # type: ignore[arg-type]
        ),
        "face_embedder": onnx_role(
            "face_embedder",
            recognizer,
            (TensorSpec(rec_in[0][0], "float32", (batch, 3, ARCFACE_SIZE, ARCFACE_SIZE)),),
            (TensorSpec(rec_out[0][0], "float32", (batch, embedding_size)),),
            {"batch": AxisRange(1, 8, 64)},
        ),
    }


def arcface_chip(image: np.ndarray, face: Face) -> np.ndarray:
    """The 112x112 ArcFace input (float, normalised) aligned on the face's 5 landmarks."""
    chip, _ = align_face(image, face.landmarks, ARCFACE_SIZE)
    return (chip.astype(np.float32) - ARCFACE_MEAN) / ARCFACE_STD


def _rows(tensor: torch.Tensor, spec: TensorSpec) -> np.ndarray:
    width = spec.shape[-1]
    assert isinstance(width, int)
    return tensor.float().cpu().numpy().reshape(-1, width)


class ScrfdDetector:
    """SCRFD decoding over the ``face_detector`` role: anchor centres plus predicted distances."""

    def __init__(self, backend: Backend, threshold: float = 0.5, nms_threshold: float = 0.4) -> None:
        self.backend = backend
        self.threshold = threshold
        self.nms_threshold = nms_threshold

    def __call__(self, image: np.ndarray) -> list[Face]:
        height, width = image.shape[:2]
        scale = SCRFD_SIZE / max(height, width)
        resized = cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))))
        canvas = np.zeros((SCRFD_SIZE, SCRFD_SIZE, 3), np.float32)
        canvas[: resized.shape[0], : resized.shape[1]] = resized
        blob = torch.from_numpy((canvas - SCRFD_MEAN) / SCRFD_STD).permute(2, 0, 1)[None].contiguous()
        role = self.backend.roles["face_detector"]
        out = self.backend.infer("face_detector", {role.inputs[0].name: blob})
        arrays = [_rows(out[spec.name], spec) for spec in role.outputs]
        levels = len(arrays) // 3
        boxes, scores, points = [], [], []
        for level, stride in enumerate(SCRFD_STRIDES[:levels]):
            grid = SCRFD_SIZE // stride
            ys, xs = np.mgrid[:grid, :grid]
            centers = np.repeat(np.stack([xs, ys], axis=-1).reshape(-1, 2) * stride, SCRFD_ANCHORS, axis=0)
            score = arrays[level][:, 0]
            keep = score >= self.threshold
            distances = arrays[levels + level][keep] * stride
            offsets = arrays[2 * levels + level][keep].reshape(-1, 5, 2) * stride
            c = centers[keep].astype(np.float32)
            boxes.append(np.concatenate([c - distances[:, :2], c + distances[:, 2:]], axis=1))
            points.append(c[:, None, :] + offsets)
            scores.append(score[keep])
        all_boxes = np.concatenate(boxes) / scale
        all_scores = np.concatenate(scores)
        all_points = np.concatenate(points) / scale
        faces = []
        for i in nms(all_boxes, all_scores, self.nms_threshold):
            box = clip_box(tuple(float(v) for v in all_boxes[i]), width, height)  # type: ignore[arg-type]
            if box[2] <= box[0] or box[3] <= box[1]:
                continue  # degenerate (negative distances) or entirely outside the image
            faces.append(Face(box, float(all_scores[i]), all_points[i].astype(np.float32)))
        return faces
