"""Training jobs persisted in SQLite (``<data>/trainer.sqlite3``, the default) or in a PostgreSQL
server that several trainer replicas share, with change notification.

A job's row holds its state, stage, progress, error, photo reports and resolved options; its files
(the uploaded photos, prepared crops, checkpoints, validation images) live in ``<data>/jobs/<id>/``,
on storage every replica shares. Every update bumps the row's ``revision`` and wakes
:meth:`JobStore.wait_for_change` callers, which is what ``WatchJob`` streams (a job another replica
runs is seen by polling).

A worker :meth:`JobStore.claim` s a job: the oldest QUEUED one, or a RUNNING one whose owner's lease
ran out (that replica died), atomically across replicas; it holds the job by renewing the lease
and writes its progress only while it still owns it.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from easyphoto.rpc.errors import EasyPhotoError, NotFound
from easyphoto.users.store import TENANT_SEPARATOR
from easyphoto.v1 import common_pb2, trainer_pb2

from .job_db import Database, open_database
from .options import TrainingOptions

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    trainer_pb2.JOB_STATE_QUEUED,
    trainer_pb2.JOB_STATE_RUNNING,
    trainer_pb2.JOB_STATE_SUCCEEDED,
    trainer_pb2.JOB_STATE_FAILED,
    trainer_pb2.JOB_STATE_CANCELLED,
)
FINISHED = (SUCCEEDED, FAILED, CANCELLED)
ACTIVE = (QUEUED, RUNNING)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    request_id TEXT NOT NULL DEFAULT '',
    state INTEGER NOT NULL,
    stage TEXT NOT NULL DEFAULT '',
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    loss DOUBLE PRECISION NOT NULL DEFAULT 0,
    eta_seconds DOUBLE PRECISION NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '{}',
    photos TEXT NOT NULL DEFAULT '[]',
    options TEXT NOT NULL,
    warnings TEXT NOT NULL DEFAULT '[]',
    published_version INTEGER NOT NULL DEFAULT 0,
    seed BIGINT NOT NULL,
    photo_count INTEGER NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    revision INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    owner TEXT NOT NULL DEFAULT '',
    lease_until DOUBLE PRECISION NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    identity_reward TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_user ON jobs (user_id, created_at);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_request ON jobs (request_id) WHERE request_id != '';
"""
# One active job per user, kept by the database itself (several replicas insert).
ACTIVE_USER_INDEX = (
    "CREATE UNIQUE INDEX IF NOT EXISTS jobs_active_user ON jobs (user_id)"
    f" WHERE state IN ({QUEUED}, {RUNNING})"
)
JSON_COLUMNS = ("error", "photos", "options", "warnings", "identity_reward")
# Columns added after the first release, created on an older database at open.
ADDED_COLUMNS = {
    "attempts": "INTEGER NOT NULL DEFAULT 0",
    "owner": "TEXT NOT NULL DEFAULT ''",
    "lease_until": "DOUBLE PRECISION NOT NULL DEFAULT 0",
    "cancel_requested": "INTEGER NOT NULL DEFAULT 0",
    "identity_reward": "TEXT NOT NULL DEFAULT '{}'",
}
# How often a watcher looks again for changes another replica made.
POLL_SECONDS = 0.5
SIGNED_64 = 2**63


class UserBusy(EasyPhotoError):
    code = "FAILED_PRECONDITION"
    reason = "USER_TRAINING"


def _to_sqlite_seed(seed: int) -> int:
    """Seeds are uint64 in the API; SQLite integers are signed 64-bit (two's complement)."""
    return seed - 2**64 if seed >= SIGNED_64 else seed


def _from_sqlite_seed(value: int) -> int:
    return value + 2**64 if value < 0 else value


@dataclass
class JobRecord:
    job_id: str
    user_id: str
    state: int
    options: dict[str, Any]
    seed: int
    photo_count: int
    created_at: float
    updated_at: float
    request_id: str = ""
    stage: str = ""
    step: int = 0
    total_steps: int = 0
    loss: float = 0.0
    eta_seconds: float = 0.0
    error: dict[str, str] = field(default_factory=dict)
    photos: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    published_version: int = 0
    revision: int = 0
    attempts: int = 0  # how many times a worker started it (a crash-looping job stops after a few)
    owner: str = ""  # the replica running it
    lease_until: float = 0.0  # when its owner's hold ends unless renewed (epoch seconds)
    cancel_requested: int = 0  # a client asked to cancel it while it ran
    # The identity-reward stage's progress (``IdentityRewardProgress``'s fields); empty before it.
    identity_reward: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @property
    def training_options(self) -> TrainingOptions:
        return TrainingOptions.from_json(self.options)

    def to_proto(self) -> trainer_pb2.Job:
        job = trainer_pb2.Job(
            job_id=self.job_id,
            user_id=self.user_id,
            state=trainer_pb2.JobState.Name(self.state),
            stage=self.stage,
            step=self.step,
            total_steps=self.total_steps,
            loss=self.loss,
            eta_seconds=self.eta_seconds,
            photos=[_photo_report(photo) for photo in self.photos],
            created_at=timestamp(self.created_at),
            updated_at=timestamp(self.updated_at),
            options=self.training_options.to_proto(),
            published_version=self.published_version,
            warnings=self.warnings,
        )
        if self.error:
            job.error.CopyFrom(common_pb2.ErrorDetail(**self.error))
        if self.identity_reward:
            job.identity_reward.CopyFrom(trainer_pb2.IdentityRewardProgress(**self.identity_reward))
        return job


BOXES = ("face_box", "crop_box", "tight_box")


def _photo_report(photo: dict[str, Any]) -> trainer_pb2.PhotoReport:
    report = trainer_pb2.PhotoReport(**{k: v for k, v in photo.items() if k not in BOXES})
    for name in BOXES:
        if box := photo.get(name):  # absent in jobs recorded before boxes were, empty if not framed
            x0, y0, x1, y1 = box
            getattr(report, name).CopyFrom(common_pb2.Box(x0=x0, y0=y0, x1=x1, y1=y1))
    return report


def timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def error_record(error: EasyPhotoError) -> dict[str, str]:
    return {"reason": error.reason, "code": error.code, "message": error.message, "field": error.field}


class JobStore:
    def __init__(self, location: str | Path) -> None:
        """``location``: a SQLite file's path or a ``postgresql://`` URL."""
        self._db: Database = open_database(location)
        with self._db.migrating():
            self._db.script(SCHEMA)
            existing = self._db.columns("jobs")
            for name, declaration in ADDED_COLUMNS.items():
                if name not in existing:
                    self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {declaration}")
            self._db.execute(ACTIVE_USER_INDEX)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def create(
        self,
        user_id: str,
        options: TrainingOptions,
        seed: int,
        photo_count: int,
        request_id: str = "",
        job_id: str = "",
    ) -> JobRecord:
        """A new QUEUED job; or, for a ``request_id`` seen before, that job. Raises UserBusy when
        the user already has an active job (the database's unique indexes decide, so replicas
        inserting at once cannot both win)."""
        now = time.time()
        record = JobRecord(
            job_id=job_id or new_job_id(),
            user_id=user_id,
            state=QUEUED,
            options=options.to_json(),
            seed=seed,
            photo_count=photo_count,
            created_at=now,
            updated_at=now,
            request_id=request_id,
            stage="queued",
        )
        values = {f.name: getattr(record, f.name) for f in fields(JobRecord)}
        for name in JSON_COLUMNS:
            values[name] = json.dumps(values[name])
        values["seed"] = _to_sqlite_seed(seed)
        columns = ", ".join(values)
        with self._changed:
            if request_id and (seen := self._by_request_id(request_id)) is not None:
                return seen
            try:
                self._db.execute(
                    f"INSERT INTO jobs ({columns}) VALUES ({', '.join('?' * len(values))})",
                    list(values.values()),
                )
            except self._db.conflict:
                if request_id and (seen := self._by_request_id(request_id)) is not None:
                    return seen  # the same request, inserted by another replica just now
                active = self._db.rows(
                    f"SELECT job_id FROM jobs WHERE user_id = ? AND state IN ({QUEUED}, {RUNNING}) LIMIT 1",
                    (user_id,),
                )
                if not active:
                    raise
                raise UserBusy(
                    f"user {user_id!r} already has job {active[0]['job_id']} in progress", field="user_id"
                ) from None
            self._changed.notify_all()
        return record

    def get(self, job_id: str) -> JobRecord:
        with self._lock:
            return self._fetch(job_id)

    def _fetch(self, job_id: str) -> JobRecord:
        found = self._db.rows("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
        if not found:
            raise NotFound(f"no job {job_id!r}", field="job_id")
        return _record(found[0])

    def by_request_id(self, request_id: str) -> JobRecord | None:
        with self._lock:
            return self._by_request_id(request_id)

    def _by_request_id(self, request_id: str) -> JobRecord | None:
        found = self._db.rows("SELECT * FROM jobs WHERE request_id = ?", (request_id,))
        return _record(found[0]) if found else None

    def update(self, job_id: str, **values: Any) -> JobRecord:
        record = self.transition(job_id, (), **values)
        assert record is not None  # no state condition: the update always applies
        return record

    def transition(
        self, job_id: str, from_states: tuple[int, ...], held_by: str = "", **values: Any
    ) -> JobRecord | None:
        """Applies ``values`` only while the job is in one of ``from_states`` (any state when
        empty) and, given ``held_by``, while that replica owns it; atomically: the updated job,
        or None when it was in another state or owned by another replica."""
        values["updated_at"] = time.time()
        for name in JSON_COLUMNS:
            if name in values:
                values[name] = json.dumps(values[name])
        assignments = ", ".join(f"{name} = ?" for name in values)
        condition, args = "job_id = ?", list[Any]([job_id])
        if from_states:
            condition += f" AND state IN ({', '.join('?' * len(from_states))})"
            args += list(from_states)
        if held_by:
            condition, args = condition + " AND owner = ?", [*args, held_by]
        with self._changed:
            changed = self._db.execute(
                f"UPDATE jobs SET {assignments}, revision = revision + 1 WHERE {condition}",
                [*values.values(), *args],
            )
            if changed == 0:
                self._fetch(job_id)  # NotFound for an unknown job
                return None
            self._changed.notify_all()
            return self._fetch(job_id)

    # ---- workers ----

    def claim(self, owner: str, lease_seconds: float) -> tuple[JobRecord, int] | None:
        """The next job for ``owner`` to run, now RUNNING and held for ``lease_seconds``, with the
        state it was claimed from (RUNNING: its last owner died and it resumes); None when
        nothing waits. Atomic across replicas: each claim goes to exactly one of them."""
        now = time.time()
        pick = (
            "SELECT job_id, state FROM jobs"
            f" WHERE state = {QUEUED} OR (state = {RUNNING} AND lease_until < ?)"
            " ORDER BY created_at, job_id LIMIT 1"
        )
        assign = (
            f"state = {RUNNING}, owner = ?, lease_until = ?, attempts = attempts + 1,"
            " revision = revision + 1, updated_at = ?"
        )
        with self._changed:
            row = self._db.claim(pick, [now], assign, [owner, now + lease_seconds, now])
            if row is None:
                return None
            self._changed.notify_all()
        claimed_from = int(row.pop("claimed_from"))
        return _record(row), claimed_from

    def renew(self, job_id: str, owner: str, lease_seconds: float) -> bool:
        """Extends ``owner``'s hold on a job it runs; False when it no longer holds it."""
        with self._lock:
            renewed = self._db.execute(
                f"UPDATE jobs SET lease_until = ? WHERE job_id = ? AND owner = ? AND state = {RUNNING}",
                (time.time() + lease_seconds, job_id, owner),
            )
        return renewed == 1

    def release(self, owner: str) -> int:
        """Ends ``owner``'s leases at once (it restarted: what it ran is not running); how many."""
        with self._lock:
            return self._db.execute(
                f"UPDATE jobs SET lease_until = 0 WHERE owner = ? AND state = {RUNNING}", (owner,)
            )

    def delete_user_jobs(self, user_id: str) -> list[str]:
        """Removes the user's finished jobs; returns their ids."""
        finished = ", ".join(str(state) for state in FINISHED)
        with self._changed:
            found = self._db.rows(
                f"SELECT job_id FROM jobs WHERE user_id = ? AND state IN ({finished})", (user_id,)
            )
            self._db.execute(f"DELETE FROM jobs WHERE user_id = ? AND state IN ({finished})", (user_id,))
            self._changed.notify_all()
        return [row["job_id"] for row in found]

    def count(self, state: int) -> int:
        """How many jobs are in ``state`` (every replica's)."""
        with self._lock:
            return int(self._db.rows("SELECT COUNT(*) AS n FROM jobs WHERE state = ?", (state,))[0]["n"])

    def job_ids(self) -> set[str]:
        with self._lock:
            return {row["job_id"] for row in self._db.rows("SELECT job_id FROM jobs")}

    def list(
        self,
        user_id: str = "",
        states: tuple[int, ...] = (),
        limit: int = 50,
        offset: int = 0,
        tenant: str | None = None,
    ) -> list[JobRecord]:
        """Jobs by creation; of ``user_id`` (a stored id) and of ``tenant`` (its users' stored ids,
        ``users.namespace``; "": users of no named tenant) where given."""
        query, args = "SELECT * FROM jobs WHERE 1 = 1", list[Any]()
        if user_id:
            query, args = query + " AND user_id = ?", [*args, user_id]
        if tenant:
            query, args = query + " AND user_id LIKE ?", [*args, f"{tenant}{TENANT_SEPARATOR}%"]
        elif tenant == "":
            query, args = query + " AND user_id NOT LIKE ?", [*args, f"%{TENANT_SEPARATOR}%"]
        if states:
            query += f" AND state IN ({', '.join('?' * len(states))})"
            args += list(states)
        query += " ORDER BY created_at, job_id LIMIT ? OFFSET ?"
        with self._lock:
            found = self._db.rows(query, [*args, limit, offset])
        return [_record(row) for row in found]

    def wait_for_change(self, job_id: str, revision: int, timeout: float) -> JobRecord:
        """The job once its revision differs from ``revision``, or as it is after ``timeout``.
        This process's updates wake the wait at once; other replicas' are seen by polling."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                record = self._fetch(job_id)
                remaining = deadline - time.monotonic()
                if record.revision != revision or remaining <= 0:
                    return record
                self._changed.wait(min(remaining, POLL_SECONDS))


def new_job_id() -> str:
    return uuid.uuid4().hex


def _record(row: dict[str, Any]) -> JobRecord:
    values = dict(row)
    for name in JSON_COLUMNS:
        values[name] = json.loads(values[name])
    values["seed"] = _from_sqlite_seed(values["seed"])
    return JobRecord(**values)
