"""Face-part masks, the saliency matte and the super-resolution hook.

Each has a classical default that needs no model, and an ONNX model that is used instead when the
operator gives one (BiSeNet face parsing, a U²-Net-style saliency net, a Real-ESRGAN-style x2
enhancer). The ONNX files run as roles through :class:`OnnxRunner`; their signatures are read
from the files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import torch

from easyphoto.imaging.geometry import Box, Face, grow_box, int_box
from easyphoto.imaging.masks import face_part_masks

from .onnx_runner import OnnxRunner


class Parser(Protocol):
    """Face-part masks of the face at ``face`` in ``image`` (uint8, 255 inside), keyed by part."""

    # Whether the parser tells skin from hair and whatever covers a face (5-landmark geometry
    # cannot: a fusion with it stops at the brows).
    sees_hair: bool

    def __call__(self, image: np.ndarray, face: Face) -> dict[str, np.ndarray]: ...


# What a matte and an upscaler look like to callers.
Matte = Callable[[np.ndarray, Box], np.ndarray]
Upscaler = Callable[[np.ndarray], np.ndarray]

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
    """Face parts from 5-landmark geometry (the default)."""

    sees_hair = False

    def __call__(self, image: np.ndarray, face: Face) -> dict[str, np.ndarray]:
        return face_part_masks(image.shape[:2], face.landmarks)


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
        blob = torch.from_numpy(image.astype(np.float32).transpose(2, 0, 1)[None] / 255.0)
        out = self.runner(blob.contiguous())[0][0].clamp(0, 1).numpy().transpose(1, 2, 0)
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
