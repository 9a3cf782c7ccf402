"""The pictures in ``docs/images/``, made again from the packaged photos and the classical models
(no diffusion weights are involved): ``python -m easyphoto.cli.figures docs/images``."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

from easyphoto.engines.faces.models import default_face_models
from easyphoto.fixtures.photos import person_photos
from easyphoto.imaging.codec import encode_png
from easyphoto.imaging.geometry import int_box
from easyphoto.trainer.options import TrainingOptions
from easyphoto.trainer.photos import prepare_photos

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


def _framed(image: np.ndarray) -> np.ndarray:
    """A grey line around a mostly white image, so its extent shows on the white sheet."""
    out = image.copy()
    cv2.rectangle(out, (0, 0), (out.shape[1] - 1, out.shape[0] - 1), (160, 160, 160), 2)
    return out


FIGURES = {"training_crop.png": training_crop}


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "docs/images")
    out.mkdir(parents=True, exist_ok=True)
    for name, make in FIGURES.items():
        (out / name).write_bytes(encode_png(make()))
        print(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
