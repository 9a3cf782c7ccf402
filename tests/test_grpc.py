"""The orchestrator's gRPC server on a loopback port: health, reflection, typed errors."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from easyphoto.rpc.errors import ImageUnreadable
from easyphoto.rpc.server import to_status
from easyphoto.rpc.wire import error_details
from easyphoto.server.app import ServerConfig, build_app
from easyphoto.v1 import generator_pb2, generator_pb2_grpc, trainer_pb2, users_pb2


@pytest.fixture(scope="module")
def channel() -> Iterator[grpc.Channel]:
    app, holder = build_app(ServerConfig(port=0, models="tiny"))
    app.start()
    holder.load_in_background(lambda: app.set_serving(True))
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as chan:
        yield chan
    app.stop(0)


def _health(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_turns_serving_when_models_load(channel: grpc.Channel) -> None:
    deadline = time.monotonic() + 60
    while _health(channel, "easyphoto.v1.Generator") != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, "never became SERVING"
        time.sleep(0.1)
    assert _health(channel, "") == health_pb2.HealthCheckResponse.SERVING


def test_health_follows_readiness_while_running() -> None:
    from easyphoto.rpc.server import GrpcApp

    backend_up = [True]
    app = GrpcApp([], host="127.0.0.1", port=0)
    app.start()
    app.set_serving(True)
    app.follow_readiness(lambda: backend_up[0], interval=0.02)

    def wait_for(status: int) -> int:
        deadline = time.monotonic() + 10
        while (now := _health(chan, "")) != status and time.monotonic() < deadline:
            time.sleep(0.02)
        return now

    try:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as chan:
            backend_up[0] = False  # e.g. Triton restarting
            assert (
                wait_for(health_pb2.HealthCheckResponse.NOT_SERVING)
                == health_pb2.HealthCheckResponse.NOT_SERVING
            )
            backend_up[0] = True
            assert wait_for(health_pb2.HealthCheckResponse.SERVING) == health_pb2.HealthCheckResponse.SERVING
    finally:
        app.stop(0)
    time.sleep(0.1)
    assert not app.serving  # a stopped app never turns ready again


def test_unknown_service_health_is_not_found(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _health(channel, "no.such.Service")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_our_services(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in next(iter(responses)).list_services_response.service}
    assert {"easyphoto.v1.Generator", "easyphoto.v1.Serving", "grpc.health.v1.Health"} <= names


def test_generate_without_templates_names_the_field(channel: grpc.Channel) -> None:
    stub = generator_pb2_grpc.GeneratorStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(generator_pb2.GenerateRequest(), timeout=30)
    details = error_details(info.value)
    assert details["code"] == "INVALID_ARGUMENT" and "templates" in details["fields"]


def test_typed_error_becomes_status_with_field_and_reason() -> None:
    status = to_status(ImageUnreadable("not a readable image", field="templates[0]"))
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert status.details == "not a readable image"
    metadata = dict(status.trailing_metadata)
    assert "grpc-status-details-bin" in metadata


def test_api_has_every_option_with_presence() -> None:
    request = generator_pb2.GenerateRequest()
    assert not request.first_pass.HasField("strength")  # unset is distinguishable from 0
    request.first_pass.strength = 0.0
    assert request.first_pass.HasField("strength")
    options = trainer_pb2.TrainingOptions.DESCRIPTOR.fields_by_name
    for name in ("rank", "alpha", "max_train_steps", "validation_strength", "merge_top_k"):
        assert options[name].has_presence, name
    methods = {m.name for m in users_pb2.DESCRIPTOR.services_by_name["Users"].methods}
    assert methods == {"GetUser", "ListUsers", "DeleteUser"}
    trainer = {m.name for m in trainer_pb2.DESCRIPTOR.services_by_name["Trainer"].methods}
    assert trainer == {"CreateTrainingJob", "GetJob", "WatchJob", "CancelJob", "ListJobs"}


def test_a_huge_user_id_gets_a_typed_error_the_client_can_read(channel: grpc.Channel) -> None:
    """Echoed whole, a 100 kB id made the trailing metadata larger than gRPC clients accept."""
    from easyphoto.fixtures.photos import sample_photo
    from easyphoto.imaging.codec import encode_png

    stub = generator_pb2_grpc.GeneratorStub(channel)
    request = generator_pb2.GenerateRequest(
        templates=[encode_png(sample_photo("astronaut"))], user_ids=["x" * 100_000]
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(request, timeout=60)
    details = error_details(info.value)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert details["code"] == "INVALID_ARGUMENT" and "user_ids[0]" in details["fields"]
    assert len(info.value.details()) < 1024
    trailer = dict(info.value.trailing_metadata())["grpc-status-details-bin"]
    assert len(trailer) < 2048


def test_every_text_of_a_status_is_clipped() -> None:
    from easyphoto.rpc.errors import UnknownUser

    error = UnknownUser("no user " + "y" * 50_000, field="f" * 5000, metadata={"user_id": "z" * 50_000})
    status = to_status(error)
    assert len(status.details) < 500 and status.details.endswith("more characters)")
    assert len(dict(status.trailing_metadata)["grpc-status-details-bin"]) < 1500
