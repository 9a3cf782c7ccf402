"""The ControlNets' input images as the reference makes them (``scripts/easyphoto_infer.py`` at
6c1f895): canny edges, the colour control, the tile control and an openpose-style skeleton drawn
from face landmarks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

from .geometry import eye_axes, resize, round_to_multiple, similarity_transform, transform_points


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
    if small_size != (large_w, large_h):  # at the same size both resizes copy the image
        small = cv2.resize(large, small_size, interpolation=cv2.INTER_CUBIC)
        large = cv2.resize(small, (large_w, large_h), interpolation=cv2.INTER_NEAREST)
    return cv2.resize(large, (width, height), interpolation=cv2.INTER_CUBIC)


def tile_control(image: np.ndarray) -> np.ndarray:
    """The tile ControlNet's input (L206-217): the reference runs sd-webui-controlnet's
    ``tile_resample`` at a down-sampling rate (``threshold_a``) of 1, which returns the image."""
    return image.copy()


# OpenPose's 18 body keypoints: 0 nose, 1 neck, 2-4 right arm, 5-7 left arm, 8-10 right leg,
# 11-13 left leg, 14/15 right/left eye, 16/17 right/left ear. Its limbs, in its drawing order
# (each limb's colour is the one at its index), and its keypoint colours.
POSE_LIMBS = [
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12),
    (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
]  # fmt: skip
POSE_COLORS = [
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
]  # fmt: skip
BODY_POINTS = 18
# A hand's 21 points (0 the wrist, then 4 per finger) and its edges, coloured around the hue circle.
HAND_EDGES = [
    (4 * finger + joint if joint else 0, 4 * finger + joint + 1) for finger in range(5) for joint in range(4)
]


@dataclass(frozen=True)
class Pose:
    """One person's keypoints in OpenPose's layout, in pixels, NaN where not seen: the 18 body
    points, each hand's 21 points, and face points (68 from a whole-body model, or the 5
    landmarks)."""

    body: np.ndarray
    hands: tuple[np.ndarray, ...] = ()
    face: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))

    @classmethod
    def from_landmarks(cls, landmarks: np.ndarray) -> Pose:
        """The body keypoints a face's 5 landmarks imply (nose, eyes, ears, neck, shoulders)."""
        body = np.full((BODY_POINTS, 2), np.nan, np.float32)
        for index, point in body_keypoints(landmarks).items():
            body[index] = point
        return cls(body, face=np.asarray(landmarks, np.float32))

    @classmethod
    def fitted(cls, landmarks: np.ndarray, onto: np.ndarray) -> Pose:
        """The pose of a face's 5 ``landmarks`` once moved onto another face's (``onto``) by the
        similarity of the two: a user's face standing where a template's is."""
        return cls.from_landmarks(transform_points(similarity_transform(landmarks, onto), landmarks))


def body_keypoints(landmarks: np.ndarray) -> dict[int, np.ndarray]:
    """OpenPose body keypoints estimated from 5 face landmarks (nose, eyes, ears, neck, shoulders)."""
    left_eye, right_eye, nose, mouth_l, mouth_r = (np.asarray(p, np.float32) for p in landmarks)
    eye_dist, across, down = eye_axes(landmarks)
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


def draw_pose(shape: tuple[int, int], poses: list[Pose]) -> np.ndarray:
    """The openpose ControlNet's input (openpose_full's drawing): body limbs and keypoints in
    OpenPose's colours, hand edges around the hue circle with blue joints, face points white; on
    black, one skeleton per person, leaving out what was not seen."""
    height, width = shape
    canvas = np.zeros((height, width, 3), np.uint8)
    thickness = max(2, round(min(height, width) / 128))
    for pose in poses:
        for index, (a, b) in enumerate(POSE_LIMBS):
            _line(canvas, pose.body[a], pose.body[b], POSE_COLORS[index], thickness * 2)
        for index, point in enumerate(pose.body):
            _dot(canvas, point, thickness * 2, POSE_COLORS[index])
        for hand in pose.hands:
            for index, (a, b) in enumerate(HAND_EDGES):
                _line(canvas, hand[a], hand[b], _hue(index / len(HAND_EDGES)), max(1, thickness // 2 + 1))
            for point in hand:
                _dot(canvas, point, thickness, (0, 0, 255))
        for point in pose.face:
            _dot(canvas, point, thickness, (255, 255, 255))
    return canvas


def _hue(fraction: float) -> tuple[int, int, int]:
    hsv = np.array([[[round(fraction * 179), 255, 255]]], np.uint8)
    r, g, b = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0]
    return int(r), int(g), int(b)


def _line(canvas: np.ndarray, a: np.ndarray, b: np.ndarray, colour: tuple[int, int, int], width: int) -> None:
    if np.isfinite(a).all() and np.isfinite(b).all():
        cv2.line(canvas, _pt(a), _pt(b), colour, width, cv2.LINE_AA)


def _dot(canvas: np.ndarray, point: np.ndarray, radius: int, colour: tuple[int, int, int]) -> None:
    if np.isfinite(point).all():
        cv2.circle(canvas, _pt(point), radius, colour, -1, cv2.LINE_AA)


def _pt(point: np.ndarray) -> tuple[int, int]:
    return round(float(point[0])), round(float(point[1]))


@dataclass(frozen=True)
class ControlSource:
    """What a pass's control images are made from: the image it repaints, the pose of each person
    the openpose control shows, and the canny thresholds."""

    image: np.ndarray
    poses: list[Pose]
    canny_low: int = 100
    canny_high: int = 200


# How each ControlNet kind's input image is made.
CONTROL_IMAGES: dict[str, Callable[[ControlSource], np.ndarray]] = {
    "canny": lambda source: canny_control(source.image, source.canny_low, source.canny_high),
    "openpose": lambda source: draw_pose(source.image.shape[:2], source.poses),
    "color": lambda source: color_control(source.image),
    "tile": lambda source: tile_control(source.image),
}
