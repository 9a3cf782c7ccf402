"""What the tests against a real CPU tritonserver share (``conftest.py`` registers this module as a
plugin): the server's install and the tiny family exported and written as a Triton repository, once
per session (the export takes minutes on 2 cores). A test that needs them is skipped, saying why,
only when the server is not installed (``make triton-setup``)."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest
from recording_engines import random_user_lora

from easyphoto.diffusion.passes import reference_stages
from easyphoto.engines.faces.detect import FaceAnalyzer
from easyphoto.engines.faces.models import FaceModels, default_face_models
from easyphoto.engines.lora import lora_targets, save_lora
from easyphoto.engines.models.family import ModelFamily
from easyphoto.engines.roles.catalogue import RoleCatalogue
from easyphoto.engines.roles.description import RoleDescription
from easyphoto.engines.roles.diffusion import describe_roles, describe_stage
from easyphoto.export.onnx_export import export_all
from easyphoto.export.triton_repository import write_repository
from easyphoto.export.triton_server import TritonInstall, TritonServer, TritonUnavailable, find_install
from easyphoto.fixtures.photos import sample_photo
from easyphoto.imaging.codec import encode_png
from easyphoto.imaging.geometry import grow_box, int_box

REPO_ROOT = Path(__file__).resolve().parent.parent
# How the python backend names the region a stub shares with its server (an argument of the stub).
STUB_REGION_PREFIX = "triton_python_backend_shm_region_"


@pytest.fixture(scope="session")
def face_models() -> FaceModels:
    return default_face_models()


@pytest.fixture(scope="session")
def install(tmp_path_factory: pytest.TempPathFactory) -> TritonInstall:
    try:
        return find_install(REPO_ROOT / ".venv-triton", tmp_path_factory.mktemp("tritonserver"))
    except TritonUnavailable as why:
        pytest.skip(f"the CPU tritonserver is not installed: {why}")


@pytest.fixture(scope="session")
def export_dir(
    install: TritonInstall,
    tiny: ModelFamily,
    face_models: FaceModels,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """The tiny family exported (with its manifest and graphs with LoRA inputs) and written as a CPU
    Triton repository beside it (:func:`repository_of`), whose models read users' adapters from
    :func:`adapter_dir_beside`."""
    root = tmp_path_factory.mktemp("triton")
    catalogue = RoleCatalogue(describe_roles(tiny), fused_stages(tiny), face_models.roles)
    exported = export_all(catalogue, root / "export", tiny, fp16_graphs=False)  # CPU Triton reads fp32
    assert all(result.ok for result in exported), [(r.role, r.max_abs_diff) for r in exported if not r.ok]
    write_repository(
        root / "export", catalogue.roles, repository_of(root / "export"), adapter_dir=root / "adapters"
    )
    return root / "export"


def repository_of(export_dir: Path) -> Path:
    """The Triton model repository written beside the export."""
    return export_dir.parent / "repository"


def adapter_dir_beside(export_dir: Path) -> Path:
    """Where the repository's models read users' adapters (the orchestrator writes them there)."""
    return export_dir.parent / "adapters"


def fused_stages(tiny: ModelFamily) -> dict[str, RoleDescription]:
    """The fused step of the first pass only: the second pass's steps call its ControlNets and the
    UNet, so a whole Generate goes both ways (and the session's export is 40 s shorter)."""
    stage = describe_stage(tiny, reference_stages()[0])
    return {stage.name: stage}


def publish_trained_user(root: Path, faces: FaceAnalyzer, tiny: ModelFamily, user_id: str = "amy") -> None:
    """A trained user in the data root ``root``: face-id and reference images (a face of the group
    photo), and a random rank-4 LoRA on every targeted layer."""
    group = sample_photo("group")
    x0, y0, x1, y1 = int_box(grow_box(faces.detect(group)[1].box, 1.8, group.shape[1], group.shape[0]))
    folder = root / "users" / user_id / "v1"
    folder.mkdir(parents=True)
    for name in ("face_id.png", "reference.png"):
        (folder / name).write_bytes(encode_png(group[y0:y1, x0:x1]))
    lora = random_user_lora(lora_targets(tiny.lora_roots()), user_id, sum(map(ord, user_id)))
    save_lora(lora, folder / "lora.safetensors")
    (root / "users" / user_id / "CURRENT").write_text("1")


def inferences(server: TritonServer, model: str) -> int:
    """Triton's count of ``model``'s inferences (rows), once its statistics have settled."""
    return server.settled_statistics()[model].inferences


def executions(server: TritonServer, model: str) -> int:
    """Triton's count of ``model``'s executions (model runs), once its statistics have settled."""
    return server.settled_statistics()[model].executions


def kill_server(server: TritonServer) -> None:
    """SIGKILLs tritonserver, as a crash would, then what it leaves behind, as the end of its
    container would: its python backend stubs (one was seen still running minutes later) and their
    shared memory regions in /dev/shm (a MiB or more each, removed only by a server that stops)."""
    stubs = {pid: _arguments(pid) for pid in _children(server.process.pid)}
    server.process.kill()
    server.process.wait(10)
    for pid, arguments in stubs.items():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        for region in (a for a in arguments if a.startswith(STUB_REGION_PREFIX)):
            (Path("/dev/shm") / region).unlink(missing_ok=True)


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, ...
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def _arguments(pid: int) -> list[str]:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []
