"""The job store and runner around the training itself: state transitions that cannot race, idempotent
and per-user-exclusive creation, crash recovery (resume limits, publish-once, orphan folders), a
graceful stop, and user versions that are never reused."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from easyphoto.engines.faces.detect import FaceAnalyzer
from easyphoto.engines.faces.models import default_face_models
from easyphoto.engines.models.family import ModelFamily
from easyphoto.engines.models.loading import tiny_family
from easyphoto.fixtures.photos import person_photos
from easyphoto.imaging.codec import encode_png
from easyphoto.rpc.errors import Cancelled, InvalidArgument, UnknownUser, UserNotReady
from easyphoto.trainer.jobs import (
    ADDED_COLUMNS,
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SCHEMA,
    SUCCEEDED,
    JobRecord,
    JobStore,
    UserBusy,
)
from easyphoto.trainer.options import TrainingOptions
from easyphoto.trainer.runner import LEFTOVER_SECONDS, MAX_ATTEMPTS, JobRunner, RunnerConfig
from easyphoto.users.durable import sha256_file
from easyphoto.users.store import LORA_FILE, UserStore, check_user_id

OPTIONS = TrainingOptions(
    rank=4, alpha=4.0, resolution=64, gradient_accumulation_steps=1, steps_per_photo=200,
    max_train_steps=400, validation_interval=1000, validation_steps=2, validation_templates=1,
)  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    jobs = JobStore(tmp_path / "trainer.sqlite3")
    yield jobs
    jobs.close()


def _runner(store: JobStore, data: Path, faces: FaceAnalyzer) -> JobRunner:
    config = RunnerConfig(
        data=data, device="cpu", load_family=tiny_family, face_models=default_face_models(), analyzer=faces
    )
    return JobRunner(store, UserStore(data), config)


def _wait_for(store: JobStore, job_id: str, done: tuple[int, ...], timeout: float = 120) -> JobRecord:
    deadline = time.monotonic() + timeout
    job = store.get(job_id)
    while job.state not in done and time.monotonic() < deadline:
        job = store.wait_for_change(job_id, job.revision, 1.0)
    assert job.state in done, job
    return job


def test_only_one_transition_out_of_a_state_wins(store: JobStore) -> None:
    job = store.create("ann", OPTIONS, seed=1, photo_count=1)
    running = store.transition(job.job_id, (QUEUED,), state=RUNNING)
    assert running is not None and running.state == RUNNING
    assert store.transition(job.job_id, (QUEUED,), state=CANCELLED) is None
    assert store.get(job.job_id).state == RUNNING


def test_a_cancel_that_loses_to_the_worker_cancels_the_running_job(
    store: JobStore, tmp_path: Path, faces: FaceAnalyzer
) -> None:
    runner = _runner(store, tmp_path, faces)
    job = store.create("ann", OPTIONS, seed=1, photo_count=1)
    store.transition(job.job_id, (QUEUED,), state=RUNNING)  # the worker got there first
    assert runner.cancel(job.job_id).state == RUNNING
    with pytest.raises(Cancelled):
        runner.raise_if_stopped(job.job_id)


def test_a_job_cancelled_before_the_worker_takes_it_never_runs(
    store: JobStore, tmp_path: Path, faces: FaceAnalyzer
) -> None:
    runner = _runner(store, tmp_path, faces)
    job = store.create("ann", OPTIONS, seed=1, photo_count=1)
    assert runner.cancel(job.job_id).state == CANCELLED
    final = runner.run(job)  # the worker's stale copy still says QUEUED
    assert final.state == CANCELLED and final.attempts == 0


def test_creation_is_atomic_per_user_and_per_request_id(store: JobStore) -> None:
    outcomes: list[str] = []

    def create(user_id: str, request_id: str) -> None:
        try:
            outcomes.append(store.create(user_id, OPTIONS, 1, 1, request_id).job_id)
        except UserBusy:
            outcomes.append("busy")

    def race(user_id: str, request_ids: list[str]) -> list[str]:
        outcomes.clear()
        threads = [threading.Thread(target=create, args=(user_id, r)) for r in request_ids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return sorted(outcomes)

    different = race("ann", [f"r{i}" for i in range(8)])
    assert different.count("busy") == 7 and len(store.list(user_id="ann")) == 1
    retried = race("bob", ["same"] * 8)
    assert len(set(retried)) == 1 and retried[0] != "busy"


def test_every_uint64_seed_round_trips(store: JobStore) -> None:
    for user, seed in (("a", 0), ("b", 2**63 - 1), ("c", 2**63), ("d", 2**64 - 1)):
        job = store.create(user, OPTIONS, seed, 1)
        assert store.get(job.job_id).seed == seed


def test_an_old_database_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    first_release = SCHEMA
    for name, declaration in ADDED_COLUMNS.items():
        first_release = first_release.replace(f",\n    {name} {declaration}", "")
    assert all(name not in first_release for name in ADDED_COLUMNS)
    with sqlite3.connect(path) as db:
        db.executescript(first_release)
        db.execute("INSERT INTO jobs (job_id, user_id, state, options, seed, photo_count, created_at,"
                   " updated_at) VALUES ('old', 'ann', ?, '{}', 1, 1, 0, 0)", (QUEUED,))  # fmt: skip
    store = JobStore(path)
    try:
        assert store.get("old").owner == "" and store.get("old").lease_until == 0
        with pytest.raises(UserBusy):  # the one-active-job-per-user index came too
            store.create("ann", OPTIONS, seed=1, photo_count=1)
    finally:
        store.close()


def test_a_job_that_keeps_killing_the_trainer_fails_instead_of_resuming(
    store: JobStore, tmp_path: Path, faces: FaceAnalyzer
) -> None:
    job = store.create("ann", OPTIONS, seed=1, photo_count=1)
    store.update(job.job_id, state=RUNNING, attempts=MAX_ATTEMPTS)
    runner = _runner(store, tmp_path, faces)
    runner.start()
    runner.stop()
    final = store.get(job.job_id)
    assert final.state == FAILED and final.error["reason"] == "JOB_CRASH_LOOP"


@pytest.mark.parametrize("deaths", [1, MAX_ATTEMPTS], ids=["once", "crash-loop"])
@pytest.mark.parametrize("named", [True, False], ids=["after-current", "before-current"])
def test_a_job_that_published_before_the_trainer_died_does_not_publish_again(
    store: JobStore, tmp_path: Path, faces: FaceAnalyzer, named: bool, deaths: int
) -> None:
    """Also after as many deaths as fail a job: its version is out, so it succeeds with it."""
    users = UserStore(tmp_path)
    job = store.create("ann", OPTIONS, seed=1, photo_count=1)
    version = users.publish("ann", lambda folder: None, {"job_id": job.job_id})
    if not named:  # killed between renaming the version into place and naming it CURRENT
        (users.user_dir("ann") / "CURRENT").unlink()
        assert users.current_version("ann") is None
    store.update(job.job_id, state=RUNNING, attempts=deaths)  # killed before it recorded the version
    runner = _runner(store, tmp_path, faces)
    runner.start()
    try:
        final = _wait_for(store, job.job_id, (SUCCEEDED, FAILED))
    finally:
        runner.stop()
    assert final.state == SUCCEEDED and final.published_version == version
    assert users.versions("ann") == [version]
    assert users.current_version("ann") == version


def test_naming_an_older_version_current_keeps_the_newer_one(tmp_path: Path) -> None:
    users = UserStore(tmp_path)
    assert [users.publish("ann", lambda folder: None, {}) for _ in range(2)] == [1, 2]
    users.name_current("ann", 1)  # a resumed job of the first version, done after the second
    assert users.current_version("ann") == 2


def test_folders_of_jobs_that_were_never_recorded_are_removed_at_start(
    store: JobStore, tmp_path: Path, faces: FaceAnalyzer
) -> None:
    orphan = tmp_path / "jobs" / "killed-inside-submit" / "photos"
    orphan.mkdir(parents=True)
    submitting = tmp_path / "jobs" / "another-replica-is-submitting"  # young: it may be written now
    submitting.mkdir()
    _age(orphan.parent, LEFTOVER_SECONDS + 1)
    runner = _runner(store, tmp_path, faces)
    runner.start()
    runner.stop()
    assert not orphan.parent.exists() and submitting.exists()


def test_training_marks_of_jobs_that_ended_are_removed_at_start(
    store: JobStore, tmp_path: Path, faces: FaceAnalyzer
) -> None:
    """Marks a killed trainer could not remove: of a cancelled, a failed, a never-recorded job, and
    of one failed at start for crash-looping."""
    users = UserStore(tmp_path)
    cancelled = store.create("ann", OPTIONS, seed=1, photo_count=1)
    store.update(cancelled.job_id, state=CANCELLED)
    failed = store.create("bea", OPTIONS, seed=1, photo_count=1)
    store.update(failed.job_id, state=FAILED)
    looping = store.create("dee", OPTIONS, seed=1, photo_count=1)
    store.update(looping.job_id, state=RUNNING, attempts=MAX_ATTEMPTS)
    marks = [
        ("ann", cancelled.job_id),
        ("bea", failed.job_id),
        ("cy", "never-recorded"),
        ("dee", looping.job_id),
    ]
    for user_id, job_id in marks:
        users.mark_training(user_id, job_id)
    _age(tmp_path / "training" / "cy" / "never-recorded", LEFTOVER_SECONDS + 1)
    users.mark_training("fay", "being-submitted")  # by another replica: its row comes next
    with pytest.raises(UserNotReady, match=cancelled.job_id):
        users.load("ann")
    runner = _runner(store, tmp_path, faces)
    runner.start()
    runner.stop()
    assert users.marked_users() == ["fay"]
    for user_id, _ in marks:
        with pytest.raises(UnknownUser):
            users.load(user_id)


def _age(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


def _write_faces(folder: Path) -> None:
    face = encode_png(person_photos()[0])
    (folder / "face_id.png").write_bytes(face)
    (folder / "reference.png").write_bytes(face)


def test_a_user_training_again_keeps_its_published_version(tmp_path: Path) -> None:
    users = UserStore(tmp_path)
    users.publish("eve", lambda folder: _write_faces(folder), {})
    users.mark_training("eve", "retrain")
    assert users.load("eve").version == 1
    users.unmark_training("eve", "retrain")
    users.unmark_training("eve", "retrain")  # twice is harmless
    assert users.training_jobs("eve") == [] and users.load("eve").version == 1


def test_stopping_pauses_the_running_job_and_the_next_start_resumes_it(
    store: JobStore, tmp_path: Path, faces: FaceAnalyzer
) -> None:
    runner = _runner(store, tmp_path, faces)
    runner.start()
    job = runner.submit("ann", [encode_png(p) for p in person_photos()[:2]], OPTIONS, 3, "")
    deadline = time.monotonic() + 120
    while store.get(job.job_id).step < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert runner.stop(timeout=60)
    paused = store.get(job.job_id)
    assert paused.state == QUEUED and paused.step >= 2
    assert (runner.job_dir(job.job_id) / "photos").is_dir()

    again = _runner(store, tmp_path, faces)
    again.start()
    try:
        deadline = time.monotonic() + 120
        while store.get(job.job_id).step <= paused.step and time.monotonic() < deadline:
            time.sleep(0.1)
        again.cancel(job.job_id)
        final = _wait_for(store, job.job_id, (CANCELLED,))
    finally:
        again.stop()
    assert final.step > paused.step and final.attempts == 2
    assert not (again.job_dir(job.job_id) / "photos").exists()  # a finished job keeps no photos


def test_version_numbers_are_never_reused_after_a_delete(tmp_path: Path) -> None:
    users = UserStore(tmp_path)

    def write(folder: Path) -> None:
        (folder / LORA_FILE).write_bytes(b"weights")

    assert users.publish("ann", write, {}) == 1
    users.adapter_dir.mkdir()
    for name in ("ann@v1.unet.npz", "ann@v1.text_encoder.npz", "anna@v1.unet.npz"):
        (users.adapter_dir / name).write_bytes(b"factors")  # what serving derived from the LoRA
    users.delete("ann")
    assert users.user_ids() == []
    assert [p.name for p in users.adapter_dir.iterdir()] == ["anna@v1.unet.npz"]  # ann's factors went too
    assert not (tmp_path / "locks" / "ann").exists()  # and her lock file
    with pytest.raises(UnknownUser):
        users.delete("bob")
    assert not (tmp_path / "locks" / "bob").exists()
    assert users.publish("ann", write, {}) == 2
    meta = json.loads((users.user_dir("ann") / "v2" / "meta.json").read_text())
    assert meta["lora_sha256"] == sha256_file(users.user_dir("ann") / "v2" / LORA_FILE)


def test_a_publisher_that_waited_through_a_delete_holds_the_users_new_lock(tmp_path: Path) -> None:
    """A delete removes the user's lock file while holding it. A publisher that waited on it then
    locks the file there now, so that nobody else can take the user while it publishes."""
    users = UserStore(tmp_path)
    writing, finish = threading.Event(), threading.Event()

    def write(folder: Path) -> None:
        writing.set()
        finish.wait(10)
        (folder / LORA_FILE).write_bytes(b"weights")

    publisher = threading.Thread(target=users.publish, args=("ann", write, {}))
    with users._user_lock("ann"):
        publisher.start()
        time.sleep(0.2)  # the publisher waits on the lock
        (tmp_path / "locks" / "ann").unlink()  # as a delete does, holding the lock
    try:
        assert writing.wait(10)
        with (tmp_path / "locks" / "ann").open("a") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        finish.set()
        publisher.join(10)
    assert users.versions("ann") == [1]


def test_a_version_killed_before_current_keeps_its_number_after_a_delete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = UserStore(tmp_path)

    def killed(user_id: str, version: int) -> None:
        raise KeyboardInterrupt  # the publisher dies after renaming v1 into place

    monkeypatch.setattr(users, "_name_current", killed)
    with pytest.raises(KeyboardInterrupt):
        users.publish("ann", lambda folder: (folder / LORA_FILE).write_bytes(b"old"), {})
    monkeypatch.undo()
    assert users.versions("ann") == [1] and users.current_version("ann") is None
    users.delete("ann")
    assert users.publish("ann", lambda folder: (folder / LORA_FILE).write_bytes(b"new"), {}) == 2


# A publisher in its own process: it says it is ready, waits for the go file, then publishes ``ann``
# ``times`` times and prints the versions it got. Reading the last version number and writing a
# version each take 50 ms, as on a slow shared volume, so that two publishers' steps interleave
# unless they take turns.
PUBLISHER = """
import json, sys, time
from pathlib import Path
from easyphoto.users.store import UserStore
root, job_id, times, name = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
read_last = UserStore._last_version
def slow_last(self, user_id):
    last = read_last(self, user_id)
    time.sleep(0.05)
    return last
UserStore._last_version = slow_last
(root / f"ready-{name}").touch()
while not (root / "go").exists():
    time.sleep(0.005)
def write(folder):
    (folder / "lora.safetensors").write_bytes(job_id.encode())
    time.sleep(0.05)
meta = {"job_id": job_id} if job_id != "-" else {}
print(json.dumps([UserStore(root).publish("ann", write, meta) for _ in range(times)]))
"""


def _publish_at_once(root: Path, job_ids: list[str], times: int) -> list[list[int]]:
    """Each of ``job_ids`` published by its own process at the same moment."""
    root.mkdir(parents=True, exist_ok=True)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", PUBLISHER, str(root), job_id, str(times), str(index)],
            stdout=subprocess.PIPE,
        )
        for index, job_id in enumerate(job_ids)
    ]
    ready = [root / f"ready-{index}" for index in range(len(job_ids))]
    deadline = time.monotonic() + 60
    while not all(path.exists() for path in ready):  # each has imported the store and waits
        assert time.monotonic() < deadline and all(process.poll() is None for process in processes)
        time.sleep(0.01)
    (root / "go").touch()
    outputs = [process.communicate(timeout=60)[0] for process in processes]
    assert [process.returncode for process in processes] == [0] * len(processes)
    return [json.loads(output) for output in outputs]


def test_processes_publishing_one_user_at_once_take_turns(tmp_path: Path) -> None:
    got = _publish_at_once(tmp_path, ["-", "-"], times=4)
    assert sorted(got[0] + got[1]) == list(range(1, 9))  # none lost to a clash, none numbered twice
    users = UserStore(tmp_path)
    assert users.versions("ann") == list(range(1, 9)) and users.current_version("ann") == 8
    assert not list(users.user_dir("ann").glob(".staging-*"))


def test_two_replicas_publishing_one_job_publish_it_once(tmp_path: Path) -> None:
    got = _publish_at_once(tmp_path, ["job-1", "job-1"], times=1)  # a lease taken over from a live owner
    assert got == [[1], [1]]
    users = UserStore(tmp_path)
    assert users.versions("ann") == [1] and users.current_version("ann") == 1
    assert users.version_of_job("ann", "job-1") == 1


def test_user_ids_cannot_name_the_stores_hidden_folders() -> None:
    for bad in (".deleting-ann-1", ".", "..", "a/b", "x" * 65, ""):
        with pytest.raises(InvalidArgument):
            check_user_id(bad, "user_id")
    check_user_id("ann.b-c_1", "user_id")


def test_lora_initialisation_follows_the_jobs_seed(tiny: ModelFamily) -> None:
    import torch

    from easyphoto.trainer.lora_training import LoraTrainer, TrainingImages

    def initial(seed: int, global_seed: int) -> list[np.ndarray]:
        torch.manual_seed(global_seed)
        images = TrainingImages(person_photos()[:1], OPTIONS.resolution, False)
        trainer = LoraTrainer(tiny_family(), images, OPTIONS, seed=seed, device="cpu")
        return [layer.down.numpy() for layer in trainer.lora("x").layers]

    first, again, other = initial(1, 0), initial(1, 123), initial(2, 0)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_an_unreadable_last_checkpoint_is_dropped_and_the_one_before_resumed(
    store: JobStore, tmp_path: Path, faces: FaceAnalyzer
) -> None:
    import torch

    from easyphoto.trainer.lora_training import LoraTrainer, TrainingImages
    from easyphoto.trainer.runner import _Job

    runner = _runner(store, tmp_path, faces)
    created = store.create("ann", OPTIONS, seed=1, photo_count=1)
    job = _Job(runner, store.update(created.job_id, state=RUNNING, owner=runner.config.replica))
    folder = job.folder / "checkpoints"

    def trainer() -> LoraTrainer:
        images = TrainingImages(person_photos()[:1], OPTIONS.resolution, OPTIONS.random_flip)
        return LoraTrainer(tiny_family(), images, OPTIONS, seed=1, device="cpu")

    training = trainer()
    training.train_step(1)
    training.save_checkpoint(folder, 1)
    expected = training.lora("step 1")
    training.train_step(2)
    last = training.save_checkpoint(folder, 2)
    last.with_suffix(".pt").write_bytes(b"")  # the optimizer state of step 2 never reached the disk
    resumed = trainer()
    assert job._resume(resumed) == 1
    assert not last.exists() and not last.with_suffix(".pt").exists()
    assert any("step-000002" in warning for warning in store.get(job.job.job_id).warnings)
    for ours, theirs in zip(resumed.lora("x").layers, expected.layers, strict=True):
        assert torch.equal(ours.up, theirs.up) and torch.equal(ours.down, theirs.down)
