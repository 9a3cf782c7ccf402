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
# Pixels of a decoded image (40 MP: a 24 MP camera's photo fits): an 8192 x 8192 PNG of one colour
# is 65 kB on the wire and 200 MB decoded.
MAX_PIXELS = 40_000_000
MIN_SIDE = 64
# Modes with more than 8 bits a channel, scaled to 8 bits rather than clipped (PIL's convert
# clips a 16-bit grey to white).
_WIDE_MODES = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I": 65535.0, "F": 1.0}
_WHITE = (255, 255, 255, 255)


def decode_image(data: bytes, field: str = "image", min_side: int = MIN_SIDE) -> np.ndarray:
    """Encoded bytes to an RGB uint8 array: EXIF rotation applied, the first frame of an animation,
    transparency over white, 16-bit scaled; typed errors naming ``field`` for bad input."""
    if len(data) > MAX_ENCODED_BYTES:
        raise ImageTooLarge(f"{len(data)} bytes; the limit is {MAX_ENCODED_BYTES}", field=field)
    try:
        with Image.open(io.BytesIO(data)) as img:
            _check_size(*img.size, field, min_side)
            return _to_rgb(ImageOps.exif_transpose(img))
    except Image.DecompressionBombError as exc:  # PIL refuses such a header before we see its size
        claimed = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = claimed.group(1) if claimed else "too many"
        raise ImageTooLarge(
            f"the header claims {pixels} pixels; the limit is {MAX_PIXELS}", field=field
        ) from exc
    except UnidentifiedImageError as exc:
        kind = "no bytes" if not data else f"{len(data)} bytes in no format this server reads"
        raise ImageUnreadable(
            f"not a readable image: {kind} (JPEG, PNG, WebP, GIF, BMP, TIFF)", field=field
        ) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageUnreadable(f"not a readable image: {_without_reprs(str(exc))}", field=field) from exc


def _check_size(width: int, height: int, field: str, min_side: int) -> None:
    if max(width, height) > MAX_SIDE:
        raise ImageTooLarge(f"{width}x{height}; the limit is {MAX_SIDE} px a side", field=field)
    if width * height > MAX_PIXELS:
        raise ImageTooLarge(
            f"{width}x{height} is {width * height} pixels; the limit is {MAX_PIXELS}", field=field
        )
    if min(width, height) < min_side:
        raise ImageTooSmall(f"{width}x{height}; at least {min_side} px a side", field=field)


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in _WIDE_MODES:
        values = np.asarray(img, dtype=np.float32) * (255.0 / _WIDE_MODES[img.mode])
        gray = np.clip(values, 0, 255).round().astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = Image.alpha_composite(Image.new("RGBA", img.size, _WHITE), img.convert("RGBA"))
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


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
    # In numpy and in place (the same float32 arithmetic as a torch version, bitwise): the request
    # thread runs no torch kernel (its thread pool would contend with the step loop's) and
    # allocates the output only.
    channels = image if image.ndim == 3 else image[..., None]
    array = channels.transpose(2, 0, 1).astype(np.float32, order="C")
    array /= np.float32(255.0)
    if signed:
        array *= np.float32(2.0)
        array -= np.float32(1.0)
    return torch.from_numpy(array)[None]


def from_model(tensor: torch.Tensor, signed: bool = True) -> np.ndarray:
    """1xCxHxW float to HxWxC uint8 (the first image of the batch)."""
    # In numpy, for the reason to_model is: the same float32 arithmetic as the torch formula, bitwise
    # (np.rint rounds half to even, as torch.round does).
    values = tensor[0].detach().float().cpu().numpy()
    array = values / np.float32(2.0) + np.float32(0.5) if signed else values.copy()
    np.clip(array, 0.0, 1.0, out=array)
    array *= np.float32(255.0)
    np.rint(array, out=array)
    image = array.astype(np.uint8).transpose(1, 2, 0)
    return image[..., 0] if image.shape[-1] == 1 else image
