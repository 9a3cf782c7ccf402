"""Face and box geometry: boxes (x0, y0, x1, y1), a detected :class:`Face` with its 5 landmarks
(left eye, right eye, nose, left mouth corner, right mouth corner, in image pixels), similarity
alignment to the ArcFace template, roll, crop boxes, model-friendly sizes and resampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np


def resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    shrinking = width * height < image.shape[0] * image.shape[1]
    return cv2.resize(
        image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LANCZOS4
    )


def round_to_multiple(value: float, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


Box = tuple[float, float, float, float]


# ArcFace's 112x112 alignment template (the standard 5-point positions of insightface's packs).
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    np.float32,
)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity (rotation, uniform scale, translation) taking ``src`` points to ``dst``
    in the least-squares sense (Umeyama, reflections excluded)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    covariance = dst_c.T @ src_c / len(src)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1
    rotation = u @ np.diag(sign) @ vt
    scale = (singular * sign).sum() / src_c.var(axis=0).sum()
    translation = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, translation[:, None]]).astype(np.float32)


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return (np.asarray(points, np.float32) @ matrix[:, :2].T + matrix[:, 2]).astype(np.float32)


def eye_axes(landmarks: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """The face's frame from its eyes (landmarks 0 and 1): the eye distance, the unit vector from
    the left eye to the right one, and the unit vector down the face (across turned 90 degrees)."""
    left_eye, right_eye = (np.asarray(p, np.float32) for p in landmarks[:2])
    eye_vec = right_eye - left_eye
    eye_dist = float(np.hypot(*eye_vec)) or 1.0
    across = eye_vec / eye_dist
    return eye_dist, across, np.array([-across[1], across[0]], np.float32)


def arcface_template(size: int) -> np.ndarray:
    """The 5-point template of a ``size``-pixel aligned crop as insightface's ``norm_crop`` places
    it: the 112 template scaled for multiples of 112; for multiples of 128 (its swapper's 128 px
    crops, 512 px enhancer crops) scaled by size / 128 and moved right by 8 px per 128."""
    if size % 112 == 0:
        return ARCFACE_TEMPLATE_112 * (size / 112.0)
    if size % 128 == 0:
        return ARCFACE_TEMPLATE_112 * (size / 128.0) + np.array([8.0 * size / 128.0, 0.0], np.float32)
    raise ValueError(f"aligned crops are 112 or 128 px multiples, not {size}")


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> tuple[np.ndarray, np.ndarray]:
    """The face warped onto :func:`arcface_template` of ``size``; returns the crop and the 2x3
    matrix from image to crop."""
    matrix = similarity_transform(landmarks, arcface_template(size))
    crop = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return crop, matrix


def roll_angle(landmarks: np.ndarray) -> float:
    """Angle of the eye line in degrees (positive when the right eye is lower in the image)."""
    (lx, ly), (rx, ry) = landmarks[0], landmarks[1]
    return math.degrees(math.atan2(ry - ly, rx - lx))


def roll_score(landmarks: np.ndarray) -> float:
    """(90 - |roll|) / 90: 1 for a level face, 0 for one on its side (MISSION.md §1.3)."""
    return (90.0 - min(abs(roll_angle(landmarks)), 90.0)) / 90.0


def clip_box(box: Box, width: int, height: int) -> Box:
    x0, y0, x1, y1 = box
    return (max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1))


def grow_box(box: Box, scale: float, width: int, height: int) -> Box:
    """The box scaled about its centre (3x for crops), clipped to the image."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half_w, half_h = (x1 - x0) * scale / 2, (y1 - y0) * scale / 2
    return clip_box((cx - half_w, cy - half_h, cx + half_w, cy + half_h), width, height)


def tighten_box(
    box: Box, width: int, height: int, x: float = 0.30, top: float = 0.15, bottom: float = 0.15
) -> Box:
    """The rectangle of a training photo kept around its re-detected face: x0 - x*w, x1 + x*w, and
    both horizontal edges moved down, y0 + top*h (below the hairline), y1 + bottom*h (reference
    ``scripts/preprocess.py`` L231-234 at 6c1f895)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    return clip_box((x0 - x * w, y0 + top * h, x1 + x * w, y1 + bottom * h), width, height)


def int_box(box: Box) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    return math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)


def fit_size(
    width: int, height: int, short_side: int, multiple: int, max_side: int | None = None
) -> tuple[int, int]:
    """(width, height) with the short side at ``short_side`` (less where the long side would pass
    ``max_side``), both sides multiples of ``multiple``, the aspect ratio kept as near as that allows."""
    scale = short_side / min(width, height)
    if max_side is not None:
        scale = min(scale, max_side / max(width, height))
    ceiling = max_side // multiple * multiple if max_side is not None else None

    def side(length: int) -> int:
        snapped = max(multiple, round(length * scale / multiple) * multiple)
        return min(snapped, ceiling) if ceiling is not None else snapped

    return side(width), side(height)


@dataclass(frozen=True)
class Face:
    """A face in pixels of the image it was found in: box (x0, y0, x1, y1), detector score and
    5 landmarks (left eye, right eye, nose, left mouth corner, right mouth corner) as (x, y)."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return self.width * self.height

    @property
    def center(self) -> np.ndarray:
        return np.array([(self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2])

    def shifted(self, dx: float, dy: float) -> Face:
        """The same face in a crop whose origin is at (-dx, -dy) of this image."""
        x0, y0, x1, y1 = self.box
        return Face((x0 + dx, y0 + dy, x1 + dx, y1 + dy), self.score, self.landmarks + np.array([dx, dy]))

    def scaled(self, factor: float) -> Face:
        """The same face in this image resized by ``factor``."""
        return Face(tuple(v * factor for v in self.box), self.score, self.landmarks * factor)  # type: ignore[arg-type]

    def in_crop(self, box: tuple[int, int, int, int], size: tuple[int, int]) -> Face:
        """The same face in ``box`` of this image resized to ``size`` (width, height): the box's
        edges scale with it, the landmarks' pixel centres move as ``cv2.resize`` moves them."""
        x0, y0, x1, y1 = box
        scale = np.array([size[0] / (x1 - x0), size[1] / (y1 - y0)])
        corners = (np.array(self.box, np.float64).reshape(2, 2) - np.array([x0, y0])) * scale
        landmarks = (self.landmarks - np.array([x0, y0]) + 0.5) * scale - 0.5
        return Face(tuple(float(v) for v in corners.ravel()), self.score, landmarks.astype(np.float32))  # type: ignore[arg-type]

    def to_json(self) -> dict[str, object]:
        return {
            "box": [round(float(v), 1) for v in self.box],
            "score": round(float(self.score), 4),
            "landmarks": [[round(float(x), 1), round(float(y), 1)] for x, y in self.landmarks],
        }

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> Face:
        x0, y0, x1, y1 = (float(v) for v in values["box"])
        return cls((x0, y0, x1, y1), float(values["score"]), np.array(values["landmarks"], np.float64))


def nearest_face(faces: list[Face], expected: Face, within: float = math.inf) -> Face:
    """The face of ``faces`` whose centre is nearest ``expected``'s, closer than ``within``;
    ``expected`` itself when there is none (a re-detection that found nothing there)."""
    distances = [(float(np.linalg.norm(f.center - expected.center)), f) for f in faces]
    near = [(distance, face) for distance, face in distances if distance < within]
    return min(near, key=lambda pair: pair[0])[1] if near else expected
