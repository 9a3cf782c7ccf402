"""Generate and GenerateStream over a real gRPC server on loopback (tiny models, real face models)."""

from __future__ import annotations

import io
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from easyphoto.engines.models.family import ModelFamily
from easyphoto.fixtures.photos import sample_photo
from easyphoto.fixtures.users import publish_photo_user, random_lora
from easyphoto.imaging.codec import encode_png
from easyphoto.rpc.deadline import request_deadline, time_left
from easyphoto.rpc.errors import DeadlineExceeded
from easyphoto.rpc.server import GrpcApp, Service
from easyphoto.rpc.wire import error_details
from easyphoto.server.pipeline import Generation
from easyphoto.server.service import GeneratorService
from easyphoto.users.store import LORA_FILE, UserStore
from easyphoto.v1 import generator_pb2, generator_pb2_grpc


@pytest.fixture(scope="module")
def stub(generator_address: str) -> Iterator[generator_pb2_grpc.GeneratorStub]:
    with grpc.insecure_channel(generator_address) as channel:
        yield generator_pb2_grpc.GeneratorStub(channel)


def _request(template: np.ndarray, users: list[str], **fields: object) -> generator_pb2.GenerateRequest:
    request = generator_pb2.GenerateRequest(
        templates=[encode_png(template)], user_ids=users, seed=7, **fields
    )
    for name in ("first_pass", "second_pass"):
        getattr(request, name).steps = 4
        getattr(request, name).strength = 0.5
    return request


def test_generate_returns_the_image_scores_and_timings(stub: generator_pb2_grpc.GeneratorStub) -> None:
    template = sample_photo("astronaut")
    response = stub.Generate(_request(template, ["alice"], return_intermediates=True), timeout=120)
    assert len(response.images) == 1
    image = response.images[0]
    decoded = np.asarray(Image.open(io.BytesIO(image.png)))
    assert decoded.shape == template.shape and image.seed == 7
    assert [f.user_id for f in image.faces] == ["alice"]
    assert image.faces[0].HasField("identity_score") and len(image.faces[0].face.landmarks) == 5
    assert {t.stage for t in response.timings} >= {"detect", "first_diffusion", "second_diffusion", "request"}
    skipped = {t.stage: t.reason for t in response.timings if t.skipped}
    assert skipped == {"super_resolution": "no enhancer model is loaded (--face-enhancer)"}
    assert "random weights" in response.model_family
    assert any(i.name == "face0_inpaint_mask" for i in image.intermediates)


def test_stream_sends_progress_then_one_result(stub: generator_pb2_grpc.GeneratorStub) -> None:
    events = list(stub.GenerateStream(_request(sample_photo("astronaut"), ["alice"]), timeout=120))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "result" and kinds.count("result") == 1
    progress = [e.progress for e in events if e.WhichOneof("event") == "progress"]
    assert [p.stage for p in progress] == ["first_diffusion"] * 2 + ["second_diffusion"] * 2
    assert [p.step for p in progress] == [1, 2, 1, 2] and all(p.total_steps == 2 for p in progress)
    # The whole request's steps are known up front: 2 passes x (4 steps x strength 0.5) for one face.
    assert [p.request_step for p in progress] == [1, 2, 3, 4]
    assert all(p.request_total_steps == 4 and p.template_index == 0 for p in progress)


def _junk() -> generator_pb2.GenerateRequest:
    return generator_pb2.GenerateRequest(templates=[b"junk"], user_ids=["alice"])


ASTRONAUT = "astronaut"


@pytest.mark.parametrize(
    ("make", "code", "reason", "field"),
    [
        (_junk, "INVALID_ARGUMENT", "IMAGE_UNREADABLE", "templates[0]"),
        (lambda: _request(sample_photo(ASTRONAUT), ["nobody"]), "NOT_FOUND", "UNKNOWN_USER", "user_ids[0]"),
        (
            lambda: _request(sample_photo("coffee"), ["alice"]),
            "FAILED_PRECONDITION",
            "NO_FACE",
            "templates[0]",
        ),
        (
            lambda: _request(sample_photo(ASTRONAUT), ["alice"] * 2),
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
            "user_ids",
        ),
        (
            lambda: _request(sample_photo(ASTRONAUT), ["alice"], lora_weight=5.0),
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
            "lora_weight",
        ),
        (  # this orchestrator was given no --lcm-lora
            lambda: _request(sample_photo(ASTRONAUT), ["alice"], lcm_accelerate=True),
            "FAILED_PRECONDITION",
            "MODEL_MISSING",
            "lcm_accelerate",
        ),
    ],
)
def test_bad_requests_get_typed_statuses(stub, make, code: str, reason: str, field: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(make(), timeout=60)
    details = error_details(info.value)
    assert (details["code"], details["reason"]) == (code, reason)
    assert field in details["fields"]


def test_deadline_is_honoured_mid_loop(stub: generator_pb2_grpc.GeneratorStub) -> None:
    request = generator_pb2.GenerateRequest(
        templates=[encode_png(sample_photo("astronaut"))], user_ids=["alice"]
    )
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(request, timeout=1.5)  # the default 50-step pass takes several seconds here
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 10
    # The server stopped: the next request is served promptly.
    response = stub.Generate(_request(sample_photo("astronaut"), ["alice"]), timeout=60)
    assert len(response.images) == 1


class _BlockingOrchestrator:
    """Holds the engines until released, as a long generation would."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def generate(self, template, user_ids, options, seed, on_progress, raise_if_stopped, field_name):  # type: ignore[no-untyped-def]
        self.entered.set()
        self.release.wait(60)
        return Generation(template, [], seed, {}, [])


def _serve(service: GeneratorService) -> GrpcApp:
    app = GrpcApp(
        [
            Service(
                service,
                generator_pb2_grpc.add_GeneratorServicer_to_server,
                generator_pb2.DESCRIPTOR.services_by_name["Generator"].full_name,
            )
        ],
        host="127.0.0.1",
        port=0,
    )
    app.start()
    return app


class _DeadlineRecorder:
    """Records the timeout a remote engine call made during generation would get."""

    def __init__(self) -> None:
        self.timeouts: list[float] = []

    def generate(self, template, user_ids, options, seed, on_progress, raise_if_stopped, field_name):  # type: ignore[no-untyped-def]
        self.timeouts.append(time_left(1000.0))
        return Generation(template, [], seed, {}, [])


def test_engine_calls_get_the_requests_deadline() -> None:
    orchestrator = _DeadlineRecorder()
    app = _serve(GeneratorService(lambda: orchestrator, lambda: "fake"))  # type: ignore[arg-type, return-value]
    request = _request(sample_photo("astronaut"), [])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = generator_pb2_grpc.GeneratorStub(channel)
            stub.Generate(request, timeout=20)
            stub.Generate(request)
            list(stub.GenerateStream(request, timeout=30))
    finally:
        app.stop(0)
    bounded, unbounded, streamed = orchestrator.timeouts
    # gRPC's timeout header rounds up a little (30.08 s seen for 30 s).
    assert 0 < bounded <= 21 and unbounded == 1000.0 and 21 < streamed <= 31
    with pytest.raises(DeadlineExceeded), request_deadline(0.0):
        time_left(1000.0)  # a passed deadline stops the call before it is sent


def test_waiting_requests_leave_at_their_deadline_and_a_full_line_is_refused() -> None:
    orchestrator = _BlockingOrchestrator()
    service = GeneratorService(lambda: orchestrator, lambda: "fake", max_waiting=1, max_running=1)  # type: ignore[arg-type, return-value]
    app = _serve(service)
    request = _request(sample_photo("astronaut"), [])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = generator_pb2_grpc.GeneratorStub(channel)
            running = stub.Generate.future(request, timeout=60)
            assert orchestrator.entered.wait(30)
            waiting = stub.Generate.future(request, timeout=1.5)
            deadline = time.monotonic() + 10
            while service._admission.waiting < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(grpc.RpcError) as info:
                stub.Generate(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error_details(info.value)["reason"] == "OVERLOADED"
            assert waiting.exception(timeout=10).code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[union-attr]
            deadline = time.monotonic() + 5
            while service._admission.waiting and time.monotonic() < deadline:
                time.sleep(0.01)
            assert service._admission.waiting == 0  # the server let go of it, not only the client
            orchestrator.release.set()
            assert len(running.result(timeout=30).images) == 1
    finally:
        orchestrator.release.set()
        app.stop(0)


class _CountingOrchestrator(_BlockingOrchestrator):
    """Counts the generations running at once."""

    def __init__(self) -> None:
        super().__init__()
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def generate(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            return super().generate(*args, **kwargs)
        finally:
            with self._lock:
                self.running -= 1


def test_several_requests_run_at_once_up_to_max_running() -> None:
    orchestrator = _CountingOrchestrator()
    service = GeneratorService(lambda: orchestrator, lambda: "fake", max_waiting=4, max_running=2)  # type: ignore[arg-type, return-value]
    app = _serve(service)
    request = _request(sample_photo("astronaut"), [])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = generator_pb2_grpc.GeneratorStub(channel)
            calls = [stub.Generate.future(request, timeout=60) for _ in range(3)]
            deadline = time.monotonic() + 10
            while (
                orchestrator.running < 2 or service._admission.waiting < 1
            ) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert orchestrator.running == 2 and service._admission.waiting == 1  # the third waits
            orchestrator.release.set()
            assert all(len(call.result(timeout=30).images) == 1 for call in calls)
    finally:
        orchestrator.release.set()
        app.stop(0)
    assert orchestrator.most == 2


def test_concurrent_generates_share_engine_calls_and_equal_their_runs_alone(alice_data) -> None:  # type: ignore[no-untyped-def]
    import urllib.request

    from easyphoto.server.app import ServerConfig, build_app

    app, holder = build_app(ServerConfig(port=0, models="tiny", data=alice_data, metrics_port=0))
    app.start()
    try:
        holder.load()
        app.set_serving(True)
        requests = [_request(sample_photo("astronaut"), ["alice"]) for _ in range(3)]
        for seed, request in enumerate(requests):
            request.seed = seed
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = generator_pb2_grpc.GeneratorStub(channel)
            together = [stub.Generate.future(request, timeout=120) for request in requests]
            together_images = [_pixels(call.result(timeout=120)) for call in together]
            with urllib.request.urlopen(f"http://127.0.0.1:{app.http.port}/metrics", timeout=5) as reply:  # type: ignore[union-attr]
                metrics = reply.read().decode()
            alone = [_pixels(stub.Generate(request, timeout=120)) for request in requests]
    finally:
        app.stop(0)
        holder.close()
    shared = _metric(metrics, 'easyphoto_engine_call_passes_bucket{le="1.0",phase="denoise"}')
    calls = _metric(metrics, 'easyphoto_engine_call_passes_count{phase="denoise"}')
    assert calls > shared  # some denoising calls carried steps of more than one request
    for got, expected in zip(together_images, alone, strict=True):
        mse = float(np.mean((got.astype(float) - expected.astype(float)) ** 2))
        assert mse == 0 or 10 * np.log10(255**2 / mse) > 35  # the bar for a batched twin


def test_a_user_whose_adapter_cannot_load_fails_alone(
    alice_data: Path, tmp_path: Path, tiny: ModelFamily
) -> None:
    """Three users' requests arrive together; the one whose LoRA file is corrupt is refused,
    naming that user, and the others paint what they paint alone."""
    from easyphoto.server.app import ServerConfig, build_app

    data = tmp_path / "data"
    shutil.copytree(alice_data, data)
    store = UserStore(data)
    face = store.load("alice").face_id
    publish_photo_user(store, "dave", face, random_lora(tiny, "dave", rank=4, seed=1))

    def corrupt(folder: Path) -> None:
        for name in ("face_id.png", "reference.png"):
            (folder / name).write_bytes(encode_png(face))
        (folder / LORA_FILE).write_bytes(b"not a safetensors file")

    store.publish("mallory", corrupt, {})
    app, holder = build_app(ServerConfig(port=0, models="tiny", data=data, metrics_port=0))
    app.start()
    try:
        holder.load()
        app.set_serving(True)
        requests = {
            user: _request(sample_photo("astronaut"), [user]) for user in ("alice", "dave", "mallory")
        }
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = generator_pb2_grpc.GeneratorStub(channel)
            calls = {user: stub.Generate.future(request, timeout=120) for user, request in requests.items()}
            with pytest.raises(grpc.RpcError) as refused:
                calls["mallory"].result(timeout=120)
            together = {user: _pixels(calls[user].result(timeout=120)) for user in ("alice", "dave")}
            alone = {user: _pixels(stub.Generate(requests[user], timeout=120)) for user in together}
    finally:
        app.stop(0)
        holder.close()
    details = error_details(refused.value)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "'mallory' v1: cannot read LoRA file" in details["message"]
    assert details["fields"].keys() == {"user_ids[0]"}
    assert not np.array_equal(together["alice"], together["dave"])  # dave's adapter painted
    for user, got in together.items():
        mse = float(np.mean((got.astype(float) - alone[user].astype(float)) ** 2))
        assert mse == 0 or 10 * np.log10(255**2 / mse) > 35, user


def _pixels(response: generator_pb2.GenerateResponse) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(response.images[0].png)).convert("RGB"))


def _metric(text: str, name: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(name))
    return float(line.rsplit(" ", 1)[1])


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_a_cancelled_or_late_request_frees_its_slot_and_its_batch_seat(alice_data: Any, how: str) -> None:
    """One slot: the request that gave up must leave the admission and the step loop at its next
    step, so the next request runs at once rather than behind a pass nobody waits for."""
    import urllib.request

    from easyphoto.server.app import ServerConfig, build_app

    app, holder = build_app(
        ServerConfig(port=0, models="tiny", data=alice_data, metrics_port=0, max_running=1)
    )
    app.start()
    steps = holder.load().steps
    app.set_serving(True)
    assert app.http is not None

    def in_flight() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{app.http.port}/metrics", timeout=10) as reply:
            found = re.search(r"^easyphoto_generate_in_flight (\S+)$", reply.read().decode(), re.MULTILINE)
        assert found is not None
        return float(found.group(1))

    try:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = generator_pb2_grpc.GeneratorStub(channel)
            long = generator_pb2.GenerateRequest(
                templates=[encode_png(sample_photo("astronaut"))], user_ids=["alice"]
            )
            long.first_pass.steps = 200  # far longer than this test
            call = stub.GenerateStream(long, timeout=3.0 if how == "deadline" else 120)
            next(iter(call))  # a step ran: it holds the slot and a seat in the loop
            assert in_flight() == 1 and steps.pending == 1
            if how == "cancel":
                call.cancel()
            with pytest.raises(grpc.RpcError) as info:
                list(call)
            expected = grpc.StatusCode.CANCELLED if how == "cancel" else grpc.StatusCode.DEADLINE_EXCEEDED
            assert info.value.code() == expected
            deadline = time.monotonic() + 20
            while (in_flight(), steps.pending) != (0, 0) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert (in_flight(), steps.pending) == (0, 0)
            response = stub.Generate(_request(sample_photo("astronaut"), ["alice"]), timeout=60)
            assert [f.user_id for f in response.images[0].faces] == ["alice"]
    finally:
        app.stop(0)
        holder.close()
