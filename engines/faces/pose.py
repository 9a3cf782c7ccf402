"""Whole-body keypoints for the openpose control from an ONNX model with DWPose's / RTMPose's
signature, when the operator gives one (the default draws the pose from the 5 face landmarks).

The signature: a 1x3xHxW person crop in (384x288 for DWPose's ``dw-ll_ucoco_384``; RGB, ImageNet
mean and spread), SimCC logits out: ``simcc_x`` 1xKx(W·r) and ``simcc_y`` 1xKx(H·r), with K = 133
COCO-WholeBody points (or 17 body points) and r the split ratio (2 for DWPose). The crop is the
person box grown 1.25x at the model's aspect ratio; a point is where both of its logits peak,
seen when the smaller peak exceeds 0.3 (as DWPose and rtmlib decode it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from easyphoto.imaging.controls import BODY_POINTS, Pose
from easyphoto.imaging.geometry import Box

from .onnx_runner import OnnxRunner

BOX_PADDING = 1.25
SEEN_SCORE = 0.3
IMAGENET_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
IMAGENET_STD = np.array([58.395, 57.12, 57.375], np.float32)
WHOLE_BODY_POINTS, COCO_BODY_POINTS = 133, 17
# OpenPose's body points from COCO's (-1: the neck, the shoulders' mean, seen when both are).
OPENPOSE_FROM_COCO = [0, -1, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3]
# COCO-WholeBody: body 0-16, feet 17-22, face 23-90, left hand 91-111, right hand 112-132.
FACE_POINTS = slice(23, 91)
HANDS = (slice(91, 112), slice(112, 133))


class PoseEstimator(Protocol):
    """The pose of the person inside ``box`` of ``image``."""

    def __call__(self, image: np.ndarray, box: Box) -> Pose: ...


class OnnxPoseEstimator:
    def __init__(self, path: Path) -> None:
        self.runner = OnnxRunner(path)
        inputs, outputs = self.runner.session.get_inputs(), self.runner.session.get_outputs()
        shape = inputs[0].shape if len(inputs) == 1 else []
        if len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:]) or len(outputs) != 2:
            raise ValueError(
                f"{path} takes {[i.shape for i in inputs]} and gives {len(outputs)} outputs; a pose"
                " model takes one 1x3xHxW crop and gives SimCC x and y logits"
            )
        self.height, self.width = int(shape[2]), int(shape[3])
        by_name = {o.name: o for o in outputs}
        x_out, y_out = (by_name["simcc_x"], by_name["simcc_y"]) if "simcc_x" in by_name else outputs
        self.x_name, self.y_name = x_out.name, y_out.name
        points, x_bins = x_out.shape[1], x_out.shape[2]
        if points not in (WHOLE_BODY_POINTS, COCO_BODY_POINTS) or not isinstance(x_bins, int):
            raise ValueError(f"{path} gives {x_out.shape}; SimCC logits are 1xKx(W·r), K 133 or 17")
        self.split_ratio = x_bins / self.width

    def __call__(self, image: np.ndarray, box: Box) -> Pose:
        scale, center = self._crop_transform(box)
        crop = cv2.warpAffine(
            image,
            np.array(
                [
                    [scale, 0, self.width / 2 - scale * center[0]],
                    [0, scale, self.height / 2 - scale * center[1]],
                ]
            ),
            (self.width, self.height),
            flags=cv2.INTER_LINEAR,
        )
        blob = ((crop.astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)[None]
        simcc_x, simcc_y = self.runner.session.run(
            [self.x_name, self.y_name], {self.runner.input_names[0]: blob}
        )
        points, scores = decode_simcc(np.asarray(simcc_x)[0], np.asarray(simcc_y)[0], self.split_ratio)
        points = (points - np.array([self.width / 2, self.height / 2])) / scale + center
        return openpose_from_coco(points, scores > SEEN_SCORE)

    def _crop_transform(self, box: Box) -> tuple[float, np.ndarray]:
        """The pixels of the model's crop per image pixel, and the crop's centre in the image: the
        box grown by 1.25 and widened or heightened to the model's aspect ratio."""
        x0, y0, x1, y1 = box
        width, height = (x1 - x0) * BOX_PADDING, (y1 - y0) * BOX_PADDING
        aspect = self.width / self.height
        width, height = max(width, height * aspect), max(height, width / aspect)
        return self.width / width, np.array([(x0 + x1) / 2, (y0 + y1) / 2])


def decode_simcc(
    simcc_x: np.ndarray, simcc_y: np.ndarray, split_ratio: float
) -> tuple[np.ndarray, np.ndarray]:
    """Each point where its x and y logits peak (in crop pixels), scored by the smaller peak."""
    points = np.stack([simcc_x.argmax(axis=1), simcc_y.argmax(axis=1)], axis=1) / split_ratio
    return points.astype(np.float32), np.minimum(simcc_x.max(axis=1), simcc_y.max(axis=1))


def openpose_from_coco(points: np.ndarray, seen: np.ndarray) -> Pose:
    """COCO (-WholeBody) points in OpenPose's layout; unseen points are NaN."""
    points = np.where(seen[:, None], points, np.nan).astype(np.float32)
    body = np.full((BODY_POINTS, 2), np.nan, np.float32)
    for index, coco in enumerate(OPENPOSE_FROM_COCO):
        body[index] = points[coco] if coco >= 0 else (points[5] + points[6]) / 2
    if len(points) < WHOLE_BODY_POINTS:
        return Pose(body)
    return Pose(body, tuple(points[part] for part in HANDS), points[FACE_POINTS])
