"""Images in and out: decoding untrusted bytes with limits (typed errors naming the field),
PNG encoding, and the conversion to and from the engines' NCHW tensors.

Images are HxWx3 uint8 RGB arrays; masks HxW uint8 (255 = inside).
"""

from __future__ import annotations

import io
import re

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from easyphoto.rpc.errors import ImageTooLarge, ImageTooSmall, ImageUnreadable

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
    except UnidentifiedImageError as exc:
        kind = "no bytes" if not data else f"{len(data)} bytes in no format this server reads"
        raise ImageUnreadable(
            f"not a readable image: {kind} (JPEG, PNG, WebP, GIF, BMP, TIFF)", field=field
        ) from exc
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageUnreadable(f"not a readable image: {_without_reprs(str(exc))}", field=field) from exc


def _without_reprs(text: str) -> str:
    """An exception's text without Python object reprs (``<_io.BytesIO object at 0x...>``), which
    say nothing to a client."""
    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the upload", text)


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


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
