"""Pure image helpers shared by the orchestrator and the trainer (numpy/OpenCV, vectorised).

Images are HxWx3 uint8 RGB arrays at this layer; :func:`to_model` / :func:`from_model` convert to
and from the NCHW float tensors the engines take. The face geometry (alignment, masks,
paste-back) joins this module with the face stack.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageTooLarge, ImageTooSmall, ImageUnreadable

MAX_ENCODED_BYTES = 20 * 1024 * 1024
MAX_SIDE = 8192
MIN_SIDE = 64


def decode_image(data: bytes, field: str = "image") -> np.ndarray:
    """Encoded bytes to an RGB uint8 array, EXIF rotation applied; typed errors for bad input."""
    if len(data) > MAX_ENCODED_BYTES:
        raise ImageTooLarge(f"{len(data)} bytes; the limit is {MAX_ENCODED_BYTES}", field=field)
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if max(width, height) > MAX_SIDE:
                raise ImageTooLarge(f"{width}x{height}; the limit is {MAX_SIDE} px a side", field=field)
            if min(width, height) < MIN_SIDE:
                raise ImageTooSmall(f"{width}x{height}; at least {MIN_SIDE} px a side", field=field)
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


def color_control(image: np.ndarray, cell: int = 64) -> np.ndarray:
    """The colour ControlNet's input: the image reduced to a coarse mosaic of mean colours."""
    height, width = image.shape[:2]
    small = cv2.resize(image, (max(1, width // cell), max(1, height // cell)), interpolation=cv2.INTER_AREA)
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
    tiles = []
    for caption, image in images:
        rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
        scaled = resize(rgb, round(rgb.shape[1] * height / rgb.shape[0]), height)
        label = np.full((22, scaled.shape[1], 3), 255, np.uint8)
        cv2.putText(label, caption, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(np.vstack([label, scaled]))
    sheet = np.hstack(tiles)
    if banner:
        strip = np.full((26, sheet.shape[1], 3), (255, 235, 200), np.uint8)
        cv2.putText(strip, banner, (4, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (120, 0, 0), 1, cv2.LINE_AA)
        sheet = np.vstack([strip, sheet])
    return sheet
