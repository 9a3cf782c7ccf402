"""``easyphoto triton``: the CPU tritonserver on an exported repository, on loopback ports."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import Any


def _triton(args: argparse.Namespace) -> int:
    from easyphoto.export.triton_server import TritonUnavailable, find_install, start_server

    try:
        install = find_install(Path(args.venv))
    except TritonUnavailable as why:
        print(f"error: {why}")
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # stop the server too when we are terminated
    ports = {"http": args.http_port, "grpc": args.grpc_port, "metrics": args.metrics_port}
    server = start_server(Path(args.repository), install, ports)
    try:
        server.wait_ready()
        print(f"tritonserver ready: grpc {server.grpc_url}, http {server.http_url}, log {server.log_path}")
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def register(commands: Any) -> None:
    triton = commands.add_parser(
        "triton", help="serve an exported Triton repository with the CPU tritonserver"
    )
    triton.add_argument("--repository", default="build/triton-repo")
    triton.add_argument("--venv", default=".venv-triton", help="where `make triton-setup` installed it")
    triton.add_argument("--http-port", type=int, default=8000)
    triton.add_argument("--grpc-port", type=int, default=8001)
    triton.add_argument("--metrics-port", type=int, default=8002)
    triton.set_defaults(run=_triton)
