"""Several trainer replicas on one PostgreSQL job store and one shared data folder: every job runs
once and publishes once, and a replica killed mid-job hands it to another after its lease."""

from __future__ import annotations

import json
import time
from pathlib import Path

from postgres import new_database
from processes import ServiceProcess, trainer_process

from easyphoto.engines.faces.detect import FaceAnalyzer
from easyphoto.engines.faces.models import default_face_models
from easyphoto.engines.models.loading import tiny_family
from easyphoto.fixtures.photos import person_photos
from easyphoto.imaging.codec import encode_png
from easyphoto.trainer.jobs import FINISHED, SUCCEEDED, JobRecord, JobStore
from easyphoto.trainer.runner import JobRunner, RunnerConfig
from easyphoto.users.store import UserStore
from easyphoto.v1 import trainer_pb2, trainer_pb2_grpc

FAST_MESSAGE = trainer_pb2.TrainingOptions(
    rank=4, alpha=4.0, resolution=64, gradient_accumulation_steps=1, steps_per_photo=2, max_train_steps=6,
    validation_interval=3, validation_steps=2, validation_templates=1, merge_top_k=2,
)  # fmt: skip


def _replica(name: str, location: str, data: Path, faces: FaceAnalyzer, lease: float = 30.0) -> JobRunner:
    config = RunnerConfig(
        data=data, device="cpu", load_family=tiny_family, face_models=default_face_models(), analyzer=faces,
        replica=name, lease_seconds=lease, poll_seconds=0.1,
    )  # fmt: skip
    return JobRunner(JobStore(location), UserStore(data), config)


def _wait_finished(store: JobStore, job_ids: list[str], timeout: float) -> list[JobRecord]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [store.get(job_id) for job_id in job_ids]
        if all(job.state in FINISHED for job in jobs):
            return jobs
        time.sleep(0.2)
    raise TimeoutError([store.get(job_id) for job_id in job_ids])


def _published_by(users: UserStore, user_id: str) -> list[str]:
    """The job of each version the user has."""
    folder = users.user_dir(user_id)
    return [
        json.loads((folder / f"v{v}" / "meta.json").read_text())["job_id"] for v in users.versions(user_id)
    ]


def test_two_trainers_on_one_store_run_each_job_once_and_publish_once(postgres: str, tmp_path: Path) -> None:
    location = new_database(postgres)
    replicas = [_replica_process(name, location, tmp_path) for name in ("a", "b")]
    photos = [encode_png(p) for p in person_photos()[:2]]
    try:
        job_ids = []
        for index, user in enumerate(("ann", "bob", "cy", "dee")):
            request = trainer_pb2.CreateTrainingJobRequest(user_id=user, photos=photos, options=FAST_MESSAGE)
            job_ids.append(
                trainer_pb2_grpc.TrainerStub(replicas[index % 2].channel)
                .CreateTrainingJob(request, timeout=120, wait_for_ready=True)
                .job_id
            )
        store = JobStore(location)
        finished = _wait_finished(store, job_ids, timeout=600)
    finally:
        for replica in replicas:
            replica.kill()
    users = UserStore(tmp_path)
    for job in finished:
        assert job.state == SUCCEEDED, job.error
        assert job.attempts == 1  # claimed once: it ran once
        assert _published_by(users, job.user_id) == [job.job_id]  # and published once
    assert {job.owner for job in finished} == {"a", "b"}  # both replicas took jobs
    store.close()


def test_a_replica_killed_mid_job_hands_it_to_another_after_its_lease(
    postgres: str, tmp_path: Path, faces: FaceAnalyzer
) -> None:
    location = new_database(postgres)
    doomed = _replica_process("doomed", location, tmp_path, lease_seconds=2)
    try:
        job_id = _train_until_step(doomed, step=2)
    finally:
        doomed.kill()
    store = JobStore(location)
    assert store.get(job_id).owner == "doomed" and store.get(job_id).state != SUCCEEDED
    survivor = _replica("survivor", location, tmp_path, faces)
    survivor.start()
    try:
        (final,) = _wait_finished(store, [job_id], timeout=600)
    finally:
        survivor.stop()
    assert final.state == SUCCEEDED, final.error
    assert (final.owner, final.attempts) == ("survivor", 2)
    assert any("resumed after a trainer restart" in warning for warning in final.warnings)
    assert _published_by(UserStore(tmp_path), "kim") == [job_id]
    survivor.store.close()
    store.close()


def _replica_process(replica: str, location: str, data: Path, lease_seconds: float = 30.0) -> ServiceProcess:
    """``easyphoto trainer`` as its own process: one replica on the shared store and data."""
    args = [
        "--job-store",
        location,
        "--replica",
        replica,
        "--lease-seconds",
        str(lease_seconds),
        "--no-metrics",
    ]
    return trainer_process(data, data / f"{replica}.log", *args)


def _train_until_step(trainer: ServiceProcess, step: int) -> str:
    """A job for kim submitted to ``trainer``, watched until it reaches ``step``."""
    options = trainer_pb2.TrainingOptions()
    options.CopyFrom(FAST_MESSAGE)
    options.steps_per_photo, options.max_train_steps = 100, 12
    request = trainer_pb2.CreateTrainingJobRequest(
        user_id="kim", photos=[encode_png(p) for p in person_photos()[:2]], options=options
    )
    stub = trainer_pb2_grpc.TrainerStub(trainer.channel)
    job = stub.CreateTrainingJob(request, timeout=120, wait_for_ready=True)
    for state in stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id), timeout=300):
        if state.step >= step:
            return str(job.job_id)
    raise AssertionError("the job ended before the step")
