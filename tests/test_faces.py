"""The face stack on real weights and real photos that packages ship."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from easyphoto.engines.faces.detect import FaceAnalyzer
from easyphoto.fixtures.photos import sample_photo
from easyphoto.rpc.errors import NoFace

# Measured (docs/benchmarks.md): same person >= 0.98, different people <= 0.90 with dlib's ResNet.
SAME_PERSON_MARGIN = 0.04


def _inside(point: np.ndarray, box: tuple[float, float, float, float]) -> bool:
    x0, y0, x1, y1 = box
    return bool(x0 <= point[0] <= x1 and y0 <= point[1] <= y1)


@pytest.mark.parametrize(("name", "count"), [("group", 6), ("astronaut", 1), ("tom_hanks", 1)])
def test_detector_finds_each_face_with_landmarks_in_box(faces: FaceAnalyzer, name: str, count: int) -> None:
    found = faces.detect(sample_photo(name))
    assert len(found) == count
    for face in found:
        assert face.score > 0.95
        assert face.landmarks.shape == (5, 2)
        assert all(_inside(p, face.box) for p in face.landmarks)
        left_eye, right_eye = face.landmarks[0], face.landmarks[1]
        assert left_eye[0] < right_eye[0]
    assert [f.box[0] for f in found] == sorted(f.box[0] for f in found)  # left to right


def test_photo_without_face_raises_typed_error(faces: FaceAnalyzer) -> None:
    assert faces.detect(sample_photo("coffee")) == []
    with pytest.raises(NoFace) as info:
        faces.largest(sample_photo("coffee"), field="photos[3]")
    assert info.value.field == "photos[3]" and info.value.code == "FAILED_PRECONDITION"


def test_too_small_and_too_many_faces_are_typed_errors_only_for_painted_faces(faces: FaceAnalyzer) -> None:
    from easyphoto.rpc.errors import FaceTooSmall, TooManyFaces

    group = sample_photo("group")  # six faces, 93-118 px wide
    crowd = np.concatenate([group] * 3, axis=1)  # eighteen
    assert len(faces.detect_painted(crowd, [0, 15], "templates[0]", max_faces=16)) == 18
    with pytest.raises(TooManyFaces) as many:
        faces.detect_painted(crowd, [0, 16], "templates[0]", max_faces=16)
    assert many.value.code == "INVALID_ARGUMENT" and "face 16" in many.value.message
    assert len(faces.detect_painted(group, [0, 2], "templates[0]", max_faces=8, min_size=100)) == 6
    with pytest.raises(FaceTooSmall) as small:
        faces.detect_painted(group, [0, 5], "templates[0]", max_faces=8, min_size=100)
    assert small.value.field == "templates[0]" and small.value.code == "FAILED_PRECONDITION"
    assert "face 5" in small.value.message
    with pytest.raises(FaceTooSmall):
        faces.largest(sample_photo("astronaut"), min_size=300)


def test_rotation_by_known_angle_is_recovered(faces: FaceAnalyzer) -> None:
    from easyphoto.imaging.geometry import roll_angle

    image = sample_photo("astronaut")
    before = roll_angle(faces.largest(image).landmarks)
    for degrees in (-12.0, 12.0):
        # cv2 rotates counter-clockwise for positive angles, which lowers the roll angle.
        matrix = cv2.getRotationMatrix2D((256, 256), degrees, 1.0)
        rotated = cv2.warpAffine(image, matrix, (512, 512), borderMode=cv2.BORDER_REFLECT)
        after = roll_angle(faces.largest(rotated).landmarks)
        assert abs((before - after) - degrees) < 1.5, (degrees, before, after)


def _variants(image: np.ndarray) -> dict[str, np.ndarray]:
    relit = np.clip(image.astype(np.float32) * 0.7 + 10, 0, 255).astype(np.uint8)
    crop = cv2.resize(image[20:400, 80:400], (480, 570), interpolation=cv2.INTER_CUBIC)
    return {"mirrored": np.ascontiguousarray(image[:, ::-1]), "re-cropped": crop, "re-lit": relit}


def test_same_person_scores_above_every_other_person(faces: FaceAnalyzer) -> None:
    astronaut = sample_photo("astronaut")
    reference = faces.embed(astronaut, [faces.largest(astronaut)])[0]
    others = [faces.embed(p, faces.detect(p)) for p in (sample_photo("group"), sample_photo("tom_hanks"))]
    best_other = max(float(np.max(e @ reference)) for e in others)
    for name, variant in _variants(astronaut).items():
        embedding = faces.embed(variant, [faces.largest(variant)])[0]
        assert np.isclose(np.linalg.norm(embedding), 1.0, atol=1e-4)
        same = float(embedding @ reference)
        assert same > best_other + SAME_PERSON_MARGIN, (name, same, best_other)


def test_embeddings_of_different_people_differ(faces: FaceAnalyzer) -> None:
    group = sample_photo("group")
    embeddings = faces.embed(group, faces.detect(group))
    similarity = embeddings @ embeddings.T
    off_diagonal = similarity[~np.eye(len(similarity), dtype=bool)]
    assert np.allclose(np.diag(similarity), 1.0, atol=1e-4)
    assert off_diagonal.max() < 0.95


def test_an_identity_score_is_taken_on_the_face_found_again_where_it_was(faces: FaceAnalyzer) -> None:
    """One rule for both services (the orchestrator's scores, the trainer's validation): the face
    detected within half a face width of where it was, else the face where it was."""
    group = sample_photo("group")
    found = faces.detect(group)
    target = faces.embed(group, [found[2]])[0]
    nudged = found[2].shifted(found[2].width / 5, 0)  # repainted faces are found a little off
    assert faces.identity(group, nudged, target, found) == pytest.approx(1.0, abs=1e-5)
    assert faces.identity(group, nudged, target) == pytest.approx(1.0, abs=1e-5)  # detected itself
    far = found[2].shifted(found[2].width * 0.7, 0)  # nothing within half a width: scored in place
    alone = faces.embed(group, [far])[0] @ target
    assert faces.identity(group, far, target, found) == pytest.approx(float(alone), abs=1e-6)
    assert float(alone) < 0.99
