"""The ControlNets' input images as the reference makes them (``scripts/easyphoto_infer.py`` at
6c1f895): canny edges, the colour control, the tile control and an openpose-style skeleton drawn
from face landmarks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from .geometry import resize, round_to_multiple


def canny_control(image: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    edges = cv2.Canny(image, low, high)
    return np.repeat(edges[..., None], 3, axis=2)


# The colour control's working size and its down-sampling at 6c1f895 (L175; 24 before 9efad36).
COLOR_CONTROL_SIDE, COLOR_BLUR_RATIO = 1024, 1.0


def color_control(image: np.ndarray, blur_ratio: float = COLOR_BLUR_RATIO) -> np.ndarray:
    """The colour ControlNet's input (L164-204): the image at a 1024 px short side (sides rounded
    to 64, L71-88), shrunk by ``blur_ratio`` (bicubic), enlarged again (nearest) and brought back
    to its size (bicubic). At the reference's ratio of 1 that is the image itself, resampled."""
    height, width = image.shape[:2]
    scale = COLOR_CONTROL_SIDE / min(height, width)
    large_w, large_h = round_to_multiple(width * scale, 64), round_to_multiple(height * scale, 64)
    large = resize(image, large_w, large_h)
    small_size = (max(1, int(large_w // blur_ratio)), max(1, int(large_h // blur_ratio)))
    small = cv2.resize(large, small_size, interpolation=cv2.INTER_CUBIC)
    large = cv2.resize(small, (large_w, large_h), interpolation=cv2.INTER_NEAREST)
    return cv2.resize(large, (width, height), interpolation=cv2.INTER_CUBIC)


def tile_control(image: np.ndarray) -> np.ndarray:
    """The tile ControlNet's input (L206-217): the reference runs sd-webui-controlnet's
    ``tile_resample`` at a down-sampling rate (``threshold_a``) of 1, which returns the image."""
    return image.copy()


# OpenPose's limb colours, in its drawing order.
POSE_COLORS = [
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
]  # fmt: skip


# (from, to) keypoint pairs: 0 nose, 1 neck, 2 right shoulder, 5 left shoulder, 14/15 eyes, 16/17 ears.
POSE_LIMBS = [(1, 2), (1, 5), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17)]


def body_keypoints(landmarks: np.ndarray) -> dict[int, np.ndarray]:
    """OpenPose body keypoints estimated from 5 face landmarks (nose, eyes, ears, neck, shoulders)."""
    left_eye, right_eye, nose, mouth_l, mouth_r = (np.asarray(p, np.float32) for p in landmarks)
    eye_vec = right_eye - left_eye
    eye_dist = float(np.hypot(*eye_vec)) or 1.0
    across = eye_vec / eye_dist
    down = np.array([-across[1], across[0]], np.float32)
    chin = (mouth_l + mouth_r) / 2 + down * 0.6 * eye_dist
    neck = chin + down * 0.9 * eye_dist
    # The subject's right eye is on the image's left (landmark 0), as OpenPose labels it.
    return {
        0: nose,
        1: neck,
        2: neck - across * 1.9 * eye_dist,
        5: neck + across * 1.9 * eye_dist,
        14: left_eye,
        15: right_eye,
        16: left_eye - across * 0.75 * eye_dist,
        17: right_eye + across * 0.75 * eye_dist,
    }


def draw_pose(shape: tuple[int, int], faces_landmarks: list[np.ndarray]) -> np.ndarray:
    """The openpose ControlNet's input: limbs and keypoints on black, one skeleton per face."""
    height, width = shape
    canvas = np.zeros((height, width, 3), np.uint8)
    thickness = max(2, round(min(height, width) / 128))
    for landmarks in faces_landmarks:
        points = body_keypoints(landmarks)
        for index, (a, b) in enumerate(POSE_LIMBS):
            pa, pb = points[a], points[b]
            cv2.line(canvas, _pt(pa), _pt(pb), POSE_COLORS[index], thickness * 2, cv2.LINE_AA)
        for key, point in points.items():
            cv2.circle(
                canvas, _pt(point), thickness * 2, POSE_COLORS[key % len(POSE_COLORS)], -1, cv2.LINE_AA
            )
        for point in landmarks:
            cv2.circle(canvas, _pt(point), thickness, (255, 255, 255), -1, cv2.LINE_AA)
    return canvas


def _pt(point: np.ndarray) -> tuple[int, int]:
    return round(float(point[0])), round(float(point[1]))


@dataclass(frozen=True)
class ControlSource:
    """What a pass's control images are made from: the image it repaints, the 5 landmarks of each
    face the pose skeleton shows, and the canny thresholds."""

    image: np.ndarray
    landmarks: list[np.ndarray]
    canny_low: int = 100
    canny_high: int = 200


# How each ControlNet kind's input image is made.
CONTROL_IMAGES: dict[str, Callable[[ControlSource], np.ndarray]] = {
    "canny": lambda source: canny_control(source.image, source.canny_low, source.canny_high),
    "openpose": lambda source: draw_pose(source.image.shape[:2], source.landmarks),
    "color": lambda source: color_control(source.image),
    "tile": lambda source: tile_control(source.image),
}
