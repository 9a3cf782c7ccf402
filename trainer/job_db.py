"""The databases a job store can live in: SQLite (a file, the embedded default) and PostgreSQL (a
server several trainer replicas share). Both take the same SQL with ``?`` placeholders and give
rows as dicts; what differs between them is how a worker claims the next job atomically.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
MIGRATION_LOCK = 0x6561_7379  # the advisory lock replicas hold while they set up the schema


class Database(Protocol):
    """A connection the store's one lock serialises; every statement commits on its own."""

    # What an insert that breaks a unique index raises.
    conflict: tuple[type[Exception], ...]

    def rows(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> list[dict[str, Any]]: ...

    def execute(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> int:
        """Runs a statement; how many rows it changed."""
        ...

    def columns(self, table: str) -> set[str]: ...

    def claim(
        self, pick: str, pick_args: list[Any], assign: str, assign_args: list[Any]
    ) -> dict[str, Any] | None:
        """Atomically, across every process on this database: the row ``pick`` selects (its
        ``job_id`` and ``state``, one row) updated by ``assign`` (``SET ...`` of ``jobs``); the
        updated row with its state before as ``claimed_from``, or None when ``pick`` finds none."""
        ...

    def script(self, sql: str) -> None:
        """Runs several statements separated by semicolons."""
        ...

    def migrating(self) -> AbstractContextManager[None]:
        """Held while creating or altering the schema: replicas starting at once take turns."""
        ...

    def close(self) -> None: ...


def open_database(location: str | Path) -> Database:
    """A PostgreSQL URL, or the path of a SQLite file."""
    text = str(location)
    if text.startswith(POSTGRES_SCHEMES):
        return PostgresDatabase(text)
    return SqliteDatabase(Path(text))


SQLITE_BUSY_S = 30.0  # how long a statement waits for another connection's lock


class SqliteDatabase:
    conflict: tuple[type[Exception], ...] = (sqlite3.IntegrityError,)

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            str(path), check_same_thread=False, isolation_level=None, timeout=SQLITE_BUSY_S
        )
        self._db.row_factory = sqlite3.Row
        self._use_wal()
        self._db.execute("PRAGMA synchronous=FULL")

    def _use_wal(self) -> None:
        """Write-ahead logging, retried while it is locked: when several connections open a new file
        at once, the switch can answer "database is locked" at once instead of waiting its busy
        timeout (measured: 5 of 150 rounds of six openers)."""
        deadline = time.monotonic() + SQLITE_BUSY_S
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def rows(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> list[dict[str, Any]]:
        return [dict(row) for row in self._db.execute(sql, args).fetchall()]

    def execute(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> int:
        return self._db.execute(sql, args).rowcount

    def script(self, sql: str) -> None:
        self._db.executescript(sql)

    def columns(self, table: str) -> set[str]:
        return {row["name"] for row in self._db.execute(f"PRAGMA table_info({table})")}

    @contextmanager
    def migrating(self) -> Iterator[None]:
        yield  # SQLite's database lock already serialises each statement

    def claim(
        self, pick: str, pick_args: list[Any], assign: str, assign_args: list[Any]
    ) -> dict[str, Any] | None:
        # BEGIN IMMEDIATE takes the database's write lock: no other process picks between our
        # SELECT and UPDATE.
        with self._transaction():
            picked = self._db.execute(pick, pick_args).fetchone()
            if picked is None:
                return None
            job_id = picked["job_id"]
            self._db.execute(f"UPDATE jobs SET {assign} WHERE job_id = ?", [*assign_args, job_id])
            row = dict(self._db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone())
        return {**row, "claimed_from": picked["state"]}

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()


class PostgresDatabase:
    def __init__(self, url: str) -> None:
        import psycopg
        from psycopg.rows import dict_row

        self._psycopg = psycopg
        self._url = url
        self._connect = lambda: psycopg.connect(url, autocommit=True, row_factory=dict_row)
        self._db = self._connect()
        self.conflict: tuple[type[Exception], ...] = (psycopg.errors.UniqueViolation,)

    def rows(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> list[dict[str, Any]]:
        with self._cursor() as cursor:
            cursor.execute(_placeholders(sql), args)
            return list(cursor.fetchall()) if cursor.description else []

    def execute(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> int:
        with self._cursor() as cursor:
            cursor.execute(_placeholders(sql), args)
            return int(cursor.rowcount)

    def script(self, sql: str) -> None:
        for statement in filter(str.strip, sql.split(";")):
            self.execute(statement)

    def columns(self, table: str) -> set[str]:
        found = self.rows("SELECT column_name FROM information_schema.columns WHERE table_name = ?", (table,))
        return {row["column_name"] for row in found}

    @contextmanager
    def migrating(self) -> Iterator[None]:
        # Concurrent CREATE ... IF NOT EXISTS can still collide in PostgreSQL's catalogue.
        self.execute("SELECT pg_advisory_lock(?)", (MIGRATION_LOCK,))
        try:
            yield
        finally:
            self.execute("SELECT pg_advisory_unlock(?)", (MIGRATION_LOCK,))

    def claim(
        self, pick: str, pick_args: list[Any], assign: str, assign_args: list[Any]
    ) -> dict[str, Any] | None:
        # Row locks: a job another replica is claiming right now is skipped, not waited for.
        sql = (
            f"WITH picked AS ({pick} FOR UPDATE SKIP LOCKED)"
            f" UPDATE jobs SET {assign} FROM picked WHERE jobs.job_id = picked.job_id"
            " RETURNING jobs.*, picked.state AS claimed_from"
        )
        found = self.rows(sql, [*pick_args, *assign_args])
        return found[0] if found else None

    @contextmanager
    def _cursor(self) -> Iterator[Any]:
        """A cursor; a connection the server dropped (it restarted) is opened again once."""
        if self._db.closed:
            self._db = self._connect()
        try:
            with self._db.cursor() as cursor:
                yield cursor
        except self._psycopg.OperationalError:
            if not self._db.closed:
                raise
            self._db = self._connect()
            raise

    def close(self) -> None:
        self._db.close()


def _placeholders(sql: str) -> str:
    """SQLite's ``?`` as psycopg's ``%s`` (the store's SQL holds no literal ``?`` or ``%``)."""
    return sql.replace("%", "%%").replace("?", "%s")
