"""Face detection and identity over the engine roles: what the services call.

:class:`FaceAnalyzer` detects with a :class:`Detector` (the MTCNN cascade over ``face_pnet``,
``face_rnet``, ``face_onet``, or SCRFD over ``face_detector``) and embeds faces through the
``face_embedder`` role. Scores between faces
are cosine similarities of L2-normalised embeddings, whatever embedder is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from easyphoto.imaging.geometry import Face, clip_box, nearest_face
from easyphoto.rpc.errors import FaceTooSmall, NoFace, TooManyFaces

from ..interface import Backend
from .mtcnn import MtcnnOptions, crop_patches, nms, normalize, pyramid_scales, regress, square

# Cosine above which two dlib descriptors are taken as one person (measured in docs/benchmarks.md:
# same person >= 0.98, different people <= 0.905 on the packaged photos).
SAME_PERSON_THRESHOLD = 0.93

# Makes the embedder's input for one face: an HxWx3 float chip in the embedder's value range.
Aligner = Callable[[np.ndarray, "Face"], np.ndarray]


class Detector(Protocol):
    def __call__(self, image: np.ndarray) -> list[Face]: ...


def run_batched(backend: Backend, role: str, name: str, batch: torch.Tensor) -> list[np.ndarray]:
    """Runs a role in chunks that fit its batch profile; outputs as numpy, in declared order."""
    description = backend.roles[role]
    limit = description.axes["batch"].max
    chunks = [backend.infer(role, {name: batch[i : i + limit]}) for i in range(0, len(batch), limit)]
    return [torch.cat([c[s.name] for c in chunks]).float().cpu().numpy() for s in description.outputs]


class MtcnnDetector:
    """The MTCNN cascade over the ``face_pnet``/``face_rnet``/``face_onet`` roles."""

    def __init__(self, backend: Backend, options: MtcnnOptions | None = None) -> None:
        self.backend = backend
        self.options = options or MtcnnOptions()

    def __call__(self, image: np.ndarray) -> list[Face]:
        boxes = self._propose(image)
        boxes = self._refine(image, boxes)
        return self._finish(image, boxes)

    def _propose(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        tensor = normalize(image)
        threshold = self.options.thresholds[0]
        found = []
        for scale in pyramid_scales(height, width, self.options):
            size = (int(height * scale + 1), int(width * scale + 1))
            resized = F.interpolate(tensor, size=size, mode="area")
            out = self.backend.infer("face_pnet", {"images": resized})
            probs = out["probs"][0, 1].float().cpu().numpy()
            offsets = out["offsets"][0].float().cpu().numpy()
            ys, xs = np.nonzero(probs >= threshold)
            if len(ys) == 0:
                continue
            cells = np.stack([xs, ys], axis=1).astype(np.float64)
            top_left = np.floor((2 * cells + 1) / scale)
            bottom_right = np.floor((2 * cells + 12) / scale)
            candidates = np.concatenate(
                [top_left, bottom_right, probs[ys, xs][:, None], offsets[:, ys, xs].T], axis=1
            )
            found.append(candidates[nms(candidates[:, :4], candidates[:, 4], 0.5)])
        if not found:
            return np.zeros((0, 5))
        candidates = np.concatenate(found)
        candidates = candidates[nms(candidates[:, :4], candidates[:, 4], 0.7)]
        boxes = regress(candidates[:, :4], candidates[:, 5:9])
        return np.concatenate([square(boxes), candidates[:, 4:5]], axis=1)

    def _refine(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        if len(boxes) == 0:
            return boxes
        probs, offsets = run_batched(
            self.backend, "face_rnet", "faces", crop_patches(image, boxes[:, :4], 24)
        )
        keep = probs[:, 1] >= self.options.thresholds[1]
        boxes, offsets, scores = boxes[keep], offsets[keep], probs[keep, 1]
        order = nms(boxes[:, :4], scores, 0.7)
        refined = regress(boxes[order, :4], offsets[order])
        return np.concatenate([square(refined), scores[order, None]], axis=1)

    def _finish(self, image: np.ndarray, boxes: np.ndarray) -> list[Face]:
        if len(boxes) == 0:
            return []
        probs, offsets, points = run_batched(
            self.backend, "face_onet", "faces", crop_patches(image, boxes[:, :4], 48)
        )
        keep = probs[:, 1] >= self.options.thresholds[2]
        boxes, offsets, points, scores = boxes[keep], offsets[keep], points[keep], probs[keep, 1]
        widths = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        heights = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        xs = widths * points[:, 0:5] + boxes[:, 0:1] - 1
        ys = heights * points[:, 5:10] + boxes[:, 1:2] - 1
        final = regress(boxes[:, :4], offsets)
        order = nms(final, scores, 0.7, mode="min")
        height, width = image.shape[:2]
        faces = []
        for i in order:
            if scores[i] < self.options.min_score:
                continue
            box = clip_box(tuple(float(v) for v in final[i]), width, height)  # type: ignore[arg-type]
            landmarks = np.stack([xs[i], ys[i]], axis=1).astype(np.float32)
            faces.append(Face(box, float(scores[i]), landmarks))
        return faces


def _check_size(face: Face, field: str, min_size: float, which: str = "face") -> None:
    if min(face.width, face.height) < min_size:
        raise FaceTooSmall(
            f"{which} at {[round(v) for v in face.box]} is {face.width:.0f}x{face.height:.0f} px;"
            f" at least {min_size:.0f} px a side is needed",
            field=field,
        )


class FaceAnalyzer:
    """Detection (any :class:`Detector`) and identity (the ``face_embedder`` role on chips made by
    ``aligner``). Scores are cosines of L2-normalised embeddings, whatever embedder is loaded."""

    def __init__(
        self,
        backend: Backend,
        detector: Detector,
        aligner: Aligner,
        same_person_threshold: float = SAME_PERSON_THRESHOLD,
    ) -> None:
        self.backend = backend
        self.detector = detector
        self.aligner = aligner
        self.same_person_threshold = same_person_threshold

    def detect(self, image: np.ndarray) -> list[Face]:
        """Every face in an RGB uint8 image, left to right."""
        return sorted(self.detector(image), key=lambda face: face.box[0])

    def largest(self, image: np.ndarray, field: str = "image", min_size: float = 0) -> Face:
        """The largest face; :class:`NoFace` or :class:`FaceTooSmall` naming ``field`` otherwise."""
        faces = self.detect(image)
        if not faces:
            raise NoFace("no face found", field=field)
        face = max(faces, key=lambda face: face.area)
        _check_size(face, field, min_size)
        return face

    def detect_painted(
        self, image: np.ndarray, painted: Sequence[int], field: str, max_faces: int, min_size: float = 0
    ) -> list[Face]:
        """Every face, left to right, whatever its size. Typed errors only for what a request asks
        to paint (the faces at indices ``painted``): no face at all, an index past the first
        ``max_faces``, or a painted face under ``min_size``. A skipped face never fails a request,
        and keeps its place, so the indices of the others do not shift."""
        faces = self.detect(image)
        if not faces:
            raise NoFace("no face found", field=field)
        beyond = [index for index in painted if max_faces <= index < len(faces)]
        if beyond:
            raise TooManyFaces(
                f"face {beyond[0]} (left to right, from 0) of {len(faces)} is asked for; only the first"
                f" {max_faces} can be painted",
                field=field,
            )
        for index in painted:
            if index < len(faces):
                _check_size(faces[index], field, min_size, f"face {index} (left to right, from 0)")
        return faces

    def embed(self, image: np.ndarray, faces: list[Face]) -> np.ndarray:
        """One L2-normalised embedding per face (rows)."""
        if not faces:
            return np.zeros((0, 0), np.float32)
        chips = np.stack([self.aligner(image, face) for face in faces])
        batch = torch.from_numpy(chips.astype(np.float32)).permute(0, 3, 1, 2).contiguous()
        name = self.backend.roles["face_embedder"].inputs[0].name
        (embeddings,) = run_batched(self.backend, "face_embedder", name, batch)
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        return embeddings / np.maximum(norms, 1e-12)

    def identity(
        self, image: np.ndarray, face: Face, target: np.ndarray, found: list[Face] | None = None
    ) -> float:
        """dot(emb(the face of ``image`` where ``face`` was), ``target``), the identity score of a
        painted face. The face is found again among ``found`` (the faces detected in ``image``;
        detected here when None) by :func:`nearest_face`, within half its width; where none is,
        the score is taken where it was."""
        faces = self.detect(image) if found is None else found
        match = nearest_face(faces, face, within=face.width / 2)
        return float(self.embed(image, [match])[0] @ target)

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
