"""The trainer SIGKILLed at random moments, again and again (imports, start-up, photo preparation,
training, validation, merge, publish): every job still ends succeeded or failed with a reason, each
published once, and no artifact is ever corrupt or half visible. (A job running at three kills is
failed on purpose, "stopped a trainer 3 times": the runner cannot tell them from a job that kills
its trainer.)"""

from __future__ import annotations

import json
import random
import re
import sqlite3
import time
from pathlib import Path

import grpc
from processes import ServiceProcess, trainer_process

from easyphoto.engines.lora import load_lora
from easyphoto.fixtures.photos import person_photos
from easyphoto.imaging.codec import decode_image, encode_png
from easyphoto.users.store import VERSION, UserStore
from easyphoto.v1 import trainer_pb2, trainer_pb2_grpc

KILLS = 20
USERS = ("kai", "lee", "mo", "nia", "oz")
OPTIONS = trainer_pb2.TrainingOptions(
    rank=4, alpha=4.0, resolution=64, gradient_accumulation_steps=1, steps_per_photo=6, max_train_steps=12,
    validation_interval=3, validation_steps=2, validation_templates=1, merge_top_k=2, seed=3,
)  # fmt: skip
FINISHED = (trainer_pb2.JOB_STATE_SUCCEEDED, trainer_pb2.JOB_STATE_FAILED)


def _start(data: Path, run: int) -> ServiceProcess:
    return trainer_process(data, data / f"trainer-{run}.log", "--no-metrics", "--lease-seconds", "2")


def _submit(data: Path) -> list[str]:
    process = _start(data, 0)
    try:
        process.wait_serving()
        stub = trainer_pb2_grpc.TrainerStub(process.channel)
        photos = [encode_png(p) for p in person_photos()[:2]]
        return [
            stub.CreateTrainingJob(
                trainer_pb2.CreateTrainingJobRequest(user_id=user, photos=photos, options=OPTIONS), timeout=60
            ).job_id
            for user in USERS
        ]
    finally:
        process.kill()


AFTER_TRAINING = ("validate_lora", "merge", "publish")
STARTED = re.compile(r"job (\S+) started for user")
HIT = ("was running when its trainer stopped", "stopped a trainer 3 times")


def _progress(job: trainer_pb2.Job) -> float:
    """How far a job is: 0 until it trains, 0.1-0.7 while it trains, then 0.75, 0.85, 0.95 and 1
    once it ended."""
    if job.state in FINISHED:
        return 1.0
    if job.stage == "train" and job.total_steps:
        return 0.1 + 0.6 * job.step / job.total_steps
    if job.stage in AFTER_TRAINING:
        return 0.75 + 0.1 * AFTER_TRAINING.index(job.stage)
    return 0.0


def _running_job(process: ServiceProcess, stub: trainer_pb2_grpc.TrainerStub, job_ids: list[str]) -> str:
    """The job this life runs now (it waits until one started); "" when none is left to start."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        started = STARTED.findall(process.output())
        if started:
            return str(started[-1])
        jobs = [stub.GetJob(trainer_pb2.GetJobRequest(job_id=j), timeout=30) for j in job_ids]
        if all(job.state in FINISHED for job in jobs):
            return ""
        time.sleep(0.1)
    raise TimeoutError(f"no job started:\n{process.output()[-3000:]}")


def _wait_for_progress(process: ServiceProcess, job_ids: list[str], mark: float) -> None:
    """Until this life's job is ``mark`` of the way through (0 to 1, _progress); past 1, until
    (mark - 1) * 10 s after it ended. Timed by the job's progress, not the clock, so the kills land
    in the same stages on a fast machine and a slow one."""
    process.wait_serving()
    stub = trainer_pb2_grpc.TrainerStub(process.channel)
    job_id = _running_job(process, stub, job_ids)
    if not job_id:
        return
    if mark < 0.1:  # somewhere in photo preparation
        time.sleep(mark * 10)
        return
    deadline = time.monotonic() + 120
    while _progress(stub.GetJob(trainer_pb2.GetJobRequest(job_id=job_id), timeout=30)) < min(mark, 1.0):
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} made no progress:\n{process.output()[-3000:]}")
        time.sleep(0.05)
    time.sleep(max(mark - 1.0, 0.0) * 10)


def _assert_whole(users: UserStore, user_id: str) -> list[str]:
    """Every visible version of the user is whole; the jobs that published them."""
    folder = users.user_dir(user_id)
    visible = [p for p in folder.iterdir() if not p.name.startswith(".")] if folder.is_dir() else []
    versions = [p for p in visible if VERSION.match(p.name)]
    assert {p.name for p in visible} - {v.name for v in versions} <= {"CURRENT"}, visible
    for version in versions:
        assert load_lora(version / "lora.safetensors").layers
        for image in ("face_id.png", "reference.png"):
            assert decode_image((version / image).read_bytes()).size
        json.loads((version / "report.json").read_text())
    current = users.current_version(user_id)  # none yet when a publish stopped before naming it
    if current is not None:
        assert (folder / f"v{current}").is_dir()
    return [json.loads((v / "meta.json").read_text())["job_id"] for v in versions]


def test_a_trainer_killed_twenty_times_loses_nothing(tmp_path: Path) -> None:
    data = tmp_path
    job_ids = _submit(data)
    pick = random.Random(18)
    users = UserStore(data)
    for run in range(1, KILLS + 1):
        process = _start(data, run)
        # Every fourth life ends in its imports or start-up, the others in any stage of a job or,
        # about one in four, after it ended (so that jobs also finish between kills).
        if run % 4 == 0:
            time.sleep(pick.uniform(0.3, 3.0))
        else:
            _wait_for_progress(process, job_ids, pick.uniform(0.0, 1.3))
        process.kill()
        for user_id in USERS:  # what a reader sees between two lives is whole
            _assert_whole(users, user_id)
    final = _start(data, KILLS + 1)
    try:
        final.wait_serving()
        stub = trainer_pb2_grpc.TrainerStub(final.channel)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            jobs = [stub.GetJob(trainer_pb2.GetJobRequest(job_id=j), timeout=30) for j in job_ids]
            if all(job.state in FINISHED for job in jobs):
                break
            time.sleep(0.5)
        else:
            raise AssertionError([trainer_pb2.JobState.Name(j.state) for j in jobs])
    except grpc.RpcError as error:
        raise AssertionError(final.output()[-3000:]) from error
    finally:
        final.kill()
    for job in jobs:
        if job.state == trainer_pb2.JOB_STATE_FAILED:
            assert job.error.reason and job.error.message, job
        else:
            assert users.current_version(job.user_id) == job.published_version >= 1
        assert _assert_whole(users, job.user_id).count(job.job_id) == (
            job.state == trainer_pb2.JOB_STATE_SUCCEEDED
        )
    assert sum(j.state == trainer_pb2.JOB_STATE_SUCCEEDED for j in jobs) >= 1, jobs
    # The kills that found a job running (its next life says so): the faults hit real work.
    logs = [(data / f"trainer-{run}.log").read_text() for run in range(2, KILLS + 2)]
    assert sum(log.count(hit) for log in logs for hit in HIT) >= 5  # measured 7-11
    with sqlite3.connect(data / "trainer.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
