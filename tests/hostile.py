"""A hostile corpus: the uploads, options and ids a careless or malicious client sends, built from
the packaged photos at test time (nothing binary is committed). Each upload says whether it is a
readable image the servers must convert and serve, or bytes they must refuse with a typed error.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from PIL import Image

# Every reason an unusable upload may be refused with.
IMAGE_REASONS = {"IMAGE_UNREADABLE", "IMAGE_TOO_LARGE", "IMAGE_TOO_SMALL"}


@dataclass(frozen=True)
class Upload:
    name: str
    data: bytes
    readable: bool  # a valid image in an unusual form: converted and served


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _flip(data: bytes, at: int, count: int = 64) -> bytes:
    """The bytes with ``count`` of them from ``at`` inverted."""
    return data[:at] + bytes(b ^ 0xFF for b in data[at : at + count]) + data[at + count :]


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels, with one row of data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + 3 * 16))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def _jpeg_claiming(jpeg: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header (SOF0) rewritten to claim ``width`` x ``height``."""
    at = jpeg.index(b"\xff\xc0") + 5  # marker, length (2), precision (1), then height, width
    return jpeg[:at] + struct.pack(">HH", height, width) + jpeg[at + 4 :]


def _animated(frames: list[Image.Image], fmt: str) -> bytes:
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _exif_rotated(photo: Image.Image) -> bytes:
    """A JPEG stored lying on its side with EXIF orientation 6 (rotate 90 degrees clockwise to view)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(photo.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif.tobytes(), quality=92)


def _with_transparent_border(photo: Image.Image) -> Image.Image:
    rgba = photo.convert("RGBA")
    alpha = np.full(photo.size[::-1], 255, np.uint8)
    alpha[:, : photo.size[0] // 8] = 0
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


def _sixteen_bit(photo: Image.Image) -> Image.Image:
    gray = np.asarray(photo.convert("L"), dtype=np.uint16) * 257
    return Image.fromarray(gray.astype(np.uint16))  # mode I;16


def image_uploads(face_photo: np.ndarray) -> list[Upload]:
    """Every kind of upload, around ``face_photo`` (one face, at least 256 px a side)."""
    photo = Image.fromarray(face_photo)
    jpeg, png = _encode(photo, "JPEG", quality=90), _encode(photo, "PNG")
    webp = _encode(photo, "WEBP", quality=80)
    mirrored = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return [
        Upload("zero_bytes", b"", False),
        Upload("not_an_image", b"GIF89a" + bytes(range(256)) * 8, False),
        Upload("truncated_jpeg", jpeg[: len(jpeg) // 2], False),
        Upload("truncated_png", png[: len(png) // 2], False),
        Upload("corrupt_png", _flip(png, len(png) // 2), False),  # a CRC and zlib error
        Upload("corrupt_webp", _flip(webp, 20, 16), False),  # the VP8 frame header
        Upload("header_65500_png", _png_claiming(65500, 65500), False),
        Upload("header_65500_jpeg", _jpeg_claiming(jpeg, 65500, 65500), False),
        Upload("bomb_png_8192", _encode(Image.new("L", (8192, 8192)), "PNG"), False),
        Upload("one_pixel", _encode(Image.new("RGB", (1, 1)), "PNG"), False),
        Upload("cmyk_jpeg", _encode(photo.convert("CMYK"), "JPEG", quality=90), True),
        Upload("sixteen_bit_png", _encode(_sixteen_bit(photo), "PNG"), True),
        Upload("grayscale_png", _encode(photo.convert("L"), "PNG"), True),
        Upload("alpha_png", _encode(_with_transparent_border(photo), "PNG"), True),
        Upload("palette_png", _encode(photo.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), True),
        Upload("animated_gif", _animated([photo, mirrored], "GIF"), True),
        Upload("animated_webp", _animated([photo, mirrored], "WEBP"), True),
        Upload("exif_rotated_jpeg", _exif_rotated(photo), True),
        Upload("webp", webp, True),
    ]


def face_grid(face: np.ndarray, count: int, columns: int = 10) -> np.ndarray:
    """``count`` copies of a face crop in a grid on a grey canvas (a crowd)."""
    side = face.shape[0]
    rows = -(-count // columns)
    canvas = np.full((rows * side, columns * side, 3), 128, np.uint8)
    for index in range(count):
        y, x = divmod(index, columns)
        canvas[y * side : (y + 1) * side, x * side : (x + 1) * side] = face
    return canvas


def tiny_face(photo: np.ndarray, scale: float, canvas: int = 256) -> np.ndarray:
    """The photo shrunk by ``scale`` onto a grey canvas (its face a few pixels wide)."""
    small = Image.fromarray(photo).resize((int(photo.shape[1] * scale), int(photo.shape[0] * scale)))
    out = np.full((canvas, canvas, 3), 128, np.uint8)
    out[: small.size[1], : small.size[0]] = np.asarray(small)
    return out


MALFORMED_IDS = {
    "parent_path": "../x",
    "slash": "a/b",
    "huge": "u" * 100_000,
    "nul": "ali\x00ce",
    "rtl_mark": "\u202ealice",
    "unicode": "\u00e5lice",
    "dot_start": ".alice",
    "space": "al ice",
    "too_long": "a" * 65,
}


def numeric_fields(descriptor: Descriptor, prefix: str = "") -> Iterator[tuple[str, FieldDescriptor]]:
    """(dotted path, field) of every scalar number in a message, nested messages included."""
    for field in descriptor.fields:
        path = f"{prefix}{field.name}"
        if field.type == FieldDescriptor.TYPE_MESSAGE and not field.is_repeated:
            yield from numeric_fields(field.message_type, f"{path}.")
        elif field.type in NUMBER_VALUES and not field.is_repeated:
            yield path, field


NUMBER_VALUES: dict[int, tuple[float, ...]] = {
    FieldDescriptor.TYPE_FLOAT: (float("nan"), float("inf"), float("-inf"), -1.0, 3.0e38, 0.0),
    FieldDescriptor.TYPE_DOUBLE: (float("nan"), float("inf"), float("-inf"), -1.0, 1.0e308, 0.0),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
}


def set_path(message: object, path: str, value: object) -> None:
    *parents, name = path.split(".")
    for parent in parents:
        message = getattr(message, parent)
    setattr(message, name, value)
