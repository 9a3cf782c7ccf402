"""Pure image and face geometry shared by the orchestrator and the trainer (numpy/OpenCV,
vectorised, no per-pixel Python loops).

Images are HxWx3 uint8 RGB arrays; masks HxW uint8 (255 = inside); boxes (x0, y0, x1, y1);
landmarks 5x2 float arrays (left eye, right eye, nose, left mouth corner, right mouth corner) in
image pixels. :func:`to_model` / :func:`from_model` convert to and from the engines' NCHW tensors.
"""

from __future__ import annotations

import io
import math

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageTooLarge, ImageTooSmall, ImageUnreadable

MAX_ENCODED_BYTES = 20 * 1024 * 1024
MAX_SIDE = 8192
MIN_SIDE = 64


def decode_image(data: bytes, field: str = "image", min_side: int = MIN_SIDE) -> np.ndarray:
    """Encoded bytes to an RGB uint8 array, EXIF rotation applied; typed errors for bad input."""
    if len(data) > MAX_ENCODED_BYTES:
        raise ImageTooLarge(f"{len(data)} bytes; the limit is {MAX_ENCODED_BYTES}", field=field)
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if max(width, height) > MAX_SIDE:
                raise ImageTooLarge(f"{width}x{height}; the limit is {MAX_SIDE} px a side", field=field)
            if min(width, height) < min_side:
                raise ImageTooSmall(f"{width}x{height}; at least {min_side} px a side", field=field)
            rgb = ImageOps.exif_transpose(img).convert("RGB")
            return np.asarray(rgb, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageUnreadable(f"not a readable image: {exc}", field=field) from exc


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    shrinking = width * height < image.shape[0] * image.shape[1]
    return cv2.resize(
        image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LANCZOS4
    )


def round_to_multiple(value: float, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


def to_model(image: np.ndarray, signed: bool = True) -> torch.Tensor:
    """HxWx3 uint8 (or HxW mask) to 1xCxHxW float: [-1, 1] when ``signed``, else [0, 1]."""
    array = image.astype(np.float32) / 255.0
    if array.ndim == 2:
        array = array[..., None]
    tensor = torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()
    return tensor * 2 - 1 if signed else tensor


def from_model(tensor: torch.Tensor, signed: bool = True) -> np.ndarray:
    """1xCxHxW float to HxWxC uint8 (the first image of the batch)."""
    values = tensor[0].detach().float().cpu()
    values = (values / 2 + 0.5) if signed else values
    array = (values.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


def canny_control(image: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    edges = cv2.Canny(image, low, high)
    return np.repeat(edges[..., None], 3, axis=2)


def color_control(image: np.ndarray, cells: int = 16) -> np.ndarray:
    """The colour ControlNet's input: a mosaic of mean colours, ``cells`` across the short side
    (the reference resizes to a 1024 short side and averages 64 px cells)."""
    height, width = image.shape[:2]
    cell = min(height, width) / cells
    small_size = (max(1, round(width / cell)), max(1, round(height / cell)))
    small = cv2.resize(image, small_size, interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_NEAREST)


def tile_control(image: np.ndarray, factor: int = 4) -> np.ndarray:
    """The tile ControlNet's input: the image blurred by a down/up-sample."""
    height, width = image.shape[:2]
    small = cv2.resize(
        image, (max(1, width // factor), max(1, height // factor)), interpolation=cv2.INTER_AREA
    )
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


def ellipse_mask(height: int, width: int, box: tuple[float, float, float, float]) -> np.ndarray:
    """A filled ellipse inscribed in ``box`` (x0, y0, x1, y1) as an HxW uint8 mask (255 inside)."""
    x0, y0, x1, y1 = box
    mask = np.zeros((height, width), np.uint8)
    center = (round((x0 + x1) / 2), round((y0 + y1) / 2))
    axes = (round((x1 - x0) / 2), round((y1 - y0) / 2))
    cv2.ellipse(mask, center, axes, 0, 0, 360, 255, thickness=-1)
    return mask


def contact_sheet(images: list[tuple[str, np.ndarray]], height: int = 256, banner: str = "") -> np.ndarray:
    """Images side by side at one height, each captioned, with an optional banner line on top."""
    return contact_sheet_rows([images], height, banner)


def contact_sheet_rows(
    rows: list[list[tuple[str, np.ndarray]]], height: int = 256, banner: str = ""
) -> np.ndarray:
    """One captioned row of images per list, rows left-aligned on white, optional banner on top."""
    strips = [_captioned_row(row, height) for row in rows if row]
    width = max(strip.shape[1] for strip in strips)
    sheet = np.vstack(
        [np.pad(s, ((0, 0), (0, width - s.shape[1]), (0, 0)), constant_values=255) for s in strips]
    )
    if banner:
        strip = np.full((26, sheet.shape[1], 3), (255, 235, 200), np.uint8)
        cv2.putText(strip, banner, (4, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (120, 0, 0), 1, cv2.LINE_AA)
        sheet = np.vstack([strip, sheet])
    return sheet


def _captioned_row(images: list[tuple[str, np.ndarray]], height: int) -> np.ndarray:
    tiles = []
    for caption, image in images:
        rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
        scaled = resize(rgb, round(rgb.shape[1] * height / rgb.shape[0]), height)
        label = np.full((22, scaled.shape[1], 3), 255, np.uint8)
        cv2.putText(label, caption, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(np.vstack([label, scaled]))
    return np.hstack(tiles)


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


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> tuple[np.ndarray, np.ndarray]:
    """The face warped onto the ArcFace template scaled to ``size`` (112 or 512); returns the crop
    and the 2x3 matrix from image to crop."""
    matrix = similarity_transform(landmarks, ARCFACE_TEMPLATE_112 * (size / 112.0))
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
    """The training crop around a re-detected face: x +- x*w, top - top*h, bottom + bottom*h."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    return clip_box((x0 - x * w, y0 - top * h, x1 + x * w, y1 + bottom * h), width, height)


def int_box(box: Box) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    return math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union_area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union_area if union_area > 0 else 0.0


def paint_boxes_white(image: np.ndarray, boxes: list[Box]) -> np.ndarray:
    """A copy with every box filled white (the other faces of a template, MISSION.md §2.1)."""
    out = image.copy()
    for box in boxes:
        x0, y0, x1, y1 = int_box(box)
        out[y0:y1, x0:x1] = 255
    return out


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


# ---- masks from landmark geometry ------------------------------------------------------------

FACE_PARTS = ("skin", "brows", "eyes", "nose", "mouth", "lips")


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
    eye_vec = right_eye - left_eye
    eye_dist = float(np.hypot(*eye_vec)) or 1.0
    angle = math.degrees(math.atan2(eye_vec[1], eye_vec[0]))
    across = eye_vec / eye_dist
    down = np.array([-across[1], across[0]], np.float32)
    eye_mid, mouth_mid = (left_eye + right_eye) / 2, (mouth_l + mouth_r) / 2
    face_len = float(np.dot(mouth_mid - eye_mid, down)) or eye_dist
    masks = {part: np.zeros((height, width), np.uint8) for part in FACE_PARTS}
    for eye in (left_eye, right_eye):
        _ellipse(masks["eyes"], eye, (0.28 * eye_dist, 0.14 * eye_dist), angle)
        _ellipse(masks["brows"], eye - down * 0.32 * eye_dist, (0.36 * eye_dist, 0.09 * eye_dist), angle)
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


def union(masks: list[np.ndarray]) -> np.ndarray:
    return np.maximum.reduce(masks) if masks else np.zeros((0, 0), np.uint8)


def inpaint_mask(parts: dict[str, np.ndarray], face_width: float) -> np.ndarray:
    """The first pass's mask: every face part, closed and dilated by face-width / 10."""
    mask = union([parts[p] for p in FACE_PARTS])
    radius = max(1, round(face_width / 10))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.dilate(cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel), kernel)


def ring_mask(parts: dict[str, np.ndarray], face_width: float) -> np.ndarray:
    """The second pass's mask: a ring around the face border plus the eyes and the lips."""
    ring = border_ring(inpaint_mask(parts, face_width), max(1, round(face_width / 20)))
    return union([ring, parts["eyes"], parts["lips"]])


def border_ring(mask: np.ndarray, radius: int) -> np.ndarray:
    """The band of half-width ``radius`` around the edge of ``mask`` (dilated minus eroded)."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.subtract(cv2.dilate(mask, kernel), cv2.erode(mask, kernel))


# ---- colour and compositing --------------------------------------------------------------------


def transfer_color(
    source: np.ndarray, reference: np.ndarray, mask: np.ndarray, reference_mask: np.ndarray | None = None
) -> np.ndarray:
    """Moves the LAB mean/std of ``source`` inside ``mask`` to those of ``reference`` inside
    ``reference_mask`` (default: the same mask); pixels outside the mask are unchanged."""
    inside = mask > 127
    ref_inside = (reference_mask if reference_mask is not None else mask) > 127
    if not inside.any() or not ref_inside.any():
        return source.copy()
    src_lab = cv2.cvtColor(source, cv2.COLOR_RGB2LAB).astype(np.float32)
    ref_lab = cv2.cvtColor(reference, cv2.COLOR_RGB2LAB).astype(np.float32)
    src_px, ref_px = src_lab[inside], ref_lab[ref_inside]
    src_mean, src_std = src_px.mean(axis=0), src_px.std(axis=0) + 1e-6
    ref_mean, ref_std = ref_px.mean(axis=0), ref_px.std(axis=0)
    moved = src_lab.copy()
    moved[inside] = (src_px - src_mean) * (ref_std / src_std) + ref_mean
    out = cv2.cvtColor(np.clip(moved, 0, 255).round().astype(np.uint8), cv2.COLOR_LAB2RGB)
    out[~inside] = source[~inside]
    return out


def feather(mask: np.ndarray, radius: int) -> np.ndarray:
    """A soft 0..1 float mask: eroded by ``radius`` then blurred, so it fades to exactly 0 at its
    edge (the image border counts as outside)."""
    if radius <= 0:
        return (mask > 127).astype(np.float32)
    pad = 2 * radius
    padded = np.pad(mask, pad)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    eroded = cv2.erode(padded, kernel)
    # OpenCV sizes a float kernel to 4 sigma each side: sigma = radius / 4 keeps the blur inside the
    # eroded margin, so the mask stays exactly 0 outside the original region.
    soft = cv2.GaussianBlur(eroded.astype(np.float32) / 255.0, (0, 0), sigmaX=radius / 4)
    return soft[pad:-pad, pad:-pad]


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


# ---- openpose-style control image ----------------------------------------------------------

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
