"""SIGTERM at any moment of a service's life ends it with status 0 and no abort: while it imports,
while its models load, and under load, where the request in flight is drained to its answer."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
from processes import ServiceProcess, trainer_process

from easyphoto.fixtures.photos import sample_photo
from easyphoto.imaging.codec import encode_png
from easyphoto.v1 import generator_pb2, generator_pb2_grpc

SERVE = ["--models", "tiny", "--device", "cpu", "--no-metrics"]
STARTING = "while starting: exiting before serving anything"


def _serve(data: Path, log: Path) -> ServiceProcess:
    return ServiceProcess("serve", ["--data", str(data), *SERVE], log)


def _assert_clean(process: ServiceProcess, status: int) -> str:
    output = process.output()
    assert status == 0, output[-3000:]
    assert "terminate called" not in output and "Traceback" not in output, output[-3000:]
    return output


def test_sigterm_while_importing_exits_zero(alice_data: Path, tmp_path: Path) -> None:
    process = _serve(alice_data, tmp_path / "serve.log")
    process.wait_catching()  # the handler is the first thing: torch and the server still import
    assert STARTING in _assert_clean(process, process.terminate())


def test_sigterm_while_the_models_load_exits_zero(alice_data: Path, tmp_path: Path) -> None:
    process = _serve(alice_data, tmp_path / "serve.log")
    process.wait_for_line("orchestrator listening")  # the models load after the port opens
    output = _assert_clean(process, process.terminate())
    assert "SIGTERM: draining requests, then stopping" in output


def test_sigterm_under_load_drains_the_request_in_flight(alice_data: Path, tmp_path: Path) -> None:
    process = _serve(alice_data, tmp_path / "serve.log")
    process.wait_serving()
    request = generator_pb2.GenerateRequest(
        templates=[encode_png(sample_photo("astronaut"))], user_ids=["alice"]
    )
    for name in ("first_pass", "second_pass"):
        getattr(request, name).steps = 12
    events: list[generator_pb2.GenerateEvent] = []
    started = threading.Event()

    def call() -> None:
        with grpc.insecure_channel(process.address) as channel:
            for event in generator_pb2_grpc.GeneratorStub(channel).GenerateStream(request, timeout=120):
                events.append(event)
                started.set()

    client = threading.Thread(target=call)
    client.start()
    assert started.wait(60), process.output()[-3000:]  # a denoising step is done: it is running
    status = process.terminate()
    client.join(60)
    _assert_clean(process, status)
    assert events[-1].WhichOneof("event") == "result" and len(events[-1].result.images) == 1


def test_the_trainer_exits_zero_on_sigterm_starting_or_serving(tmp_path: Path) -> None:
    starting = trainer_process(tmp_path, tmp_path / "starting.log", "--no-metrics")
    starting.wait_catching()
    assert STARTING in _assert_clean(starting, starting.terminate())
    serving = trainer_process(tmp_path, tmp_path / "serving.log", "--no-metrics")
    serving.wait_serving()
    assert "SIGTERM: stopping" in _assert_clean(serving, serving.terminate())
