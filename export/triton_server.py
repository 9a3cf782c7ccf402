"""Runs the CPU ``tritonserver`` that nvidia-pytriton ships, on an exported model repository.

That build has only the python backend, and its python stub is built against numpy 1.x, so it lives
in its own virtual environment (``make triton-setup`` creates ``.venv-triton`` with nvidia-pytriton,
onnxruntime and numpy<2); the main environment stays on numpy 2. The server binary, backends and
caches are copied out of the package (the stub for this Python goes into ``backends/python``), and
the server starts with that environment first on ``PATH`` (the stub imports from the first
``python3`` there) and the package's bundled libraries plus that Python's libpython on
``LD_LIBRARY_PATH``. Ports bind to loopback through ``--http-address``/``--grpc-address``.
On a GPU host, use NVIDIA's Triton container instead (``deploy/README.md``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The rate limiter's resource that the models of a repository with a memory limit need a unit of
# (triton_repository.ServingSettings.rate_limit_mb), and the flag that turns the limiter on.
MEMORY_RESOURCE = "memory"
RATE_LIMIT_FLAG = "--rate-limit=execution_count"

DEFAULT_VENV = Path(".venv-triton")
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}


def free_ports() -> dict[str, int]:
    """A free loopback port for each of Triton's endpoints (tests, benchmarks)."""
    sockets = {name: socket.socket() for name in PORTS}
    for sock in sockets.values():
        sock.bind(("127.0.0.1", 0))
    ports = {name: int(sock.getsockname()[1]) for name, sock in sockets.items()}
    for sock in sockets.values():
        sock.close()
    return ports


class TritonUnavailable(RuntimeError):
    """The CPU tritonserver is not installed (run ``make triton-setup``)."""


@dataclass(frozen=True)
class TritonInstall:
    venv: Path
    site_packages: Path
    server: Path  # our copy: bin/, backends/, caches/

    @property
    def binary(self) -> Path:
        return self.server / "bin" / "tritonserver"

    def environment(self) -> dict[str, str]:
        python = self.venv / "bin" / "python"
        libdir = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        env = dict(os.environ)
        env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '')}"
        env["LD_LIBRARY_PATH"] = f"{self.site_packages / 'nvidia_pytriton.libs'}:{libdir}"
        env.pop("PYTHONPATH", None)
        return env


def find_install(venv: Path = DEFAULT_VENV, server_dir: Path | None = None) -> TritonInstall:
    """The tritonserver in ``venv``, its files copied to ``server_dir`` (default: inside the venv)."""
    candidates = sorted((venv / "lib").glob("python3*/site-packages/pytriton/tritonserver"))
    if not candidates:
        raise TritonUnavailable(f"no nvidia-pytriton in {venv}; run `make triton-setup`")
    packaged = candidates[0]
    site_packages = packaged.parent.parent
    version = site_packages.parent.name.removeprefix("python")
    server = server_dir or venv / "tritonserver"
    stub = packaged / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not _installed(server):
        if not stub.is_file():
            raise TritonUnavailable(f"nvidia-pytriton has no python backend stub for Python {version}")
        _install_server(packaged, stub, server)
    return TritonInstall(venv, site_packages, server)


def _install_server(packaged: Path, stub: Path, server: Path) -> None:
    """Copies the server's files beside ``server`` and renames the copy into place, so a copy cut
    short (or a second process copying too) never leaves a half-installed server behind."""
    partial = server.with_name(f"{server.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        for part in ("bin", "backends", "caches"):
            shutil.copytree(packaged / part, partial / part)
        shutil.copy2(stub, partial / "backends" / "python" / stub.name)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if server.exists() and not _installed(server):
        shutil.rmtree(server, ignore_errors=True)  # an older, incomplete install
    try:
        partial.rename(server)
    except OSError:  # another process installed it first
        shutil.rmtree(partial, ignore_errors=True)
        if not _installed(server):
            raise


def _installed(server: Path) -> bool:
    """Whether ``server`` holds a whole install: the folder appears only by the final rename of a
    complete copy (an install from before that rule may have left a partial one)."""
    return (server / "bin" / "tritonserver").is_file()


@dataclass(frozen=True)
class ModelStatistics:
    """A model's counters in Triton's statistics extension (``GET /v2/models/stats``), summed
    over its versions; times in seconds."""

    inferences: int  # rows
    executions: int  # model runs: rows of requests the dynamic batcher merged run once
    queue_s: float
    compute_input_s: float
    compute_infer_s: float
    compute_output_s: float

    @classmethod
    def of(cls, entry: dict[str, Any]) -> ModelStatistics:
        stats = entry.get("inference_stats", {})

        def seconds(name: str) -> float:
            return int(stats.get(name, {}).get("ns", 0)) / 1e9

        return cls(
            int(entry.get("inference_count", 0)),
            int(entry.get("execution_count", 0)),
            seconds("queue"),
            seconds("compute_input"),
            seconds("compute_infer"),
            seconds("compute_output"),
        )

    def __add__(self, other: ModelStatistics) -> ModelStatistics:
        return ModelStatistics(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def __sub__(self, other: ModelStatistics) -> ModelStatistics:
        return ModelStatistics(*(a - b for a, b in zip(astuple(self), astuple(other), strict=True)))


def statistics_since(
    now: dict[str, ModelStatistics], then: dict[str, ModelStatistics]
) -> dict[str, ModelStatistics]:
    """What each model did between two :meth:`TritonServer.statistics`; models that did nothing
    are left out."""
    zero = ModelStatistics(0, 0, 0.0, 0.0, 0.0, 0.0)
    changes = {name: counts - then.get(name, zero) for name, counts in now.items()}
    return {name: change for name, change in changes.items() if change.executions}


@dataclass
class TritonServer:
    process: subprocess.Popen[bytes]
    ports: dict[str, int]
    log_path: Path

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited ({self.process.returncode}); see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"tritonserver not ready after {timeout}s; see {self.log_path}")

    def statistics(self) -> dict[str, ModelStatistics]:
        """Every model's counters now, by model name."""
        with urllib.request.urlopen(f"{self.http_url}/v2/models/stats", timeout=10) as reply:
            entries = json.load(reply)["model_stats"]
        counts: dict[str, ModelStatistics] = {}
        for entry in entries:
            model = ModelStatistics.of(entry)
            counts[entry["name"]] = counts[entry["name"]] + model if entry["name"] in counts else model
        return counts

    def settled_statistics(self, quiet_s: float = 0.2, within_s: float = 5.0) -> dict[str, ModelStatistics]:
        """:meth:`statistics` once two readings ``quiet_s`` apart agree (or after ``within_s``): Triton
        may answer a call before it has counted it (a full suite run read a count one short right
        after the reply), so a reading right after a call can miss that call."""
        deadline = time.monotonic() + within_s
        counts = self.statistics()
        while time.monotonic() < deadline:
            time.sleep(quiet_s)
            again = self.statistics()
            if again == counts:
                break
            counts = again
        return counts

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def rate_limited(repository: Path) -> bool:
    """Whether a model of the repository needs the rate limiter (:data:`RATE_LIMIT_FLAG`)."""
    return any("rate_limiter" in path.read_text() for path in repository.glob("*/config.pbtxt"))


def start_server(
    repository: Path,
    install: TritonInstall,
    ports: dict[str, int] | None = None,
    log_path: Path | None = None,
    options: Sequence[str] = (),
) -> TritonServer:
    """Starts tritonserver on ``repository``, listening on loopback only; ``options``: more of
    tritonserver's flags (``--model-control-mode=explicit``, say)."""
    ports = {**PORTS, **(ports or {})}
    log_path = log_path or repository.parent / "tritonserver.log"
    command = [
        str(install.binary),
        f"--model-repository={repository.resolve()}",
        f"--backend-directory={install.server / 'backends'}",
        f"--cache-directory={install.server / 'caches'}",
        "--http-address=127.0.0.1",
        "--grpc-address=127.0.0.1",
        f"--http-port={ports['http']}",
        f"--grpc-port={ports['grpc']}",
        f"--metrics-port={ports['metrics']}",
        "--metrics-address=127.0.0.1",
        "--allow-metrics=true",
        "--log-verbose=0",
        *options,
    ]
    if rate_limited(repository) and not any(option.startswith("--rate-limit=") for option in options):
        command.append(RATE_LIMIT_FLAG)
    with open(log_path, "wb") as handle:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=install.environment()
        )
    log.info("tritonserver pid %d on %s (log %s)", process.pid, ports, log_path)
    return TritonServer(process, ports, log_path)
