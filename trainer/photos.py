"""From uploaded photos to training crops (MISSION.md §1 steps 1–5), with a reason per dropped photo.

Decode (EXIF-rotated RGB, size limits) → largest face → identity filter (photos that do not look
like the majority are dropped, then the top ``max_kept_photos`` by dot with the mean embedding are
kept) → reference photo by score × roll-score → crop the box × 3, re-detect, tighten → saliency
matte, everything outside painted white.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from easyphoto.engines.faces.detect import FaceAnalyzer
from easyphoto.engines.faces.models import FaceModels
from easyphoto.engines.faces.parts import apply_matte, super_resolve
from easyphoto.imaging.codec import decode_image
from easyphoto.imaging.geometry import Face, grow_box, int_box, nearest_face, roll_score, tighten_box
from easyphoto.rpc.errors import EasyPhotoError, NoUsablePhotos

from .options import TrainingOptions

MIN_FACE_SIZE = 32.0


@dataclass
class PhotoReport:
    index: int
    kept: bool = False
    reason: str = ""  # why it was dropped: an error reason, "DIFFERENT_PERSON", "LOW_IDENTITY_SCORE"
    message: str = ""
    identity_score: float = 0.0
    roll_score: float = 0.0


@dataclass
class _Candidate:
    report: PhotoReport
    image: np.ndarray
    face: Face
    embedding: np.ndarray


@dataclass
class PreparedPhotos:
    crops: list[np.ndarray]  # matted training crops, in kept order (best identity score first)
    crop_faces: list[Face]  # the face in each crop
    reference: np.ndarray  # the "roop" photo: the tight crop of the best score × roll-score photo
    reference_face: Face | None  # the face in it
    embeddings: np.ndarray  # of the kept faces (rows, L2-normalised)
    reports: list[PhotoReport]
    warnings: list[str] = field(default_factory=list)

    def no_usable_photos(self) -> NoUsablePhotos:
        reasons = "; ".join(f"photo {r.index}: {r.reason} ({r.message})" for r in self.reports)
        return NoUsablePhotos(f"no photo can be used for training: {reasons}", field="photos")


def prepare_photos(
    photos: list[bytes],
    options: TrainingOptions,
    analyzer: FaceAnalyzer,
    face_models: FaceModels,
    on_stage: Callable[[str], None] = lambda stage: None,
) -> PreparedPhotos:
    reports = [PhotoReport(i) for i in range(len(photos))]
    on_stage("detect")
    candidates = [c for c in (_detect(photos[r.index], r, analyzer) for r in reports) if c is not None]
    on_stage("filter")
    kept, warnings = _filter(candidates, options.max_kept_photos, analyzer.same_person_threshold)
    if not kept:
        empty = np.zeros((0, 0, 3), np.uint8)
        return PreparedPhotos([], [], empty, None, np.zeros((0, 0), np.float32), reports, warnings)
    on_stage("crop")
    reference = max(kept, key=lambda c: c.report.identity_score * c.report.roll_score)
    crops, faces = [], []
    for candidate in kept:
        crop, face = _tight_crop(candidate, options, analyzer)
        if options.portrait_enhancement and min(crop.shape[:2]) < options.resolution:
            crop = super_resolve(crop, face_models.upscaler, 1.0)
            face = analyzer.largest(crop)
        crops.append(crop)
        faces.append(face)
    chosen = kept.index(reference)
    on_stage("matte")
    matted = [
        apply_matte(crop, face_models.matte(crop, face.box)) for crop, face in zip(crops, faces, strict=True)
    ]
    if options.skin_retouching:
        warnings.append("skin_retouching was requested but no retouching model is loaded; skipped")
    return PreparedPhotos(
        crops=matted,
        crop_faces=faces,
        reference=crops[chosen],
        reference_face=faces[chosen],
        embeddings=np.stack([c.embedding for c in kept]),
        reports=reports,
        warnings=warnings,
    )


def _detect(data: bytes, report: PhotoReport, analyzer: FaceAnalyzer) -> _Candidate | None:
    try:
        image = decode_image(data, field=f"photos[{report.index}]")
        face = analyzer.largest(image, field=f"photos[{report.index}]", min_size=MIN_FACE_SIZE)
    except EasyPhotoError as error:
        report.reason, report.message = error.reason, error.message
        return None
    report.roll_score = roll_score(face.landmarks)
    return _Candidate(report, image, face, analyzer.embed(image, [face])[0])


def _filter(
    candidates: list[_Candidate], max_kept: int, threshold: float
) -> tuple[list[_Candidate], list[str]]:
    """Drops photos unlike the majority, then keeps the top ``max_kept`` by dot with the pivot."""
    warnings: list[str] = []
    if len(candidates) >= 3:
        embeddings = np.stack([c.embedding for c in candidates])
        pairwise = embeddings @ embeddings.T
        np.fill_diagonal(pairwise, np.nan)
        typical = np.nanmedian(pairwise, axis=1)
        if (typical >= threshold).any():  # else no majority to compare with: keep all, warn below
            for candidate, score in zip(candidates, typical, strict=True):
                if score < threshold:
                    candidate.report.reason = "DIFFERENT_PERSON"
                    candidate.report.message = (
                        f"median similarity {score:.3f} to the other photos is below {threshold}"
                    )
            candidates = [c for c in candidates if not c.report.reason]
    if not candidates:
        return [], warnings
    pivot = np.mean([c.embedding for c in candidates], axis=0)
    pivot /= max(float(np.linalg.norm(pivot)), 1e-12)
    for candidate in candidates:
        candidate.report.identity_score = float(candidate.embedding @ pivot)
    ranked = sorted(candidates, key=lambda c: -c.report.identity_score)
    for candidate in ranked[max_kept:]:
        candidate.report.reason = "LOW_IDENTITY_SCORE"
        candidate.report.message = f"not among the {max_kept} photos most like the others"
    kept = ranked[:max_kept]
    for candidate in kept:
        candidate.report.kept = True
    embeddings = np.stack([c.embedding for c in kept])
    if len(kept) > 1 and float((embeddings @ embeddings.T).min()) < threshold:
        warnings.append("the kept photos may show more than one person")
    return kept, warnings


def _tight_crop(
    candidate: _Candidate, options: TrainingOptions, analyzer: FaceAnalyzer
) -> tuple[np.ndarray, Face]:
    """Box × crop_scale, re-detect there, then the tighten rule of MISSION.md §1.4."""
    image, face = candidate.image, candidate.face
    height, width = image.shape[:2]
    x0, y0, x1, y1 = int_box(grow_box(face.box, options.crop_scale, width, height))
    wide = image[y0:y1, x0:x1]
    expected = face.shifted(-x0, -y0)
    local = nearest_face(analyzer.detect(wide), expected)
    wide_h, wide_w = wide.shape[:2]
    tx0, ty0, tx1, ty1 = int_box(
        tighten_box(local.box, wide_w, wide_h, options.tighten_x, options.tighten_top, options.tighten_bottom)
    )
    return wide[ty0:ty1, tx0:tx1], local.shifted(-tx0, -ty0)
