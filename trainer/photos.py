"""From uploaded photos to training crops (MISSION.md §1 steps 1–5), with a reason per dropped photo.

Decode (EXIF-rotated RGB, size limits) → largest face → identity filter (the top
``max_kept_photos`` by dot with the mean embedding, as the reference; photos unlike the majority
are flagged with a warning, or dropped with ``drop_different_person``) → crop the box × 3 (the
training image keeps that framing), re-detect, tighten → saliency matte ∧ tight rectangle,
everything outside painted white; a photo whose matte is empty is dropped → reference photo by
score × roll-score.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

from easyphoto.engines.faces.detect import FaceAnalyzer
from easyphoto.engines.faces.models import FaceModels
from easyphoto.engines.faces.parts import apply_matte, retouch_skin, super_resolve
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
    median_similarity: float = 0.0  # to the other photos' faces (0 with fewer than 3)
    # Where the photo was framed, in its own pixels (x0, y0, x1, y1): the face found, the 3x crop
    # that is the training image, and the rectangle of it that the matte may keep.
    face_box: list[float] = field(default_factory=list)
    crop_box: list[float] = field(default_factory=list)
    tight_box: list[float] = field(default_factory=list)


@dataclass
class _Candidate:
    report: PhotoReport
    image: np.ndarray
    face: Face
    embedding: np.ndarray


@dataclass
class _Framed:
    candidate: _Candidate
    crop: np.ndarray  # the 3x crop, before the matte
    face: Face  # in the crop
    tight: tuple[int, int, int, int]  # in the crop


@dataclass
class PreparedPhotos:
    crops: list[np.ndarray]  # matted 3x training crops, in kept order (best identity score first)
    crop_faces: list[Face]  # the face in each crop
    reference: np.ndarray  # the "roop" photo: the 3x crop of the best score × roll-score photo
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
    kept, warnings = _filter(
        candidates, options.max_kept_photos, analyzer.same_person_threshold, options.drop_different_person
    )
    if not kept:
        return _nothing(reports, warnings)
    on_stage("crop")
    framed = [_frame(candidate, options, analyzer) for candidate in kept]
    if options.portrait_enhancement:
        framed = _enhance_small(framed, options.resolution, face_models)
    if options.skin_retouching:  # preprocess.py L168-170, L296-298: on the face crops
        on_stage("retouch")
        framed = [_retouched(frame, face_models) for frame in framed]
    on_stage("matte")
    matted = _matted(framed, face_models)
    if not matted:
        return _nothing(reports, warnings)
    # preprocess.py L190-194: the reference photo is the best by identity score × roll score.
    reference = max((frame for frame, _ in matted), key=_reference_score)
    return PreparedPhotos(
        crops=[image for _, image in matted],
        crop_faces=[frame.face for frame, _ in matted],
        reference=reference.crop,
        reference_face=reference.face,
        embeddings=np.stack([frame.candidate.embedding for frame, _ in matted]),
        reports=reports,
        warnings=warnings,
    )


def _nothing(reports: list[PhotoReport], warnings: list[str]) -> PreparedPhotos:
    empty = np.zeros((0, 0, 3), np.uint8)
    return PreparedPhotos([], [], empty, None, np.zeros((0, 0), np.float32), reports, warnings)


def _matted(framed: list[_Framed], face_models: FaceModels) -> list[tuple[_Framed, np.ndarray]]:
    """Each crop with everything outside its training mask white; a photo whose mask is empty is
    dropped (preprocess.py L243-246)."""
    matted = []
    for frame in framed:
        mask = _training_mask(frame, face_models)
        if mask.any():
            matted.append((frame, apply_matte(frame.crop, mask)))
            continue
        report = frame.candidate.report
        report.kept, report.reason = False, "EMPTY_MATTE"
        report.message = "the saliency matte kept nothing inside the face's rectangle"
    return matted


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
    candidates: list[_Candidate], max_kept: int, threshold: float, drop_different: bool
) -> tuple[list[_Candidate], list[str]]:
    """Keeps the top ``max_kept`` by dot with the pivot (preprocess.py L76-84, L197-198). Photos
    whose median similarity to the others is under ``threshold`` (a check the reference does not
    make, calibrated on a handful of photos) are flagged in a warning, or dropped first with
    ``drop_different``."""
    warnings: list[str] = []
    unlike = _unlike_the_majority(candidates, threshold)
    for candidate in unlike:
        similarity = candidate.report.median_similarity
        message = f"median similarity {similarity:.3f} to the other photos is below {threshold}"
        if drop_different:
            candidate.report.reason, candidate.report.message = "DIFFERENT_PERSON", message
        else:
            warnings.append(f"photo {candidate.report.index} may show someone else ({message}); kept")
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


def _unlike_the_majority(candidates: list[_Candidate], threshold: float) -> list[_Candidate]:
    """Photos whose median cosine to the others is under ``threshold``, where at least one is over
    it (else there is no majority to compare with); records every photo's median."""
    if len(candidates) < 3:
        return []
    embeddings = np.stack([c.embedding for c in candidates])
    pairwise = embeddings @ embeddings.T
    np.fill_diagonal(pairwise, np.nan)
    typical = np.nanmedian(pairwise, axis=1)
    for candidate, score in zip(candidates, typical, strict=True):
        candidate.report.median_similarity = round(float(score), 4)
    if not (typical >= threshold).any():
        return []
    return [c for c, score in zip(candidates, typical, strict=True) if score < threshold]


def _frame(candidate: _Candidate, options: TrainingOptions, analyzer: FaceAnalyzer) -> _Framed:
    """The face box × ``crop_scale`` (preprocess.py L154, L167), the face re-detected there (L224)
    and the tight rectangle around it (L231-234). A crop whose short side passes twice the training
    resolution is shrunk first: training resizes it to that resolution anyway."""
    image, face = candidate.image, candidate.face
    height, width = image.shape[:2]
    box = int_box(grow_box(face.box, options.crop_scale, width, height))
    x0, y0, x1, y1 = box
    crop = image[y0:y1, x0:x1]
    expected = face.shifted(-x0, -y0)
    factor = min(1.0, 2 * options.resolution / min(crop.shape[:2]))
    if factor < 1.0:
        size = (max(1, round(crop.shape[1] * factor)), max(1, round(crop.shape[0] * factor)))
        crop, expected = cv2.resize(crop, size, interpolation=cv2.INTER_AREA), expected.scaled(factor)
    local = nearest_face(analyzer.detect(crop), expected)
    crop_h, crop_w = crop.shape[:2]
    tight = int_box(
        tighten_box(local.box, crop_w, crop_h, options.tighten_x, options.tighten_top, options.tighten_bottom)
    )
    report = candidate.report
    report.face_box = _rounded(face.box)
    report.crop_box = [float(v) for v in box]
    tx0, ty0, tx1, ty1 = (v / factor for v in tight)
    report.tight_box = _rounded((x0 + tx0, y0 + ty0, x0 + tx1, y0 + ty1))
    return _Framed(candidate, crop, local, tight)


def _retouched(frame: _Framed, face_models: FaceModels) -> _Framed:
    crop = retouch_skin(frame.crop, frame.face, face_models.parser, face_models.retoucher)
    return _Framed(frame.candidate, crop, frame.face, frame.tight)


def _enhance_small(framed: list[_Framed], resolution: int, face_models: FaceModels) -> list[_Framed]:
    """Crops smaller than the training resolution upscaled through the enhancer, for at most half
    of the photos (preprocess.py L209-218)."""
    budget = len(framed) // 2
    enhanced = []
    for frame in framed:
        if budget > 0 and min(frame.crop.shape[:2]) < resolution:
            budget -= 1
            crop = super_resolve(frame.crop, face_models.upscaler, 1.0)
            factor = crop.shape[1] / frame.crop.shape[1]
            tight = int_box(tuple(v * factor for v in frame.tight))
            frame = _Framed(frame.candidate, crop, frame.face.scaled(factor), tight)
        enhanced.append(frame)
    return enhanced


def _training_mask(frame: _Framed, face_models: FaceModels) -> np.ndarray:
    """The saliency matte of the whole 3x crop and the tight rectangle (preprocess.py L235-240)."""
    x0, y0, x1, y1 = frame.tight
    rectangle = np.zeros(frame.crop.shape[:2], bool)
    rectangle[y0:y1, x0:x1] = True
    kept = (face_models.matte(frame.crop, frame.face.box) > 127) & rectangle
    return np.where(kept, 255, 0).astype(np.uint8)


def _reference_score(frame: _Framed) -> float:
    return frame.candidate.report.identity_score * frame.candidate.report.roll_score


def _rounded(box: tuple[float, ...]) -> list[float]:
    return [round(float(v), 1) for v in box]
