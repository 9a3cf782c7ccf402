"""Face fusion: the user's face moved onto a template face and blended in only where both images
are face, as the reference blends its fusion model's output (``scripts/easyphoto_infer.py`` at
6c1f895: L1435-1468 before the first pass, L1654-1690 after it).

Where the user's face comes from: the classical default warps the user's reference photo onto the
template face's 5 landmarks by a similarity; a learned swapper ONNX (insightface's inswapper
signature: a 1x3x128x128 aligned target face and a 1x512 ArcFace embedding of the user in, the
swapped 128 px face out) replaces the warp when the operator gives one. The blend is the same for
both: the face parts of the template and of the moved face intersected, grown and shrunk, the eyes
taken whole from the moved face, the template's lips kept, the moved face's colour matched to the
template's inside that region (LAB mean and spread), and the region feathered so no edge shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import onnx

from easyphoto.imaging.compose import mix, transfer_color
from easyphoto.imaging.geometry import Face, align_face, similarity_transform
from easyphoto.imaging.masks import below_brows, close, disc, feather, union

from .onnx_runner import OnnxRunner
from .parts import Parser

# L1437: BiSeNet classes [1, 2, 3, 4, 5, 10, 11, 12, 13]; after the first pass without the nose (L1657).
BEFORE_PARTS = ("skin", "brows", "eyes", "nose", "mouth", "lips")
AFTER_PARTS = ("skin", "brows", "eyes", "mouth", "lips")
SWAP_SIZE = 128


class FaceSwapper(Protocol):
    """The target image with the face at ``target_face`` swapped for the identity ``embedding``."""

    def __call__(self, target: np.ndarray, target_face: Face, embedding: np.ndarray) -> np.ndarray: ...


def warp_reference(
    reference: np.ndarray, reference_face: Face, target_face: Face, shape: tuple[int, int]
) -> np.ndarray:
    """The reference photo moved so that its face lies on the target face's landmarks."""
    matrix = similarity_transform(reference_face.landmarks, target_face.landmarks)
    height, width = shape
    return cv2.warpAffine(
        reference, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
    )


def fusion_weights(
    target_parts: dict[str, np.ndarray],
    moved_parts: dict[str, np.ndarray],
    face: Face,
    ratio: float,
    parts: tuple[str, ...] = BEFORE_PARTS,
    within: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """How much of the moved face each pixel takes (0..1), and the region whose colour is matched.
    The region is where both images are face (L1441-1446), limited to ``within`` if given, closed
    by growing and shrinking (L1447-1449: 8 and 16 px at about 170 px faces, here face width / 20
    and / 10); it is taken at ``ratio``, the moved face's eyes whole (L1451) and the template's lips
    not at all (L1452), and feathered (L1454) so its border fades out."""
    both = np.minimum(union([target_parts[p] for p in parts]), union([moved_parts[p] for p in parts]))
    if within is not None:
        both = np.minimum(both, within)
    grow, shrink = max(1, round(face.width / 20)), max(1, round(face.width / 10))
    region = close(both, grow, shrink)
    alpha = feather(region, grow) * ratio
    eyes = cv2.dilate(np.minimum(moved_parts["eyes"], region), disc(grow))
    alpha = np.maximum(alpha, feather(eyes, grow))
    alpha *= 1.0 - feather(target_parts["lips"], max(1, grow // 2))
    return alpha, region


def fuse_faces(
    target: np.ndarray,
    target_face: Face,
    moved: np.ndarray,
    parser: Parser,
    ratio: float,
    parts: tuple[str, ...] = BEFORE_PARTS,
) -> np.ndarray:
    """``moved`` (the user's face already on the target's landmarks, same size as ``target``)
    blended into ``target`` through :func:`fusion_weights`, colour-matched first."""
    if ratio <= 0:
        return target.copy()
    target_parts, moved_parts = parser(target, target_face), parser(moved, target_face)
    within = None if parser.sees_hair else below_brows(target.shape[:2], target_face.landmarks)
    alpha, region = fusion_weights(target_parts, moved_parts, target_face, ratio, parts, within)
    return mix(transfer_color(moved, target, region), target, alpha)


class OnnxFaceSwapper:
    """A learned swapper with insightface's inswapper signature: ``target`` 1x3x128x128 (RGB in
    [0, 1], the face aligned by insightface's 128 px template) and ``source`` 1x512 (the user's
    ArcFace embedding through the model's ``emap`` matrix, the graph's last initializer, then
    L2-normalised) in; the swapped aligned face (RGB in [0, 1]) out. The swapped crop goes back
    through the inverse alignment; the fusion blend decides how much of it is kept."""

    embedding_size = 512

    def __init__(self, path: Path) -> None:
        self.runner = OnnxRunner(path)
        ranks = {i.name: len(i.shape) for i in self.runner.session.get_inputs()}
        if sorted(ranks.values()) != [2, 4]:
            raise ValueError(f"{path} takes {ranks}; a face swapper takes an aligned face and an embedding")
        self.face_input = next(name for name, rank in ranks.items() if rank == 4)
        self.embedding_input = next(name for name, rank in ranks.items() if rank == 2)
        self.emap = onnx.numpy_helper.to_array(onnx.load(str(path)).graph.initializer[-1]).astype(np.float32)
        if self.emap.shape != (self.embedding_size, self.embedding_size):
            raise ValueError(
                f"{path}: its last initializer is {self.emap.shape}, not an inswapper's 512x512 emap"
            )

    def __call__(self, target: np.ndarray, target_face: Face, embedding: np.ndarray) -> np.ndarray:
        if embedding.shape[-1] != self.embedding_size:
            size = embedding.shape[-1]
            raise ValueError(f"the swapper needs a {self.embedding_size}-d ArcFace embedding, not {size}-d")
        crop, matrix = align_face(target, target_face.landmarks, SWAP_SIZE)
        blob = np.ascontiguousarray(crop.astype(np.float32).transpose(2, 0, 1)[None] / 255.0)
        latent = embedding.reshape(1, -1).astype(np.float32) @ self.emap
        latent /= max(float(np.linalg.norm(latent)), 1e-12)
        feed = {self.face_input: blob, self.embedding_input: latent}
        swapped = np.asarray(self.runner.session.run(None, feed)[0])[0]
        face = (np.clip(swapped, 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8)
        height, width = target.shape[:2]
        inverse = cv2.invertAffineTransform(matrix)
        back = cv2.warpAffine(face, inverse, (width, height), flags=cv2.INTER_LINEAR, borderValue=0)
        covered = cv2.warpAffine(np.full((SWAP_SIZE, SWAP_SIZE), 255, np.uint8), inverse, (width, height))
        out = target.copy()
        out[covered > 127] = back[covered > 127]
        return out
