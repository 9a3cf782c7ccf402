"""Face-part masks, the saliency matte, the super-resolution hook and skin retouching.

Each has a classical default that needs no model, and an ONNX model that is used instead when the
operator gives one (BiSeNet face parsing, a U²-Net-style saliency net, a Real-ESRGAN-style x2
enhancer, an image-to-image skin retoucher). The ONNX files run as roles through
:class:`OnnxRunner`; their signatures are read from the files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import torch

from easyphoto.imaging.compose import mix, smooth_skin
from easyphoto.imaging.geometry import Box, Face, grow_box, int_box
from easyphoto.imaging.masks import bounds, face_part_masks, feather, only_parts
from easyphoto.rpc.errors import EasyPhotoError

from .onnx_runner import OnnxRunner


class Parser(Protocol):
    """Face-part masks of the face at ``face`` in ``image`` (uint8, 255 inside), keyed by part."""

    # Whether the parser tells skin from hair and whatever covers a face (5-landmark geometry
    # cannot: a fusion with it stops at the brows).
    sees_hair: bool

    def __call__(self, image: np.ndarray, face: Face) -> dict[str, np.ndarray]: ...


# What a matte, an upscaler and a skin retoucher (a crop and the face's width in it) look like.
Matte = Callable[[np.ndarray, Box], np.ndarray]
Upscaler = Callable[[np.ndarray], np.ndarray]
Retoucher = Callable[[np.ndarray, float], np.ndarray]

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

# CelebAMask-HQ's 19 classes as BiSeNet face parsers order them, grouped into our face parts.
CELEBAMASK_PARTS = {
    "skin": (1,),
    "brows": (2, 3),
    "eyes": (4, 5),
    "nose": (10,),
    "mouth": (11,),
    "lips": (12, 13),
}
PARSING_SIZE = 512


class LandmarkParser:
    """Face parts from 5-landmark geometry (the default). The masks depend on the image's size and
    the landmarks only, and a face's fusions, colour shifts and masks ask for the same ones about six
    times: the last answer is kept, read-only so that every caller can share it."""

    sees_hair = False
    _last: tuple[tuple[tuple[int, ...], bytes], dict[str, np.ndarray]] | None = None

    def __call__(self, image: np.ndarray, face: Face) -> dict[str, np.ndarray]:
        key = (image.shape[:2], np.asarray(face.landmarks, np.float64).tobytes())
        last = self._last  # one read: requests on other threads may replace it meanwhile
        if last is not None and last[0] == key:
            return last[1]
        parts = face_part_masks(image.shape[:2], face.landmarks)
        for mask in parts.values():
            mask.setflags(write=False)
        self._last = (key, parts)
        return parts


class BiSeNetParser:
    """Face parts from a 19-class BiSeNet face-parsing ONNX (input 1x3x512x512, ImageNet
    normalisation; output 1x19x512x512 logits) run on a square crop around the face."""

    sees_hair = True

    def __init__(self, path: Path, crop_scale: float = 1.6) -> None:
        self.runner = OnnxRunner(path)
        self.crop_scale = crop_scale

    def __call__(self, image: np.ndarray, face: Face) -> dict[str, np.ndarray]:
        height, width = image.shape[:2]
        x0, y0, x1, y1 = _square(grow_box(face.box, self.crop_scale, width, height))
        crop = cv2.resize(_padded_crop(image, (x0, y0, x1, y1)), (PARSING_SIZE, PARSING_SIZE))
        blob = ((crop.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)[None]
        logits = self.runner(torch.from_numpy(np.ascontiguousarray(blob)))[0]
        side = x1 - x0
        small = logits[0].argmax(dim=0).numpy().astype(np.uint8)
        labels = cv2.resize(small, (side, side), interpolation=cv2.INTER_NEAREST)
        parts = {}
        for part, classes in CELEBAMASK_PARTS.items():
            local = np.isin(labels, classes).astype(np.uint8) * 255
            parts[part] = _paste_mask(local, (x0, y0, x1, y1), height, width)
        return parts


def _square(box: Box) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    side = round(max(x1 - x0, y1 - y0))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = round(cx - side / 2), round(cy - side / 2)
    return left, top, left + side, top + side


def _padded_crop(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The crop of ``box``, zero-padded where it leaves the image."""
    x0, y0, x1, y1 = box
    height, width = image.shape[:2]
    out = np.zeros((y1 - y0, x1 - x0, *image.shape[2:]), image.dtype)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return out


def _paste_mask(local: np.ndarray, box: tuple[int, int, int, int], height: int, width: int) -> np.ndarray:
    x0, y0, x1, y1 = box
    mask = np.zeros((height, width), np.uint8)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    mask[sy0:sy1, sx0:sx1] = local[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0]
    return mask


# ---- saliency matte -------------------------------------------------------------------------


class GrabCutMatte:
    """The classical matte: GrabCut seeded with the face box as sure foreground and a border strip
    of the crop as sure background; the rest is decided by colour models."""

    def __init__(self, iterations: int = 4, border: float = 0.04) -> None:
        self.iterations = iterations
        self.border = border

    def __call__(self, image: np.ndarray, face_box: Box) -> np.ndarray:
        height, width = image.shape[:2]
        seeds = np.full((height, width), cv2.GC_PR_FGD, np.uint8)
        strip = max(2, round(self.border * min(height, width)))
        seeds[:strip] = seeds[-strip:] = cv2.GC_BGD
        seeds[:, :strip] = seeds[:, -strip:] = cv2.GC_BGD
        x0, y0, x1, y1 = int_box(face_box)
        seeds[max(y0, 0) : y1, max(x0, 0) : x1] = cv2.GC_FGD
        background, foreground = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        cv2.grabCut(bgr, seeds, (0, 0, 0, 0), background, foreground, self.iterations, cv2.GC_INIT_WITH_MASK)
        return np.where((seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD), 255, 0).astype(np.uint8)


class OnnxSaliencyMatte:
    """A learned salient-object net (U²-Net-style: 1x3xSxS ImageNet-normalised in, first output
    1x1xSxS saliency in [0, 1]); thresholded at 0.5."""

    def __init__(self, path: Path) -> None:
        self.runner = OnnxRunner(path)
        shape = self.runner.session.get_inputs()[0].shape
        self.size = shape[-1] if isinstance(shape[-1], int) else 320

    def __call__(self, image: np.ndarray, face_box: Box) -> np.ndarray:
        height, width = image.shape[:2]
        resized = cv2.resize(image, (self.size, self.size), interpolation=cv2.INTER_AREA)
        blob = ((resized.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)[None]
        saliency = self.runner(torch.from_numpy(np.ascontiguousarray(blob)))[0][0, 0].numpy()
        saliency = cv2.resize(saliency.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
        return np.where(saliency >= 0.5, 255, 0).astype(np.uint8)


def apply_matte(image: np.ndarray, matte: np.ndarray) -> np.ndarray:
    """Everything outside the matte painted white (MISSION.md §1.5)."""
    out = image.copy()
    out[matte <= 127] = 255
    return out


# ---- super-resolution hook -------------------------------------------------------------------


class LanczosUpscaler:
    """The default: plain Lanczos resampling (adds no detail; blending it changes nothing)."""

    scale = 2

    def __call__(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        return cv2.resize(image, (width * self.scale, height * self.scale), interpolation=cv2.INTER_LANCZOS4)


class OnnxUpscaler:
    """A x2 enhancer ONNX (Real-ESRGAN-style: 1x3xHxW in [0, 1] in, 1x3x2Hx2W out)."""

    scale = 2

    def __init__(self, path: Path) -> None:
        self.runner = OnnxRunner(path)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return run_image_model(self.runner, image)


def run_image_model(runner: OnnxRunner, image: np.ndarray) -> np.ndarray:
    """An image-to-image ONNX on one image: RGB uint8 in as 1x3xHxW in [0, 1], its first output
    (clamped to [0, 1]) back as RGB uint8."""
    blob = torch.from_numpy(np.ascontiguousarray(image.astype(np.float32).transpose(2, 0, 1)[None] / 255.0))
    out = runner(blob)[0][0].clamp(0, 1).numpy().transpose(1, 2, 0)
    return (out * 255).round().astype(np.uint8)


def super_resolve(image: np.ndarray, enhancer: Upscaler, ratio: float) -> np.ndarray:
    """The enhancer's output blended at ``ratio`` with the Lanczos-upscaled image (MISSION.md §2.11)."""
    base = LanczosUpscaler()(image)
    if ratio <= 0 or isinstance(enhancer, LanczosUpscaler):
        return base
    enhanced = enhancer(image)
    if enhanced.shape != base.shape:
        enhanced = cv2.resize(enhanced, (base.shape[1], base.shape[0]), interpolation=cv2.INTER_LANCZOS4)
    return (
        (enhanced.astype(np.float32) * ratio + base.astype(np.float32) * (1 - ratio)).round().astype(np.uint8)
    )


# ---- skin retouching ------------------------------------------------------------------------

# The skin a retoucher works on: the parser's skin and nose (brows, eyes, mouth and lips cut out).
RETOUCHED_PARTS = ("skin", "nose")


class SkinSmoother:
    """The classical retoucher (the default): edge-preserving smoothing at the face's scale."""

    def __call__(self, crop: np.ndarray, face_width: float) -> np.ndarray:
        return smooth_skin(crop, face_width)


class OnnxSkinRetoucher:
    """A learned retoucher ONNX (image to image: 1x3xHxW RGB in [0, 1] in, the same shape out). A
    file with a fixed input size gets the crop resized to it and back; one with free sides gets it
    edge-padded to a multiple of 32 and cropped back."""

    multiple = 32

    def __init__(self, path: Path) -> None:
        self.runner = OnnxRunner(path)
        height, width = self.runner.session.get_inputs()[0].shape[-2:]
        self.size = (width, height) if isinstance(height, int) and isinstance(width, int) else None

    def __call__(self, crop: np.ndarray, face_width: float) -> np.ndarray:
        height, width = crop.shape[:2]
        if self.size is not None:
            return cv2.resize(
                self._run(cv2.resize(crop, self.size, interpolation=cv2.INTER_AREA)), (width, height)
            )
        pad_y, pad_x = -height % self.multiple, -width % self.multiple
        padded = np.pad(crop, ((0, pad_y), (0, pad_x), (0, 0)), mode="edge")
        return self._run(padded)[:height, :width]

    def _run(self, image: np.ndarray) -> np.ndarray:
        out = run_image_model(self.runner, image)
        if out.shape != image.shape:
            raise EasyPhotoError(  # the deployment's model misbehaves: INTERNAL, saying which
                f"the skin retoucher {self.runner.path} returned {out.shape[:2]} for {image.shape[:2]}"
            )
        return out


def retouch_skin(image: np.ndarray, face: Face, parser: Parser, retoucher: Retoucher) -> np.ndarray:
    """``image`` with the skin of the face at ``face`` retouched: the retoucher runs on the skin's
    bounding rectangle (with a margin for its filters) and its output is blended in through the
    parser's skin mask, feathered; every pixel outside that mask is left as it was."""
    skin = only_parts(parser(image, face), RETOUCHED_PARTS)
    found = bounds(skin)
    if found is None:
        return image
    height, width = image.shape[:2]
    margin = max(2, round(face.width / 10))
    rows = slice(max(found[0].start - margin, 0), min(found[0].stop + margin, height))
    cols = slice(max(found[1].start - margin, 0), min(found[1].stop + margin, width))
    crop = image[rows, cols]
    weight = feather(skin[rows, cols], max(1, round(face.width / 40)))
    out = image.copy()
    out[rows, cols] = mix(retoucher(crop, face.width), crop, weight)
    return out
