"""The orchestrator on the triton backend when its real tritonserver (CPU) dies mid-request and comes
back: the call in flight ends UNAVAILABLE (typed, short, never a hang), readiness turns false while
liveness stays true, new calls are refused at once, and the same orchestrator serves again once
Triton is back on the same ports. Skipped, saying why, only when the server is not installed."""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from recording_engines import random_user_lora
from triton_fixtures import (
    adapter_dir_beside,
    executions,
    fused_stages,
    kill_server,
    publish_trained_user,
    repository_of,
)

from easyphoto.diffusion.passes import reference_stages
from easyphoto.engines.adapters import SampleAdapter
from easyphoto.engines.backends.torch_backend import TorchBackend
from easyphoto.engines.backends.triton_backend import TritonBackend
from easyphoto.engines.faces.detect import FaceAnalyzer
from easyphoto.engines.faces.models import FaceModels
from easyphoto.engines.interface import ControlInput, Engines
from easyphoto.engines.lora import lora_targets
from easyphoto.engines.models.family import ModelFamily
from easyphoto.engines.roles.diffusion import controlnet_role, describe_roles
from easyphoto.export.triton_repository import write_repository
from easyphoto.export.triton_server import TritonInstall, TritonServer, free_ports, start_server
from easyphoto.fixtures.photos import sample_photo
from easyphoto.imaging.codec import encode_png
from easyphoto.rpc.errors import EngineUnavailable
from easyphoto.rpc.server import LIVENESS, GrpcApp
from easyphoto.rpc.wire import error_details
from easyphoto.server.app import TRITON_POLL_SECONDS, EngineHolder, ServerConfig, build_app
from easyphoto.v1 import generator_pb2, generator_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# How often the orchestrator here asks whether Triton is ready (serving asks every 5 s).
READINESS_INTERVAL = 0.25


@dataclass
class Deployment:
    """A tritonserver on fixed loopback ports and an orchestrator on the triton backend in front."""

    install: TritonInstall
    repository: Path
    ports: dict[str, int]
    logs: Path
    app: GrpcApp
    holder: EngineHolder
    channel: grpc.Channel
    triton: TritonServer | None = None
    starts: int = 0

    def start_triton(self) -> TritonServer:
        try:
            return self._start_triton()
        except RuntimeError:
            # The python backend sometimes aborts while its stubs start, with
            # boost::interprocess::lock_exception (triton-inference-server/server#8882; seen once
            # here, on a restart under load). Such a start is tried once more, as a container's
            # restart policy would; any other failure is the test's.
            assert self.triton is not None
            if self.triton.process.poll() is None or "lock_exception" not in self.triton.log_path.read_text():
                raise
            return self._start_triton()

    def _start_triton(self) -> TritonServer:
        self.starts += 1
        log_path = self.logs / f"tritonserver-{self.starts}.log"
        self.triton = start_server(self.repository, self.install, self.ports, log_path)
        self.triton.wait_ready()
        return self.triton

    def health(self, service: str = "") -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)

    def wait_health(self, status: int, within: float) -> float:
        """Seconds until the orchestrator's readiness (service "") is ``status``."""
        started = time.monotonic()
        while (now := self.health()) != status:
            elapsed = time.monotonic() - started
            assert elapsed < within, f"health still {now} after {elapsed:.1f}s"
            time.sleep(0.05)
        return time.monotonic() - started

    @property
    def generator(self) -> generator_pb2_grpc.GeneratorStub:
        return generator_pb2_grpc.GeneratorStub(self.channel)


@contextmanager
def orchestrator_on_triton(
    install: TritonInstall, export_dir: Path, data: Path, logs: Path, shared_memory: str = "none"
) -> Iterator[Deployment]:
    """An orchestrator on the triton backend, listening (its engines not loaded), in front of Triton's
    free ports (no Triton started); everything stopped at the end."""
    ports = free_ports()
    config = ServerConfig(
        port=0,
        data=data,
        backend="triton",
        triton_url=f"127.0.0.1:{ports['grpc']}",
        export_dir=export_dir,
        adapter_dir=adapter_dir_beside(export_dir),
        triton_shared_memory=shared_memory,
    )
    app, holder = build_app(config)
    channel = grpc.insecure_channel(f"127.0.0.1:{app.port}")
    setup = Deployment(install, repository_of(export_dir), ports, logs, app, holder, channel)
    try:
        app.start()
        yield setup
    finally:
        try:
            channel.close()
            app.stop(0)
            holder.close()
        finally:
            if setup.triton is not None:
                setup.triton.stop()


def serve_once_loaded(setup: Deployment) -> None:
    """What `easyphoto serve` does once the engines are loaded, polling more often."""
    setup.app.set_serving(True)
    setup.app.follow_readiness(setup.holder.backend_ready, interval=READINESS_INTERVAL)


@pytest.fixture(params=["none", "system"], ids=["inline", "shared-memory"])
def deployment(
    request: pytest.FixtureRequest, install: TritonInstall, export_dir: Path, alice_data: Path, tmp_path: Path
) -> Iterator[Deployment]:
    """Inputs inline, or through system shared memory (whose regions a restarted Triton has lost)."""
    with orchestrator_on_triton(install, export_dir, alice_data, tmp_path, request.param) as setup:
        setup.start_triton()
        setup.holder.load()
        serve_once_loaded(setup)
        yield setup


def _request(steps: int, user: str = "alice") -> generator_pb2.GenerateRequest:
    request = generator_pb2.GenerateRequest(
        templates=[encode_png(sample_photo("astronaut"))], user_ids=[user], seed=3
    )
    for name in ("first_pass", "second_pass"):
        getattr(request, name).steps = steps
    return request


def _unavailable(call: Callable[[], object]) -> tuple[dict[str, object], float]:
    """The error details of ``call``, which must fail, and how long it took to."""
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        call()
    details = error_details(raised.value)
    return details, time.monotonic() - started


def _assert_engine_unavailable(details: dict[str, object]) -> None:
    assert details["code"] == "UNAVAILABLE", details
    assert details["reason"] == "ENGINE_UNAVAILABLE", details
    assert len(str(details["message"]).encode()) < 1024, details


def test_triton_killed_mid_request_is_unavailable_and_serving_recovers_when_it_returns(
    deployment: Deployment,
) -> None:
    assert deployment.health() == SERVING
    triton = deployment.triton
    assert triton is not None
    stream = deployment.generator.GenerateStream(_request(steps=40), timeout=60)

    def killed_mid_request() -> None:
        for event in stream:
            if event.HasField("progress") and triton.process.poll() is None:  # Triton runs a step now
                kill_server(triton)
            else:
                raise AssertionError("the Generate finished though Triton was killed")

    details, seconds = _unavailable(killed_mid_request)
    _assert_engine_unavailable(details)
    assert seconds < 10, seconds  # ended by the failed call (measured 1.3 s), not by the 60 s deadline

    # Readiness follows Triton; liveness does not (a restart of the orchestrator would not help).
    deployment.wait_health(NOT_SERVING, within=10)
    assert deployment.health(LIVENESS) == SERVING
    details, seconds = _unavailable(lambda: deployment.generator.Generate(_request(steps=4), timeout=30))
    _assert_engine_unavailable(details)
    assert seconds < 5, seconds

    deployment.start_triton()  # the same ports and repository
    # Measured under a second once Triton answers (gRPC's own reconnect backoff would take many).
    deployment.wait_health(SERVING, within=10)
    assert deployment.health(LIVENESS) == SERVING
    response = deployment.generator.Generate(_request(steps=4), timeout=60)
    face = response.images[0].faces[0]
    assert face.user_id == "alice" and face.HasField("identity_score")


def test_a_shared_memory_region_that_grows_while_triton_is_away_is_registered_once_it_is_back(
    install: TritonInstall, export_dir: Path, face_models: FaceModels, tmp_path: Path
) -> None:
    """A larger input needs its region replaced (unregistered, created, registered): with Triton away
    that fails as UNAVAILABLE, and leaves nothing behind that would make it fail once Triton is back."""
    pnet = face_models.roles["face_pnet"]
    repository = tmp_path / "repository"
    write_repository(export_dir, {"face_pnet": pnet}, repository, only={"face_pnet"})
    ports = free_ports()
    triton = start_server(repository, install, ports, tmp_path / "tritonserver-1.log")
    url = f"127.0.0.1:{ports['grpc']}"
    shared = TritonBackend(url, {"face_pnet": pnet}, shared_memory="system", shared_memory_min_bytes=1)
    small, large = pnet.sample_inputs("min", seed=1), pnet.sample_inputs("opt", seed=2)
    try:
        triton.wait_ready()
        shared.infer("face_pnet", small)
        kill_server(triton)
        for inputs in (small, large):  # the region in place, and one to replace
            with pytest.raises(EngineUnavailable, match="triton"):
                shared.infer("face_pnet", inputs)
        triton = start_server(repository, install, ports, tmp_path / "tritonserver-2.log")
        triton.wait_ready()
        started = time.monotonic()
        while not shared.ready():
            assert time.monotonic() - started < 10, "the backend did not reconnect"
            time.sleep(0.05)
        inline = TritonBackend(url, {"face_pnet": pnet})
        try:
            for inputs in (large, small, large):
                theirs, ours = shared.infer("face_pnet", inputs), inline.infer("face_pnet", inputs)
                assert all(torch.equal(theirs[name], ours[name]) for name in ours)
        finally:
            inline.close()
        assert shared.shared is not None
        prefix = shared.shared._prefix
    finally:
        shared.close()
        triton.stop()
    assert prefix and not [name for name in os.listdir("/dev/shm") if name.startswith(prefix)]


def test_an_orchestrator_started_before_triton_waits_for_it_then_paints_a_trained_user(
    install: TritonInstall, export_dir: Path, faces: FaceAnalyzer, tiny: ModelFamily, tmp_path: Path
) -> None:
    """As in a cluster, where nothing orders the two: the orchestrator stays unready (and alive),
    saying what it waits for, until Triton is up; then it learns which models take users' adapters
    (none answered while Triton was away) and paints a trained user through them."""
    publish_trained_user(tmp_path, faces, tiny)
    with orchestrator_on_triton(install, export_dir, tmp_path, tmp_path) as setup:
        setup.holder.load_in_background(lambda: serve_once_loaded(setup))
        time.sleep(2 * TRITON_POLL_SECONDS)  # asked twice, and still waiting
        assert not setup.holder.loaded.is_set()
        assert setup.health() == NOT_SERVING and setup.health(LIVENESS) == SERVING
        details, _ = _unavailable(lambda: setup.generator.Generate(_request(steps=4, user="amy"), timeout=30))
        _assert_engine_unavailable(details)
        assert "waiting for Triton at" in str(details["message"]), details

        setup.start_triton()
        setup.wait_health(SERVING, within=15)
        response = setup.generator.Generate(_request(steps=4, user="amy"), timeout=60)
        face = response.images[0].faces[0]
        assert face.user_id == "amy" and face.HasField("identity_score")


def test_a_triton_restarted_with_another_repository_is_used_as_it_is_now(
    install: TritonInstall, export_dir: Path, face_models: FaceModels, tmp_path: Path
) -> None:
    """Which optional roles go to Triton is asked again when it comes back: a role its new
    repository lacks runs in process, one it has now runs in Triton (its inference count rises)."""
    pnet, rnet = (face_models.roles[name] for name in ("face_pnet", "face_rnet"))
    repositories = {name: tmp_path / name for name in ("pnet", "rnet")}
    for name, repository in repositories.items():
        write_repository(export_dir, face_models.roles, repository, only={f"face_{name}"})
    ports = free_ports()
    triton = start_server(repositories["pnet"], install, ports, tmp_path / "tritonserver-1.log")
    triton.wait_ready()
    local = TorchBackend(None, "cpu", faces=face_models)
    backend = TritonBackend(
        f"127.0.0.1:{ports['grpc']}", {}, fallback=local, optional={"face_pnet": pnet, "face_rnet": rnet}
    )
    inputs = {role.name: role.sample_inputs("opt", seed=1) for role in (pnet, rnet)}
    try:
        assert backend.ready() and backend.remote_roles == {"face_pnet"}
        kill_server(triton)
        assert not backend.ready()
        triton = start_server(repositories["rnet"], install, ports, tmp_path / "tritonserver-2.log")
        triton.wait_ready()
        started = time.monotonic()
        while not backend.ready():
            assert time.monotonic() - started < 10, "the backend did not reconnect"
            time.sleep(0.05)
        assert backend.remote_roles == {"face_rnet"}
        assert set(backend.roles) >= {"face_pnet", "face_rnet"}
        for role, sample in inputs.items():  # each where it is served now, both as the local one
            theirs, ours = backend.infer(role, sample), local.infer(role, sample)
            assert all(torch.allclose(theirs[k], ours[k], atol=1e-4) for k in ours), role
        assert executions(triton, "face_rnet") == 1
    finally:
        backend.close()
        triton.stop()


def test_a_model_triton_drops_between_probes_runs_without_it_from_the_next_call(
    install: TritonInstall, export_dir: Path, tiny: ModelFamily, face_models: FaceModels, tmp_path: Path
) -> None:
    """Triton unloads the fused stage and a face model while it serves (a model whose instance died
    is unready the same way): the next call of each, long before the next probe, asks Triton again
    and runs without it, the step as its ControlNets and UNet and the face model in process, each
    equal to what Triton's model gave (the step with a trained user's row)."""
    (stage,) = fused_stages(tiny).values()
    kinds, pnet = reference_stages()[0], face_models.roles["face_pnet"]
    nets = {
        name: role
        for name, role in describe_roles(tiny).items()
        if name in {"unet", *map(controlnet_role, kinds)}
    }
    repository = tmp_path / "repository"
    write_repository(
        export_dir,
        {**nets, stage.name: stage, **face_models.roles},
        repository,
        adapter_dir=tmp_path / "adapters",
        only={*nets, stage.name, "face_pnet"},
    )
    explicit = ("--model-control-mode=explicit", "--load-model=*")  # so models can be unloaded
    triton = start_server(repository, install, free_ports(), tmp_path / "tritonserver.log", explicit)
    triton.wait_ready()
    local = TorchBackend(None, "cpu", faces=face_models)  # as the orchestrator's: face models only
    targets = lora_targets(tiny.lora_roots())
    backend = TritonBackend(
        triton.grpc_url, nets, fallback=local, optional={stage.name: stage, "face_pnet": pnet},
        lora_targets=targets, adapter_dir=tmp_path / "adapters",
    )  # fmt: skip
    engines = Engines(backend, tiny.tokenizer, 1.0)
    amy = backend.adapter("amy@v1", lambda: random_user_lora(targets, "amy", 5))
    sample = nets["unet"].sample_inputs("opt", seed=8)
    height, width = (8 * side for side in sample["sample"].shape[2:])
    generator = torch.Generator().manual_seed(9)
    controls = [ControlInput(k, torch.rand(2, 3, height, width, generator=generator), 0.7) for k in kinds]
    step = (sample["sample"], sample["timestep"], sample["encoder_hidden_states"], controls)
    rows = [SampleAdapter(amy, 0.8), None]  # a trained user's row beside a row of no user
    face = pnet.sample_inputs("opt", seed=1)
    try:
        assert backend.ready() and backend.remote_roles == {*nets, stage.name, "face_pnet"}
        fused, detected = engines.predict_noise(*step, rows), backend.infer("face_pnet", face)
        assert executions(triton, stage.name) == 1 and executions(triton, "face_pnet") == 1
        for model in (stage.name, "face_pnet"):
            _unload(triton, model)
        assert torch.allclose(engines.predict_noise(*step, rows), fused, atol=1e-4)
        again = backend.infer("face_pnet", face)
        assert all(torch.allclose(again[name], value, atol=1e-4) for name, value in detected.items())
        assert backend.remote_roles == set(nets)
        assert backend.ready()  # Triton says it is not ready (a model is missing); its nets are
        assert executions(triton, controlnet_role(kinds[0])) == 1  # the step ran as its nets
    finally:
        backend.close()
        triton.stop()


def _unload(server: TritonServer, model: str) -> None:
    """Triton's repository API (explicit model control): ``model`` unloaded."""
    url = f"{server.http_url}/v2/repository/models/{model}/unload"
    with urllib.request.urlopen(urllib.request.Request(url, data=b"{}", method="POST"), timeout=30):
        pass
    while _model_ready(server, model):
        time.sleep(0.05)


def _model_ready(server: TritonServer, model: str) -> bool:
    try:
        with urllib.request.urlopen(f"{server.http_url}/v2/models/{model}/ready", timeout=5) as reply:
            return reply.status == 200
    except OSError:  # 400: not ready, or unknown
        return False
