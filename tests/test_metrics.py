"""The orchestrator's Prometheus metrics and probes, scraped over real HTTP after real gRPC calls."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from easyphoto.fixtures.photos import sample_photo
from easyphoto.imaging.codec import encode_png
from easyphoto.rpc.server import GrpcApp
from easyphoto.server.app import EngineHolder, ServerConfig, build_app
from easyphoto.v1 import generator_pb2, generator_pb2_grpc

GENERATOR = "easyphoto.v1.Generator"


@pytest.fixture(scope="module")
def server(alice_data: Path) -> Iterator[tuple[GrpcApp, EngineHolder]]:
    app, holder = build_app(ServerConfig(port=0, models="tiny", data=alice_data, metrics_port=0))
    app.start()
    yield app, holder
    app.stop(0)


def _get(app: GrpcApp, path: str) -> tuple[int, str]:
    assert app.http is not None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{app.http.port}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _scrape(app: GrpcApp) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, text = _get(app, "/metrics")
    assert status == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _request(user: str) -> generator_pb2.GenerateRequest:
    request = generator_pb2.GenerateRequest(
        templates=[encode_png(sample_photo("astronaut"))], user_ids=[user], seed=7
    )
    for name in ("first_pass", "second_pass"):
        getattr(request, name).steps = 4
        getattr(request, name).strength = 0.5  # 2 denoising steps each
    return request


def test_probes_and_metrics_after_a_good_and_a_failed_generate(server: tuple[GrpcApp, EngineHolder]) -> None:
    app, holder = server
    assert _get(app, "/healthz")[0] == 200 and _get(app, "/nope")[0] == 404
    assert _get(app, "/readyz")[0] == 503  # models not loaded yet
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        ready = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        alive = health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=5).status
    assert (ready, alive) == (
        health_pb2.HealthCheckResponse.NOT_SERVING,
        health_pb2.HealthCheckResponse.SERVING,
    )
    holder.load()
    app.set_serving(True)
    assert _get(app, "/readyz")[0] == 200
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = generator_pb2_grpc.GeneratorStub(channel)
        assert len(stub.Generate(_request("alice"), timeout=120).images) == 1
        with pytest.raises(grpc.RpcError) as unary:
            stub.Generate(_request("nobody"), timeout=60)
        with pytest.raises(grpc.RpcError) as streamed:
            list(stub.GenerateStream(_request("nobody"), timeout=60))
    assert unary.value.code() == streamed.value.code() == grpc.StatusCode.NOT_FOUND

    samples = _scrape(app)

    def value(name: str, **labels: str) -> float:
        return samples.get((name, frozenset(labels.items())), 0.0)

    unary_labels = {"grpc_service": GENERATOR, "grpc_method": "Generate", "grpc_type": "unary"}
    assert value("grpc_server_started_total", **unary_labels) == 2
    assert value("grpc_server_handled_total", **unary_labels, grpc_code="OK") == 1
    assert value("grpc_server_handled_total", **unary_labels, grpc_code="NOT_FOUND") == 1
    assert value("grpc_server_handling_seconds_count", **unary_labels) == 2
    stream_labels = {"grpc_service": GENERATOR, "grpc_method": "GenerateStream", "grpc_type": "server_stream"}
    assert value("grpc_server_handled_total", **stream_labels, grpc_code="NOT_FOUND") == 1
    assert value("grpc_server_handled_total", **stream_labels, grpc_code="OK") == 0

    # Only the good request produced an image: one observation per stage it ran, none for the others.
    for stage in ("detect", "lora_switch", "first_diffusion", "second_diffusion", "score", "total"):
        assert value("easyphoto_generate_stage_seconds_count", stage=stage) == 1, stage
    assert value("easyphoto_generate_stage_seconds_count", stage="seam_pass") == 0  # one face
    first, total = (
        value("easyphoto_generate_stage_seconds_sum", stage=s) for s in ("first_diffusion", "total")
    )
    assert 0 < first < total
    assert value("easyphoto_denoising_steps_total", stage="first_diffusion") == 2
    assert value("easyphoto_denoising_steps_total", stage="second_diffusion") == 2
    assert value("easyphoto_denoising_steps_per_second_count") == 1
    assert value("easyphoto_denoising_steps_per_second_sum") > 0
    assert value("easyphoto_images_generated_total") == 1
    assert value("easyphoto_faces_painted_total") == 1


def test_a_stream_the_client_cancels_is_counted_cancelled(server: tuple[GrpcApp, EngineHolder]) -> None:
    app, holder = server
    if not app.serving:  # when run alone
        holder.load()
        app.set_serving(True)
    labels = {"grpc_service": GENERATOR, "grpc_method": "GenerateStream", "grpc_type": "server_stream"}
    key = ("grpc_server_handled_total", frozenset({**labels, "grpc_code": "CANCELLED"}.items()))
    before = _scrape(app).get(key, 0.0)
    request = _request("alice")
    request.first_pass.steps = 50  # long enough to cancel after the first step
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        call = generator_pb2_grpc.GeneratorStub(channel).GenerateStream(request, timeout=60)
        assert next(call).WhichOneof("event") == "progress"
        call.cancel()
    deadline = time.monotonic() + 30
    while _scrape(app).get(key, 0.0) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _scrape(app).get(key, 0.0) == before + 1


def test_each_app_has_its_own_registry(server: tuple[GrpcApp, EngineHolder]) -> None:
    other, _ = build_app(ServerConfig(port=0, metrics_port=0))  # the global registry would refuse this
    other.start()
    try:
        samples = _scrape(other)
    finally:
        other.stop(0)
    assert samples[("easyphoto_images_generated_total", frozenset())] == 0
    assert not any(labels and ("grpc_method", "Generate") in labels for _, labels in samples)


def test_in_flight_and_waiting_requests_are_gauges_the_autoscaler_can_read() -> None:
    import threading

    from prometheus_client import CollectorRegistry

    from easyphoto.server.metrics import GeneratorMetrics
    from easyphoto.server.service import _Admission

    registry = CollectorRegistry()
    metrics, admission = GeneratorMetrics(registry), _Admission(max_running=1, max_waiting=4)
    metrics.follow_admission(lambda: admission.running, lambda: admission.waiting)
    holding, release = threading.Event(), threading.Event()

    def run() -> None:
        with admission.slot(lambda: None):
            holding.set()
            release.wait(10)

    first, second = threading.Thread(target=run), threading.Thread(target=run)
    first.start()
    holding.wait(10)
    second.start()
    deadline = time.monotonic() + 10
    while admission.waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert registry.get_sample_value("easyphoto_generate_in_flight") == 1
    assert registry.get_sample_value("easyphoto_generate_waiting") == 1
    release.set()
    first.join()
    second.join()
    assert registry.get_sample_value("easyphoto_generate_in_flight") == 0
    assert registry.get_sample_value("easyphoto_generate_waiting") == 0
