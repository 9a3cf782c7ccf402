"""Masks: face parts from 5-landmark geometry (the default when no face-parsing model is given),
the passes' inpaint and ring masks, border rings and feathering.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from .geometry import eye_axes


def ellipse_mask(height: int, width: int, box: tuple[float, float, float, float]) -> np.ndarray:
    """A filled ellipse inscribed in ``box`` (x0, y0, x1, y1) as an HxW uint8 mask (255 inside)."""
    x0, y0, x1, y1 = box
    mask = np.zeros((height, width), np.uint8)
    center = (round((x0 + x1) / 2), round((y0 + y1) / 2))
    axes = (round((x1 - x0) / 2), round((y1 - y0) / 2))
    cv2.ellipse(mask, center, axes, 0, 0, 360, 255, thickness=-1)
    return mask


FACE_PARTS = ("skin", "brows", "eyes", "nose", "mouth", "lips")
# The brows of the landmark geometry, in eye distances: centred this far above each eye, this half-high.
BROW_RISE, BROW_HALF_HEIGHT = 0.32, 0.09


def _ellipse(mask: np.ndarray, center: np.ndarray, axes: tuple[float, float], angle: float) -> None:
    cv2.ellipse(
        mask,
        (round(float(center[0])), round(float(center[1]))),
        (max(1, round(axes[0])), max(1, round(axes[1]))),
        angle,
        0,
        360,
        255,
        thickness=-1,
    )


def face_part_masks(shape: tuple[int, int], landmarks: np.ndarray) -> dict[str, np.ndarray]:
    """Face-part masks estimated from 5 landmarks (the default when no face-parsing model is given).

    Sizes are proportional to the eye distance and the parts follow the face's roll.
    """
    height, width = shape
    left_eye, right_eye, nose, mouth_l, mouth_r = (np.asarray(p, np.float32) for p in landmarks)
    eye_dist, across, down = eye_axes(landmarks)
    angle = math.degrees(math.atan2(across[1], across[0]))
    eye_mid, mouth_mid = (left_eye + right_eye) / 2, (mouth_l + mouth_r) / 2
    face_len = float(np.dot(mouth_mid - eye_mid, down)) or eye_dist
    masks = {part: np.zeros((height, width), np.uint8) for part in FACE_PARTS}
    for eye in (left_eye, right_eye):
        _ellipse(masks["eyes"], eye, (0.28 * eye_dist, 0.14 * eye_dist), angle)
        brow = eye - down * BROW_RISE * eye_dist
        _ellipse(masks["brows"], brow, (0.36 * eye_dist, BROW_HALF_HEIGHT * eye_dist), angle)
    nose_top = eye_mid + down * 0.15 * eye_dist
    wing = across * 0.22 * eye_dist
    nose_poly = np.stack(
        [nose_top - wing * 0.5, nose_top + wing * 0.5, nose + wing, nose + down * 0.1 * eye_dist, nose - wing]
    )
    cv2.fillPoly(masks["nose"], [np.round(nose_poly).astype(np.int32)], 255)
    mouth_w = float(np.hypot(*(mouth_r - mouth_l)))
    _ellipse(masks["lips"], mouth_mid, (0.6 * mouth_w, 0.2 * mouth_w), angle)
    _ellipse(masks["mouth"], mouth_mid, (0.45 * mouth_w, 0.12 * mouth_w), angle)
    skin_center = eye_mid + down * 0.45 * face_len
    _ellipse(masks["skin"], skin_center, (1.05 * eye_dist, 1.25 * face_len + 0.3 * eye_dist), angle)
    return masks


def below_brows(shape: tuple[int, int], landmarks: np.ndarray) -> np.ndarray:
    """Everything below the top of the landmark geometry's brows (a line along the eye line): what
    5 landmarks can say is face rather than hair or a fringe."""
    height, width = shape
    eye_dist, _, down = eye_axes(landmarks)
    eye_mid = np.asarray(landmarks[:2], np.float32).mean(axis=0)
    top = eye_mid - down * (BROW_RISE + BROW_HALF_HEIGHT) * eye_dist
    across_x = (np.arange(width, dtype=np.float32) - top[0]) * down[0]
    along_y = (np.arange(height, dtype=np.float32) - top[1]) * down[1]
    return ((along_y[:, None] + across_x[None, :]) >= 0).astype(np.uint8) * 255


def only_parts(parts: dict[str, np.ndarray], names: tuple[str, ...]) -> np.ndarray:
    """The ``names`` parts and none of the others (the landmark geometry's skin covers the mouth:
    leaving the mouth out must cut it from the skin)."""
    mask = union([parts[p] for p in names])
    others = [parts[p] for p in parts if p not in names]
    return cv2.subtract(mask, union(others)) if others else mask


def union(masks: list[np.ndarray]) -> np.ndarray:
    return np.maximum.reduce(masks) if masks else np.zeros((0, 0), np.uint8)


# The reference sizes its fixed kernels in pixels of a template crop with a 512 px short side
# (easyphoto_infer.py L1318-1343); they scale with the crop here.
REFERENCE_CROP_SIDE = 512


def reference_pixels(pixels: int, shape: tuple[int, ...]) -> int:
    """A kernel side the reference gives in pixels at its 512 px crop, at a crop of ``shape``."""
    return max(1, round(pixels * min(shape[:2]) / REFERENCE_CROP_SIDE))


def disc(radius: int) -> np.ndarray:
    """A filled disc of ``radius`` as a morphology kernel (side 2 * radius + 1)."""
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _square(side: int) -> np.ndarray:
    return np.ones((max(1, side), max(1, side)), np.uint8)


def inpaint_mask(parts: dict[str, np.ndarray], face_width: float) -> np.ndarray:
    """The first pass's mask: every face part, closed and then dilated with a square kernel of
    side ``face_width // 10`` (L1470-1478; the width of the 1.1x face box)."""
    kernel = _square(int(face_width // 10))
    mask = union([parts[p] for p in FACE_PARTS])
    return cv2.dilate(cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel), kernel)


def ring_mask(parts: dict[str, np.ndarray]) -> np.ndarray:
    """The second pass's mask (L1697-1714): the face parts dilated by a 32 px square less the
    same eroded by a 16 px square, a ring across the border where the first pass, the fusion and
    the colour shift end, plus the eyes and the lips."""
    face = union([parts[p] for p in FACE_PARTS])
    grown = cv2.dilate(face, _square(reference_pixels(32, face.shape)))
    shrunk = cv2.erode(face, _square(reference_pixels(16, face.shape)))
    return union([cv2.subtract(grown, shrunk), parts["eyes"], parts["lips"]])


def border_ring(mask: np.ndarray, radius: int) -> np.ndarray:
    """The band of half-width ``radius`` around the edge of ``mask`` (dilated minus eroded)."""
    kernel = disc(radius)
    return cv2.subtract(cv2.dilate(mask, kernel), cv2.erode(mask, kernel))


def close(mask: np.ndarray, grow: int, shrink: int) -> np.ndarray:
    """``mask`` dilated by a disc of ``grow`` then eroded by one of ``shrink``, as on the whole
    image (the border does not erode), computed inside the mask's bounding rectangle widened by
    both radii: beyond it the dilation is 0, so the erosion there is too."""
    closed = np.zeros_like(mask)
    found = bounds(mask)
    if found is None:
        return closed
    margin = grow + shrink + 1
    rows, cols = (
        slice(max(0, s.start - margin), min(size, s.stop + margin))
        for s, size in zip(found, mask.shape, strict=True)
    )
    closed[rows, cols] = cv2.erode(cv2.dilate(mask[rows, cols], disc(grow)), disc(shrink))
    return closed


def feather(mask: np.ndarray, radius: int) -> np.ndarray:
    """A soft 0..1 float mask: eroded by ``radius`` then blurred, so it fades to exactly 0 at its
    edge (the image border counts as outside)."""
    if radius <= 0:
        return (mask > 127).astype(np.float32)
    soft = np.zeros(mask.shape, np.float32)
    found = bounds(mask)
    if found is None:
        return soft
    rows, cols = found
    # Everything outside the mask's bounding rectangle is 0 before and after: work inside it.
    pad = 2 * radius
    padded = np.pad(mask[rows, cols], pad)
    kernel = disc(radius)
    eroded = cv2.erode(padded, kernel)
    # OpenCV sizes a float kernel to 4 sigma each side: sigma = radius / 4 keeps the blur inside the
    # eroded margin, so the mask stays exactly 0 outside the original region.
    blurred = cv2.GaussianBlur(eroded.astype(np.float32) / 255.0, (0, 0), sigmaX=radius / 4)
    soft[rows, cols] = blurred[pad:-pad, pad:-pad]
    return soft


def bounds(mask: np.ndarray) -> tuple[slice, slice] | None:
    """The rows and columns of the smallest rectangle holding every non-zero pixel of ``mask``
    (None when there is none)."""
    binary = mask if mask.dtype == np.uint8 else (mask > 0).view(np.uint8)
    x, y, width, height = cv2.boundingRect(binary)
    return (slice(y, y + height), slice(x, x + width)) if width else None
