"""A throwaway PostgreSQL server for the tests, from the distribution's packages (``initdb`` and
``pg_ctl`` of Debian's postgresql), on loopback with trust authentication, as the suite starts a
real tritonserver. As root, the server runs as the ``postgres`` user (it refuses root)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from processes import free_port

USER = "easyphoto"


def postgres_bin() -> Path:
    """The folder of ``initdb`` and ``pg_ctl``; a clear error when PostgreSQL is not installed."""
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).resolve().parent
    installed = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if installed:
        return installed[-1].parent
    raise FileNotFoundError("PostgreSQL is not installed: apt-get install postgresql (see .ci/run)")


@contextmanager
def postgres_server() -> Iterator[str]:
    """A running server with its data in a new folder of the system's temporary directory (the
    server user must reach it), removed after; yields the URL of its ``postgres`` database."""
    binaries = postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="easyphoto-postgres-"))
    try:
        with _server(binaries, root) as url:
            yield url
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def _server(binaries: Path, root: Path) -> Iterator[str]:
    as_server_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_server_user:
        shutil.chown(root, "postgres")
    data = root / "data"
    subprocess.run(
        [*as_server_user, str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", USER, "--no-sync"],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    options = f"-k {root} -h 127.0.0.1 -p {port} -F"
    control = [*as_server_user, str(binaries / "pg_ctl"), "-D", str(data)]
    subprocess.run([*control, "-o", options, "-l", str(root / "server.log"), "-w", "start"], check=True,
                   capture_output=True)  # fmt: skip
    try:
        yield f"postgresql://{USER}@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*control, "-m", "immediate", "stop"], capture_output=True)


def new_database(server_url: str) -> str:
    """A fresh, empty database on the server; its URL."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + f"/{name}"
