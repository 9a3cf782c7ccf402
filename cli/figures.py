"""The pictures in ``docs/images/``, made again from the packaged photos and the classical models
(no diffusion weights are involved): ``python -m easyphoto.cli.figures docs/images``."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

from easyphoto.diffusion.passes import PassOptions
from easyphoto.engines.backends.torch_backend import TorchBackend
from easyphoto.engines.faces.fusion import fuse_faces, warp_reference
from easyphoto.engines.faces.models import default_face_models
from easyphoto.engines.faces.parts import retouch_skin
from easyphoto.engines.interface import Engines
from easyphoto.engines.models.loading import tiny_family
from easyphoto.fixtures.photos import person_photos, sample_photo
from easyphoto.fixtures.users import publish_photo_user
from easyphoto.imaging.codec import encode_png
from easyphoto.imaging.compose import paste_face
from easyphoto.imaging.controls import Pose, draw_pose
from easyphoto.imaging.geometry import grow_box, int_box
from easyphoto.imaging.masks import FACE_PARTS, REFERENCE_CROP_SIDE, inpaint_mask, only_parts, ring_mask
from easyphoto.server.options import GenerateOptions
from easyphoto.server.pipeline import Orchestrator
from easyphoto.trainer.options import TrainingOptions
from easyphoto.trainer.photos import prepare_photos
from easyphoto.users.store import UserStore

from .faces import default_analyzer
from .sheets import contact_sheet


def training_crop() -> np.ndarray:
    """A training photo's framing: the photo with its face (green), 3x crop (blue) and tight
    rectangle (red); the tight crop with the top moved up, as the trainer cut it before; the
    training image now (the 3x crop, white outside the matte and the rectangle)."""
    photo = person_photos()[2]
    prepared = prepare_photos(
        [encode_png(photo)], TrainingOptions(), default_analyzer(), default_face_models()
    )
    report, crop, face = prepared.reports[0], prepared.reference, prepared.crop_faces[0]
    boxed = photo.copy()
    for box, colour in (
        (report.face_box, (0, 200, 0)),
        (report.crop_box, (0, 0, 255)),
        (report.tight_box, (255, 0, 0)),
    ):
        x0, y0, x1, y1 = int_box(tuple(box))  # type: ignore[arg-type]
        cv2.rectangle(boxed, (x0, y0), (x1 - 1, y1 - 1), colour, 2)
    x0, y0, x1, y1 = int_box(face.box)
    w, h = x1 - x0, y1 - y0
    before = crop[
        max(0, int(y0 - 0.15 * h)) : int(y1 + 0.15 * h), max(0, int(x0 - 0.30 * w)) : int(x1 + 0.30 * w)
    ]
    return contact_sheet(
        [
            ("photo: face, 3x crop, rectangle", boxed),
            ("before: tight crop, top up", before),
            ("now: 3x crop, matted (grey frame)", _framed(prepared.crops[0])),
        ],
        height=320,
        banner="training image framing (preprocess.py L224-246); each shown at the same height",
    )


def fusion(faces: int = 3) -> np.ndarray:
    """The demo user's reference face fused (ratio 0.5, the landmark parser, no diffusion) into
    the first faces of the group photo, each 3x crop beside the template's."""
    models, analyzer = default_face_models(), default_analyzer()
    user = prepare_photos([encode_png(p) for p in person_photos()], TrainingOptions(), analyzer, models)
    if user.reference_face is None:
        raise RuntimeError("the packaged person photos gave no reference face")
    group = sample_photo("group")
    tiles = []
    for index, face in enumerate(analyzer.detect(group)[:faces]):
        x0, y0, x1, y1 = int_box(grow_box(face.box, 3.0, group.shape[1], group.shape[0]))
        crop = np.ascontiguousarray(group[y0:y1, x0:x1])
        crop_face = analyzer.largest(crop)
        moved = warp_reference(user.reference, user.reference_face, crop_face, crop.shape[:2])
        fused = fuse_faces(crop, crop_face, moved, models.parser, 0.5)
        tiles += [(f"face {index}: template", crop), (f"face {index}: fusion only", fused)]
    return contact_sheet(
        tiles, height=240, banner="face fusion before the first pass (easyphoto_infer.py L1435-1468)"
    )


def fusion_only() -> np.ndarray:
    """The group photo generated with every diffusion pass off for the demo user on its first three
    faces (its reference photo standing in as the face-id image): fusion, colour shift and paste
    back only, the classical stages a user can judge without diffusion weights."""
    models, analyzer = default_face_models(), default_analyzer()
    user = prepare_photos([encode_png(p) for p in person_photos()], TrainingOptions(), analyzer, models)
    family = tiny_family()
    engines = Engines(TorchBackend(family, "cpu"), family.tokenizer, float(family.vae.config.scaling_factor))
    off = PassOptions(False, 1, 0.5, 7.0)
    with tempfile.TemporaryDirectory() as data:
        publish_photo_user(UserStore(Path(data)), "demo", user.reference)
        orchestrator = Orchestrator(engines, family.scheduler_config, models, analyzer, UserStore(Path(data)))
        group = sample_photo("group")
        options = GenerateOptions(first_pass=off, second_pass=off, seam_pass=off)
        result = orchestrator.generate(group, ["demo"] * 3, options, seed=1)
        orchestrator.close()
    return contact_sheet(
        [("template (t1.jpg)", group), ("every pass off: the demo user on faces 0-2", result.image)],
        height=400,
        banner="fusion-only generation: no fringe pasted, the tone the template's",
    )


def pose() -> np.ndarray:
    """The pose source of two faces of the group photo (the demo user's reference photo standing
    in for the face-id image, pasted by a similarity fit of its landmarks) and the openpose control
    drawn from the fitted landmarks."""
    models, analyzer = default_face_models(), default_analyzer()
    user = prepare_photos([encode_png(p) for p in person_photos()], TrainingOptions(), analyzer, models)
    if user.reference_face is None:
        raise RuntimeError("the packaged person photos gave no reference face")
    group, tiles = sample_photo("group"), []
    for index, face in enumerate(analyzer.detect(group)[1:3], start=1):
        x0, y0, x1, y1 = int_box(grow_box(face.box, 3.0, group.shape[1], group.shape[0]))
        crop = np.ascontiguousarray(group[y0:y1, x0:x1])
        crop_face, user_face = analyzer.largest(crop), user.reference_face
        source = paste_face(user.reference, user_face, crop, crop_face)
        drawn = draw_pose(crop.shape[:2], [Pose.fitted(user_face.landmarks, crop_face.landmarks)])
        tiles += [(f"face {index}: template", crop), ("pose source", source), ("openpose control", drawn)]
    return contact_sheet(tiles, height=240, banner="pose source (crop_and_paste, L1362-1369) and its control")


def masks() -> np.ndarray:
    """The masks of a face of the group photo at the working size (512 px short side): the first
    pass's inpaint mask, the second pass's ring and the colour shift's blurred weight."""
    models, analyzer = default_face_models(), default_analyzer()
    group = sample_photo("group")
    face = analyzer.detect(group)[2]
    x0, y0, x1, y1 = int_box(grow_box(face.box, 3.0, group.shape[1], group.shape[0]))
    scale = REFERENCE_CROP_SIDE / min(x1 - x0, y1 - y0)
    crop = cv2.resize(group[y0:y1, x0:x1], (round((x1 - x0) * scale), round((y1 - y0) * scale)))
    crop_face = analyzer.largest(crop)
    parts = models.parser(crop, crop_face)
    bx0, by0, bx1, by1 = int_box(grow_box(crop_face.box, 1.1, crop.shape[1], crop.shape[0]))
    shift = np.zeros(crop.shape[:2], np.uint8)  # blurred inside the face box only, as applied
    shift[by0:by1, bx0:bx1] = cv2.blur(only_parts(parts, FACE_PARTS)[by0:by1, bx0:bx1], (32, 32))
    return contact_sheet(
        [
            ("crop", crop),
            ("inpaint mask (L1470-1478)", _tinted(crop, inpaint_mask(parts, bx1 - bx0), (255, 0, 0))),
            ("second-pass ring (L1697-1714)", _tinted(crop, ring_mask(parts), (0, 0, 255))),
            ("colour shift weight (L1615-1648)", _tinted(crop, shift, (0, 160, 0))),
        ],
        height=300,
        banner="the masks of one face, landmark parser, tinted where they apply",
    )


def skin_retouching() -> np.ndarray:
    """The classical skin retouching on the astronaut portrait's face and on two faces of the group
    photo: each face before, after, and where it changed (the difference, x4)."""
    models, analyzer = default_face_models(), default_analyzer()
    tiles = []
    for name, image, index in (
        ("astronaut", sample_photo("astronaut"), 0),
        ("t1.jpg", sample_photo("group"), 1),
    ):
        face = analyzer.detect(image)[index]
        retouched = retouch_skin(image, face, models.parser, models.retoucher)
        x0, y0, x1, y1 = int_box(grow_box(face.box, 1.3, image.shape[1], image.shape[0]))
        before, after = image[y0:y1, x0:x1], retouched[y0:y1, x0:x1]
        difference = np.abs(after.astype(np.int16) - before.astype(np.int16)) * 4
        tiles += [
            (f"{name}: before", before),
            ("retouched", after),
            ("difference x4", np.clip(difference, 0, 255).astype(np.uint8)),
        ]
    return contact_sheet(
        tiles, height=300, banner="skin retouching (bilateral, skin and nose only; off unless asked)"
    )


def _tinted(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    weight = mask.astype(np.float32)[..., None] / 255.0 * 0.5
    return (image * (1 - weight) + np.array(colour, np.float32) * weight).round().astype(np.uint8)


def _framed(image: np.ndarray) -> np.ndarray:
    """A grey line around a mostly white image, so its extent shows on the white sheet."""
    out = image.copy()
    cv2.rectangle(out, (0, 0), (out.shape[1] - 1, out.shape[0] - 1), (160, 160, 160), 2)
    return out


FIGURES = {
    "training_crop.png": training_crop,
    "fusion.png": fusion,
    "fusion_only.png": fusion_only,
    "masks.png": masks,
    "pose.png": pose,
    "skin_retouching.png": skin_retouching,
}


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "docs/images")
    out.mkdir(parents=True, exist_ok=True)
    for name, make in FIGURES.items():
        (out / name).write_bytes(encode_png(make()))
        print(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
