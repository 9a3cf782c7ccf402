"""Real photos that installed packages ship, for tests, the demo and benchmarks (never committed).

* ``group``: insightface's ``t1.jpg``, six people (1280x886).
* ``tom_hanks``: insightface's aligned 112x112 face.
* ``astronaut``: scikit-image's public-domain NASA portrait of Eileen Collins (512x512).
* ``coffee``: scikit-image's cup of coffee, a photo with no face.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from .imaging import decode_image

PHOTOS = ("group", "tom_hanks", "astronaut", "coffee")


def insightface_images_dir() -> Path:
    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("insightface is not installed; `make setup` installs it")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "images"


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
