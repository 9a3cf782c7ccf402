"""``easyphoto triton``: the CPU tritonserver on an exported repository, on loopback ports."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import Any


def _triton(args: argparse.Namespace) -> int:
    from easyphoto.export.triton_server import PORTS, TritonUnavailable, find_install, start_server

    try:
        install = find_install(Path(args.venv))
    except TritonUnavailable as why:
        print(f"error: {why}")
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # stop the server too when we are terminated
    ports = {endpoint: getattr(args, f"{endpoint}_port") for endpoint in PORTS}
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
    from easyphoto.export.triton_server import DEFAULT_VENV, PORTS

    triton.add_argument("--repository", default="build/triton-repo")
    triton.add_argument("--venv", default=str(DEFAULT_VENV), help="where `make triton-setup` installed it")
    for endpoint, port in PORTS.items():
        triton.add_argument(f"--{endpoint}-port", type=int, default=port)
    triton.set_defaults(run=_triton)
