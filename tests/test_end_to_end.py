"""Both services on loopback sharing one data root: train a user, the trainer tells the orchestrator,
Generate paints that user."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from easyphoto.engines.faces.models import default_face_models
from easyphoto.fixtures.photos import person_photos, sample_photo
from easyphoto.imaging.codec import encode_png
from easyphoto.rpc.wire import error_details
from easyphoto.server.app import ServerConfig, build_app
from easyphoto.trainer.app import TrainerApp, TrainerConfig, build_trainer
from easyphoto.v1 import generator_pb2, generator_pb2_grpc, trainer_pb2, trainer_pb2_grpc

TRAINING = trainer_pb2.TrainingOptions(
    rank=4, alpha=4.0, resolution=64, gradient_accumulation_steps=1, steps_per_photo=1, max_train_steps=2,
    validation_interval=2, validation_steps=2, validation_templates=1, seed=3,
)  # fmt: skip


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[grpc.Channel, grpc.Channel]]:
    data: Path = tmp_path_factory.mktemp("shared-data")
    server, holder = build_app(ServerConfig(port=0, data=data, device="cpu"))
    server.start()
    holder.load()
    server.set_serving(True)
    trainer: TrainerApp = build_trainer(
        TrainerConfig(port=0, data=data, device="cpu", orchestrator=f"127.0.0.1:{server.port}"),
        default_face_models(),
    )
    trainer.start()
    with (
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as orchestrator,
        grpc.insecure_channel(f"127.0.0.1:{trainer.app.port}") as training,
    ):
        yield orchestrator, training
    trainer.stop(0)
    server.stop(0)


def test_a_trained_user_is_refreshed_and_generated(services: tuple[grpc.Channel, grpc.Channel]) -> None:
    orchestrator, training = services
    stub = trainer_pb2_grpc.TrainerStub(training)
    photos = [encode_png(p) for p in person_photos()[:2]]
    created = stub.CreateTrainingJob(
        trainer_pb2.CreateTrainingJobRequest(user_id="zoe", photos=photos, options=TRAINING), timeout=30
    )
    early = generator_pb2.GenerateRequest(templates=[encode_png(sample_photo("astronaut"))], user_ids=["zoe"])
    with pytest.raises(grpc.RpcError) as training_now:  # the first job is queued or running
        generator_pb2_grpc.GeneratorStub(orchestrator).Generate(early, timeout=60)
    details = error_details(training_now.value)
    assert (details["code"], details["reason"]) == ("FAILED_PRECONDITION", "USER_NOT_READY")
    assert created.job_id in details["message"]
    for job in stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=created.job_id), timeout=300):
        if job.state not in (trainer_pb2.JOB_STATE_QUEUED, trainer_pb2.JOB_STATE_RUNNING):
            break
    assert job.state == trainer_pb2.JOB_STATE_SUCCEEDED, job.error
    assert not [w for w in job.warnings if "serving side" in w]  # RefreshUser answered

    request = generator_pb2.GenerateRequest(
        templates=[encode_png(sample_photo("astronaut"))], user_ids=["zoe"], seed=1
    )
    for name in ("first_pass", "second_pass"):
        getattr(request, name).steps = 4
    response = generator_pb2_grpc.GeneratorStub(orchestrator).Generate(request, timeout=120)
    face = response.images[0].faces[0]
    assert face.user_id == "zoe" and face.HasField("identity_score")
    assert face.user_version == job.published_version == 1


def test_refresh_user_errors(services: tuple[grpc.Channel, grpc.Channel]) -> None:
    serving = generator_pb2_grpc.ServingStub(services[0])
    with pytest.raises(grpc.RpcError) as info:
        serving.RefreshUser(generator_pb2.RefreshUserRequest(user_id="nobody"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        serving.RefreshUser(generator_pb2.RefreshUserRequest(user_id="zoe", version=99), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
