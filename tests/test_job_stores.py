"""The job store on both of its databases (SQLite, the embedded default, and a real PostgreSQL
server): claims that go to exactly one replica, leases that move a dead replica's job to another,
and creation that stays one-active-job-per-user when replicas insert at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from postgres import new_database

from easyphoto.trainer.jobs import QUEUED, RUNNING, JobStore, UserBusy
from easyphoto.trainer.options import TrainingOptions

OPTIONS = TrainingOptions(rank=4, resolution=64, max_train_steps=4)
LEASE_S = 2.0  # long enough that a loaded runner renews and asks again well inside it


@pytest.fixture(params=["sqlite", "postgres"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield str(tmp_path / "trainer.sqlite3")
    else:
        yield new_database(request.getfixturevalue("postgres"))


def _replicas(location: str, count: int) -> list[JobStore]:
    """Stores with their own connections, as separate trainer processes have."""
    return [JobStore(location) for _ in range(count)]


def _together(work: list[threading.Thread]) -> None:
    for thread in work:
        thread.start()
    for thread in work:
        thread.join()


def test_replicas_opening_a_new_database_at_once_set_it_up_once(location: str) -> None:
    opened: list[JobStore] = []
    failures: list[BaseException] = []

    def open_store() -> None:
        try:
            opened.append(JobStore(location))
        except BaseException as error:
            failures.append(error)

    _together([threading.Thread(target=open_store) for _ in range(6)])
    assert failures == [] and len(opened) == 6
    job = opened[0].create("ann", OPTIONS, seed=1, photo_count=1)
    assert opened[5].get(job.job_id).user_id == "ann"
    for store in opened:
        store.close()


def test_each_job_is_claimed_by_exactly_one_replica(location: str) -> None:
    stores = _replicas(location, 4)
    created = {stores[0].create(f"user{i}", OPTIONS, seed=i, photo_count=1).job_id for i in range(12)}
    claimed: dict[str, list[str]] = {f"r{i}": [] for i in range(len(stores))}

    def claim_all(owner: str, store: JobStore) -> None:
        while (got := store.claim(owner, lease_seconds=60)) is not None:
            claimed[owner].append(got[0].job_id)

    _together([threading.Thread(target=claim_all, args=(o, s)) for o, s in zip(claimed, stores, strict=True)])
    every = [job_id for jobs in claimed.values() for job_id in jobs]
    assert sorted(every) == sorted(created)  # each once, none twice
    for owner, jobs in claimed.items():
        for job_id in jobs:
            job = stores[0].get(job_id)
            assert (job.state, job.owner, job.attempts) == (RUNNING, owner, 1)
    for store in stores:
        store.close()


def test_a_job_whose_owner_stops_renewing_moves_to_another_replica(location: str) -> None:
    first, second = _replicas(location, 2)
    job = first.create("ann", OPTIONS, seed=1, photo_count=1)
    claimed = first.claim("a", lease_seconds=LEASE_S)
    assert claimed is not None and claimed[1] == QUEUED
    assert first.renew(job.job_id, "a", lease_seconds=LEASE_S)
    assert second.claim("b", lease_seconds=60) is None  # a holds it
    time.sleep(LEASE_S + 0.3)  # a stopped renewing: it died
    taken = second.claim("b", lease_seconds=60)
    assert taken is not None and taken[1] == RUNNING  # claimed from RUNNING: it resumes
    assert (taken[0].owner, taken[0].attempts) == ("b", 2)
    assert not first.renew(job.job_id, "a", lease_seconds=60)  # a, if it wakes, has lost it
    assert first.transition(job.job_id, (), held_by="a", step=3) is None  # and cannot write
    assert second.transition(job.job_id, (), held_by="b", step=3) is not None
    assert first.release("b") == 1 and first.claim("c", 60) is not None  # a restarted b gives it up at once
    first.close()
    second.close()


def test_replicas_creating_at_once_keep_one_active_job_per_user(location: str) -> None:
    stores = _replicas(location, 6)
    outcomes: list[str] = []

    def create(store: JobStore, user_id: str, request_id: str) -> None:
        try:
            outcomes.append(store.create(user_id, OPTIONS, 1, 1, request_id).job_id)
        except UserBusy:
            outcomes.append("busy")

    _together([threading.Thread(target=create, args=(s, "ann", f"r{i}")) for i, s in enumerate(stores)])
    assert sorted(outcomes).count("busy") == 5 and len(stores[0].list(user_id="ann")) == 1
    outcomes.clear()
    _together([threading.Thread(target=create, args=(s, "bob", "same")) for s in stores])
    assert len(set(outcomes)) == 1 and outcomes[0] != "busy"
    for store in stores:
        store.close()


def test_seeds_and_a_change_made_elsewhere_reach_a_watcher(location: str) -> None:
    writer, watcher = _replicas(location, 2)
    for user, seed in (("a", 0), ("b", 2**63 - 1), ("c", 2**63), ("d", 2**64 - 1)):
        assert watcher.get(writer.create(user, OPTIONS, seed, 1).job_id).seed == seed
    job = writer.list(user_id="a")[0]
    threading.Timer(0.3, lambda: writer.update(job.job_id, step=2)).start()
    started = time.monotonic()
    seen = watcher.wait_for_change(job.job_id, job.revision, timeout=10)
    assert seen.step == 2 and time.monotonic() - started < 5  # polled, not waited out
    writer.close()
    watcher.close()
