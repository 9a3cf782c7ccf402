"""Real photos that installed packages ship, for tests, the demo and benchmarks (never committed).

* ``group``: insightface's ``t1.jpg``, six people (1280x886).
* ``tom_hanks``: insightface's aligned 112x112 face.
* ``astronaut``: scikit-image's public-domain NASA portrait of Eileen Collins (512x512).
* ``coffee``: scikit-image's cup of coffee, a photo with no face.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .imaging import decode_image
from .packages import package_dir

PHOTOS = ("group", "tom_hanks", "astronaut", "coffee")


def insightface_images_dir() -> Path:
    return package_dir("insightface", "pip install insightface") / "data" / "images"


def sample_path(name: str) -> Path | None:
    """The file behind a sample, where it is a file (scikit-image's are generated arrays)."""
    files = {"group": "t1.jpg", "tom_hanks": "Tom_Hanks_54745.png"}
    return insightface_images_dir() / files[name] if name in files else None


def sample_photo(name: str) -> np.ndarray:
    """An RGB uint8 sample photo by name (see :data:`PHOTOS`)."""
    if name in ("astronaut", "coffee"):
        from skimage import data

        return np.ascontiguousarray(getattr(data, name)())
    path = sample_path(name)
    if path is None:
        raise KeyError(f"unknown sample {name!r}; known: {PHOTOS}")
    return decode_image(path.read_bytes(), field=name)


def person_photos() -> list[np.ndarray]:
    """One person four ways, as training photos for tests and the demo: the astronaut portrait,
    mirrored, re-cropped and re-lit."""
    photo = sample_photo("astronaut")
    relit = np.clip(photo.astype(np.float32) * 0.8 + 20, 0, 255).astype(np.uint8)
    return [photo, photo[:, ::-1].copy(), photo[30:480, 20:470].copy(), relit]
