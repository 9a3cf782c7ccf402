"""dlib's 128-d face descriptor on aligned chips, with only numpy and dlib.

Kept free of project imports on purpose: :class:`engines.faces.models.DlibEmbedder` uses it in
process, and ``easyphoto export --triton`` copies this file beside the python-backend model that
serves the ``face_embedder`` role in Triton (whose environment has dlib but not this package), so
both paths run the same code.
"""

from __future__ import annotations

from typing import Any

import numpy as np

RESNET_FILE = "dlib_face_recognition_resnet_model_v1.dat"
NORM_EPSILON = 1e-12


def load_descriptor(path: str) -> Any:
    import dlib

    return dlib.face_recognition_model_v1(path)


def describe_chips(net: Any, faces: np.ndarray) -> np.ndarray:
    """L2-normalised descriptors (float32 ``[n, 128]``) of ``faces``, ``[n, 3, 150, 150]`` chips
    in 0..255 (RGB, channels first, as the role declares them)."""
    chips = np.round(np.clip(faces, 0, 255)).astype(np.uint8)
    arrays = [np.ascontiguousarray(chip.transpose(1, 2, 0)) for chip in chips]
    vectors = np.asarray([np.asarray(v) for v in net.compute_face_descriptor(arrays)], np.float32)
    vectors = vectors.reshape(len(arrays), -1)
    norms = np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), NORM_EPSILON)
    return (vectors / norms).astype(np.float32)
