from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from easyphoto.engines.backends.torch_backend import TorchBackend
from easyphoto.engines.faces.detect import FaceAnalyzer
from easyphoto.engines.faces.models import default_face_models
from easyphoto.engines.interface import Engines
from easyphoto.engines.models.family import ModelFamily
from easyphoto.engines.models.loading import tiny_family
from easyphoto.fixtures.photos import sample_photo
from easyphoto.imaging.codec import encode_png
from easyphoto.imaging.geometry import grow_box, int_box

if TYPE_CHECKING:
    from easyphoto.server.app import ServerConfig
    from easyphoto.trainer.app import TrainerApp, TrainerConfig

# The tritonserver install and the tiny family exported as a Triton repository, shared by the
# test modules that run a real tritonserver.
pytest_plugins = ["triton_fixtures"]

# `make test` runs two pytest-xdist workers, a file at a time each (`--dist loadfile`), which take
# the files in the order collected: the files that take minutes go first, so that the workers end
# together instead of one running the twenty-kill test alone at the end.
LONGEST_FIRST = (
    "test_trainer_faults.py", "test_triton.py", "test_trainer.py", "test_triton_faults.py",
    "test_lcm.py", "test_load_bench.py", "test_trainer_replicas.py", "test_identity_reward.py",
)  # fmt: skip
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one intra-op thread each, not two pools of two contending.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as collected


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("easyphoto-cache")
    # Everything the suite builds (tiny family, tokenizer) goes here, never into the user's cache.
    os.environ["EASYPHOTO_CACHE"] = str(path)
    return path


# The session's tiny family as built, and its weights then (tiny_stays_as_built compares).
_TINY_AS_BUILT: list[tuple[ModelFamily, dict[str, tuple[float, float]]]] = []


@pytest.fixture(scope="session")
def tiny(cache_dir: Path) -> ModelFamily:
    family = tiny_family(cache_dir)
    _TINY_AS_BUILT.append((family, _weights(family)))
    return family


def _weights(family: ModelFamily) -> dict[str, tuple[float, float]]:
    """Each tensor's sum and sum of squares: a change anywhere shows."""
    return {
        f"{model}.{name}": (float(value.double().sum()), float(value.double().square().sum()))
        for model, module in family.modules().items()
        for name, value in module.state_dict().items()
    }


@pytest.fixture(scope="module", autouse=True)
def tiny_stays_as_built(request: pytest.FixtureRequest) -> Iterator[None]:
    """A module that changes the session's tiny family (fusing a LoRA into it, say) and leaves it
    changed makes the later modules of its worker compare against weights they do not expect."""
    yield
    for family, built in _TINY_AS_BUILT:
        changed = sorted(name for name, value in _weights(family).items() if built.get(name) != value)
        assert not changed, f"{request.module.__name__} left the session's tiny family changed: {changed[:4]}"


@pytest.fixture(scope="session")
def engines(tiny: ModelFamily) -> Engines:
    return Engines(TorchBackend(tiny, "cpu"), tiny.tokenizer, float(tiny.vae.config.scaling_factor))


@pytest.fixture(scope="session")
def faces() -> FaceAnalyzer:
    models = default_face_models()
    return models.analyzer(TorchBackend(faces=models, device="cpu"))


@pytest.fixture(scope="session")
def alice_data(faces: FaceAnalyzer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root where user "alice" is published (a face of the group photo, no LoRA)."""
    data = tmp_path_factory.mktemp("data")
    group = sample_photo("group")
    x0, y0, x1, y1 = int_box(grow_box(faces.detect(group)[1].box, 1.8, group.shape[1], group.shape[0]))
    folder = data / "users" / "alice" / "v1"
    folder.mkdir(parents=True)
    for name in ("face_id.png", "reference.png"):
        (folder / name).write_bytes(encode_png(group[y0:y1, x0:x1]))
    (data / "users" / "alice" / "CURRENT").write_text("1")
    return data


@contextmanager
def running_orchestrator(config: ServerConfig) -> Iterator[str]:
    """host:port of an orchestrator on loopback with its engines loaded, serving."""
    from easyphoto.server.app import build_app

    app, holder = build_app(config)
    app.start()
    holder.load()
    app.set_serving(True)
    try:
        yield f"127.0.0.1:{app.port}"
    finally:
        app.stop(0)


@contextmanager
def running_trainer(config: TrainerConfig) -> Iterator[TrainerApp]:
    """A trainer on loopback with the default face models."""
    from easyphoto.trainer.app import build_trainer

    app = build_trainer(config, default_face_models())
    app.start()
    try:
        yield app
    finally:
        app.stop(0)


@pytest.fixture(scope="session")
def generator_address(alice_data: Path) -> Iterator[str]:
    """host:port of an orchestrator on loopback, loaded with the tiny models, serving "alice"."""
    from easyphoto.server.app import ServerConfig

    with running_orchestrator(ServerConfig(port=0, models="tiny", data=alice_data)) as address:
        yield address


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainerApp]:
    """A trainer of the module's own, on loopback (a fresh data root, metrics on a free port)."""
    from easyphoto.trainer.app import TrainerConfig

    config = TrainerConfig(port=0, data=tmp_path_factory.mktemp("trainer"), device="cpu", metrics_port=0)
    with running_trainer(config) as app:
        yield app


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A real PostgreSQL server for the suite (started from the distribution's packages)."""
    from postgres import postgres_server

    with postgres_server() as url:
        yield url
