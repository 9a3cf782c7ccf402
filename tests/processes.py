"""The services as their own processes (``easyphoto serve``, ``easyphoto trainer``), for the tests
that signal, kill or restart them."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServiceProcess:
    """``easyphoto <command> --port PORT <args>``, its output in ``log_path``."""

    def __init__(self, command: str, args: list[str], log_path: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("w")
        argv = [sys.executable, "-m", "easyphoto.cli.main", command, "--port", str(self.port), *args]
        self.process = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env=os.environ.copy()
        )
        self.channel = grpc.insecure_channel(self.address)

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_for_line(self, pattern: str, timeout: float = 120) -> None:
        """Until the output has a line matching ``pattern``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.output(), re.MULTILINE):
                return
            assert self.process.poll() is None, f"exited {self.process.returncode}:\n{self.output()[-3000:]}"
            time.sleep(0.05)
        raise TimeoutError(f"no line matching {pattern!r}:\n{self.output()[-3000:]}")

    def wait_catching(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 60) -> None:
        """Until the process has a handler for ``sig`` (its ``SigCgt`` mask in /proc says so): a
        signal sent before that meets Python's default action, which no service can catch."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"exited {self.process.returncode}:\n{self.output()[-3000:]}"
            if caught_signals(self.process.pid) >> (sig - 1) & 1:
                return
            time.sleep(0.01)
        raise TimeoutError(f"never caught {sig.name}:\n{self.output()[-3000:]}")

    def health(self, service: str = "") -> int | None:
        """The health status of ``service`` now (None: no answer)."""
        try:
            stub = health_pb2_grpc.HealthStub(self.channel)
            return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status)
        except grpc.RpcError:
            return None

    def wait_serving(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"exited {self.process.returncode}:\n{self.output()[-3000:]}"
            if self.health() == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.2)
        raise TimeoutError(f"never SERVING:\n{self.output()[-3000:]}")

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, then its exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.close(timeout)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.close(30)

    def close(self, timeout: float = 30) -> int:
        self.channel.close()
        try:
            status = self.process.wait(timeout)
        finally:
            self._log.close()
        return status


def caught_signals(pid: int) -> int:
    """The mask of signals ``pid`` has handlers for (bit n-1 for signal n), 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0
    match = re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.MULTILINE)
    return int(match.group(1), 16) if match else 0


def trainer_process(data: Path, log_path: Path, *args: str, port: int | None = None) -> ServiceProcess:
    """``easyphoto trainer`` on the CPU over ``data``."""
    return ServiceProcess("trainer", ["--data", str(data), "--device", "cpu", *args], log_path, port)
