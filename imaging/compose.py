"""Compositing: LAB colour transfer and shift, aligned pastes, painting boxes white, pasting a crop
back feathered, and the classical skin smoothing."""

from __future__ import annotations

import cv2
import numpy as np

from .geometry import Box, Face, grow_box, int_box, similarity_transform
from .masks import bounds, feather


def paint_boxes_white(image: np.ndarray, boxes: list[Box]) -> np.ndarray:
    """A copy with every box filled white (the other faces of a template, MISSION.md §2.1)."""
    out = image.copy()
    for box in boxes:
        x0, y0, x1, y1 = int_box(box)
        out[y0:y1, x0:x1] = 255
    return out


def transfer_color(
    source: np.ndarray, reference: np.ndarray, mask: np.ndarray, reference_mask: np.ndarray | None = None
) -> np.ndarray:
    """Moves the LAB mean/std of ``source`` inside ``mask`` to those of ``reference`` inside
    ``reference_mask`` (default: the same mask); pixels outside the mask are unchanged."""
    inside = mask > 127
    ref_inside = (reference_mask if reference_mask is not None else mask) > 127
    where, ref_where = bounds(inside), bounds(ref_inside)
    out = source.copy()
    if where is None or ref_where is None:
        return out
    # Only the masks' bounding rectangles are converted: LAB is per pixel.
    src_lab = cv2.cvtColor(np.ascontiguousarray(source[where]), cv2.COLOR_RGB2LAB)
    ref_lab = cv2.cvtColor(np.ascontiguousarray(reference[ref_where]), cv2.COLOR_RGB2LAB)
    src_mask, ref_mask = inside[where].astype(np.uint8), ref_inside[ref_where].astype(np.uint8)
    src_mean, src_std = (v.ravel() for v in cv2.meanStdDev(src_lab, mask=src_mask))
    ref_mean, ref_std = (v.ravel() for v in cv2.meanStdDev(ref_lab, mask=ref_mask))
    gain = (ref_std / (src_std + 1e-6)).astype(np.float32)
    moved = src_lab.astype(np.float32) * gain + (ref_mean - src_mean * gain).astype(np.float32)
    moved_rgb = cv2.cvtColor(np.clip(moved, 0, 255).round().astype(np.uint8), cv2.COLOR_LAB2RGB)
    np.copyto(out[where], moved_rgb, where=inside[where][..., None])
    return out


def paste_aligned(
    source: np.ndarray,
    source_box: Box,
    source_landmarks: np.ndarray,
    target: np.ndarray,
    target_landmarks: np.ndarray,
) -> np.ndarray:
    """``source``'s ``source_box`` moved by the similarity that takes its landmarks onto
    ``target_landmarks`` and pasted over ``target`` wherever it lands (the reference's
    ``crop_and_paste``, face_process_utils.py L147-184)."""
    x0, y0, x1, y1 = int_box(source_box)
    patch = np.ascontiguousarray(source[y0:y1, x0:x1])
    matrix = similarity_transform(np.asarray(source_landmarks) - np.array([x0, y0]), target_landmarks)
    size = (target.shape[1], target.shape[0])
    warped = cv2.warpAffine(patch, matrix, size, borderValue=0)
    covered = cv2.warpAffine(np.full(patch.shape[:2], 255, np.uint8), matrix, size, borderValue=0)
    out = target.copy()
    out[covered > 0] = warped[covered > 0]
    return out


# The face-id image's face box, grown, is what goes over a template face (multi_user_facecrop_ratio,
# easyphoto_infer.py L830).
FACE_ID_CROP_SCALE = 1.5


def paste_face(
    source: np.ndarray,
    source_face: Face,
    target: np.ndarray,
    target_face: Face,
    grow: float = FACE_ID_CROP_SCALE,
) -> np.ndarray:
    """``source``'s face (its box grown ``grow`` times) pasted over ``target``'s by the similarity
    of their landmarks: the pose source of a face (L1172-1174, L1362-1369)."""
    box = grow_box(source_face.box, grow, source.shape[1], source.shape[0])
    return paste_aligned(source, box, source_face.landmarks, target, target_face.landmarks)


def shift_color(
    image: np.ndarray, reference: np.ndarray, box: tuple[int, int, int, int], mask: np.ndarray, blur: int
) -> np.ndarray:
    """The reference's colour shift (easyphoto_infer.py L1615-1648, L1757-1786): ``image``'s LAB
    mean and spread over ``box`` moved to ``reference``'s over the same box, and taken through
    ``mask`` box-blurred by ``blur`` px inside the box, so the shift fades out with no edge."""
    x0, y0, x1, y1 = box
    inner, inner_reference = image[y0:y1, x0:x1], reference[y0:y1, x0:x1]
    out = image.copy()  # nothing outside the box changes: the work is done on the box alone
    if inner.size == 0:
        return out
    shifted = transfer_color(inner, inner_reference, np.full(inner.shape[:2], 255, np.uint8))
    weight = cv2.blur(mask[y0:y1, x0:x1], (blur, blur)).astype(np.float32) / 255.0
    out[y0:y1, x0:x1] = mix(shifted, inner, weight)
    return out


def mix(front: np.ndarray, back: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``front`` over ``back`` at ``weight`` (0..1 per pixel), rounded to uint8."""
    out = back.copy()
    where = bounds(weight)
    if where is None:
        return out
    alpha = weight[where][..., None]
    blended = front[where].astype(np.float32) * alpha + back[where].astype(np.float32) * (1 - alpha)
    out[where] = blended.round().astype(np.uint8)
    return out


def paste_back(
    image: np.ndarray, crop: np.ndarray, box: tuple[int, int, int, int], feather_px: int
) -> np.ndarray:
    """``crop`` (already resized to the box) blended into ``image`` at ``box`` through a feathered
    rectangle; pixels outside the box are untouched."""
    x0, y0, x1, y1 = box
    region = image[y0:y1, x0:x1]
    if crop.shape[:2] != region.shape[:2]:
        raise ValueError(f"crop {crop.shape[:2]} does not fit box {box}")
    alpha = feather(np.full(region.shape[:2], 255, np.uint8), feather_px)[..., None]
    out = image.copy()
    out[y0:y1, x0:x1] = (crop * alpha + region * (1 - alpha)).round().astype(np.uint8)
    return out


# Skin smoothing at a face's scale: the bilateral filter's reach is a 40th of the face's width
# (6 px at a 256 px face) and it averages only colours within SKIN_SIGMA_COLOR of each other, so
# blotches and freckles fade while the edges of brows, eyes, lips and jaw stay; the finest grain
# (pores, under a 400th of the width) is put back at SKIN_GRAIN_KEPT so skin does not look waxen.
# Chosen by eye on the astronaut portrait against 25/0.5 (barely visible) and 45/0.3 (waxen).
SKIN_SIGMA_COLOR = 35.0
SKIN_GRAIN_KEPT = 0.4
SKIN_REACH = 1 / 40


def smooth_skin(image: np.ndarray, face_width: float) -> np.ndarray:
    """``image`` smoothed edge-preservingly at the scale of a face ``face_width`` pixels wide (the
    caller blends it in through the skin mask)."""
    smooth = cv2.bilateralFilter(image, 0, SKIN_SIGMA_COLOR, max(1.0, face_width * SKIN_REACH))
    original = image.astype(np.float32)
    grain = original - cv2.GaussianBlur(original, (0, 0), max(0.5, face_width / 400))
    return np.clip(smooth.astype(np.float32) + SKIN_GRAIN_KEPT * grain, 0, 255).round().astype(np.uint8)


def added_border_step(pasted: np.ndarray, original: np.ndarray, mask: np.ndarray, distance: float) -> float:
    """How much of an edge pasting a region (``mask``) into ``original`` added along its border:
    at each border pixel, the CIE76 ΔE (Lab) between the pixels ``distance`` px inside and outside
    it along the border's normal, in ``pasted`` less in ``original`` (an edge the photo already
    had there is not the paste's), counted where positive and averaged over the border."""
    inside, outside = _across_border(mask, distance)
    if len(inside) == 0:
        return 0.0
    added = _steps(pasted, inside, outside) - _steps(original, inside, outside)
    return float(added.mean())


def _across_border(mask: np.ndarray, distance: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel pairs (x, y) ``distance`` px inside and outside each border pixel of ``mask``, along
    the normal, where both lie in the image."""
    binary = (mask > 127).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return np.zeros((0, 2), int), np.zeros((0, 2), int)
    points = np.concatenate([c.reshape(-1, 2) for c in contours]).astype(np.float32)
    soft = cv2.GaussianBlur(binary.astype(np.float32), (0, 0), max(distance, 1.0))
    grad_y, grad_x = np.gradient(soft)
    xs, ys = points[:, 0].astype(int), points[:, 1].astype(int)
    normal = -np.stack([grad_x[ys, xs], grad_y[ys, xs]], axis=1)  # outward: the mask falls outside
    length = np.linalg.norm(normal, axis=1, keepdims=True)
    usable = length[:, 0] > 1e-6
    normal, points = normal[usable] / length[usable], points[usable]
    inside = np.round(points - normal * distance).astype(int)
    outside = np.round(points + normal * distance).astype(int)
    height, width = binary.shape
    limit = np.array([width, height])
    within = np.all((inside >= 0) & (outside >= 0) & (inside < limit) & (outside < limit), axis=1)
    return inside[within], outside[within]


def _steps(image: np.ndarray, inside: np.ndarray, outside: np.ndarray) -> np.ndarray:
    lab = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    return np.linalg.norm(lab[inside[:, 1], inside[:, 0]] - lab[outside[:, 1], outside[:, 0]], axis=1)
