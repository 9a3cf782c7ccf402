from __future__ import annotations

import os
from pathlib import Path

import pytest

from easyphoto.engines.faces.detect import FaceAnalyzer
from easyphoto.engines.faces.models import default_face_models
from easyphoto.engines.family import ModelFamily
from easyphoto.engines.interface import Engines
from easyphoto.engines.loading import tiny_family
from easyphoto.engines.torch_backend import TorchBackend


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("easyphoto-cache")
    # Everything the suite builds (tiny family, tokenizer) goes here, never into the user's cache.
    os.environ["EASYPHOTO_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny(cache_dir: Path) -> ModelFamily:
    return tiny_family(cache_dir)


@pytest.fixture(scope="session")
def engines(tiny: ModelFamily) -> Engines:
    return Engines(TorchBackend(tiny, "cpu"), tiny.tokenizer, float(tiny.vae.config.scaling_factor))


@pytest.fixture(scope="session")
def faces() -> FaceAnalyzer:
    models = default_face_models()
    return models.analyzer(TorchBackend(faces=models, device="cpu"))
