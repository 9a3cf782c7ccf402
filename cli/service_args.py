"""The command-line arguments the two servers (``serve``, ``trainer``) share, and their values."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from easyphoto.engines.faces.paths import FaceModelPaths

if TYPE_CHECKING:  # grpc is imported where a client is made, not at the command's start
    from easyphoto.rpc.wire import ClientSecurity


def add_service_arguments(parser: argparse.ArgumentParser, port: int, metrics_port: int, data: str) -> None:
    """Where it listens, the models, the device, the data root and the metrics endpoint."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument(
        "--models", default="tiny", help="'tiny', a diffusers folder, an SD 1.5 file or a spec .json"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--data", default=None, help=f"{data} root (default: $EASYPHOTO_DATA)")
    parser.add_argument("--metrics-host", default="127.0.0.1", help="address of /metrics, /healthz, /readyz")
    parser.add_argument(
        "--metrics-port", type=int, default=metrics_port, help="their HTTP port (0: any free port)"
    )
    parser.add_argument("--no-metrics", action="store_true", help="serve no metrics HTTP endpoint")
    security = parser.add_argument_group("security (all unset: open and plaintext, for local use)")
    security.add_argument(
        "--tenants", default=None, help="a tenants file: API keys (SHA-256) to tenants and their limits"
    )
    security.add_argument("--tls-cert", default=None, help="serve gRPC over TLS with this certificate (PEM)")
    security.add_argument("--tls-key", default=None, help="and this private key (PEM)")
    security.add_argument("--tls-client-ca", default=None, help="require client certificates of this CA")
    faces = parser.add_argument_group("face models (give the trainer and the orchestrator the same)")
    for name, option in FaceModelPaths.OPTIONS.items():
        faces.add_argument(option, default=None, help=FACE_MODEL_HELP[name])


# What each of FaceModelPaths' fields is, for its option's help.
FACE_MODEL_HELP = {
    "pack": "an insightface pack directory (SCRFD + ArcFace ONNX), not MTCNN + dlib",
    "parsing": "a BiSeNet face parsing ONNX file",
    "saliency": "a saliency matte ONNX file",
    "enhancer": "a face upscaler ONNX file",
    "swapper": "an inswapper-style face swap ONNX file (needs --face-models)",
    "pose": "a DWPose/RTMPose-style whole-body keypoint ONNX file",
    "retoucher": "an image-to-image skin retouching ONNX file (else a bilateral smoothing of the skin)",
}


def service_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields :func:`add_service_arguments` sets (ServerConfig and TrainerConfig both)."""
    from easyphoto.rpc.server import Security
    from easyphoto.users.store import default_data_root

    def path(value: str | None) -> Path | None:
        return Path(value) if value else None

    return {
        "host": args.host,
        "port": args.port,
        "models": args.models,
        "device": args.device,
        "data": Path(args.data) if args.data else default_data_root(),
        "metrics_host": args.metrics_host,
        "metrics_port": None if args.no_metrics else args.metrics_port,
        "security": Security(
            tenants=path(args.tenants),
            tls_cert=path(args.tls_cert),
            tls_key=path(args.tls_key),
            tls_client_ca=path(args.tls_client_ca),
        ),
        "faces": FaceModelPaths(
            **{name: path(getattr(args, _dest(option))) for name, option in FaceModelPaths.OPTIONS.items()}
        ),
    }


def _dest(option: str) -> str:
    """argparse's attribute for ``option``."""
    return option.lstrip("-").replace("-", "_")


def add_client_security(parser: argparse.ArgumentParser, prefix: str = "", whose: str = "the server") -> None:
    """``--[PREFIX]api-key`` (default ``$EASYPHOTO_[PREFIX]API_KEY``) and ``--[PREFIX]tls-ca``."""
    env = f"EASYPHOTO_{prefix.replace('-', '_').upper()}API_KEY"
    parser.add_argument(
        f"--{prefix}api-key", default=os.environ.get(env, ""), help=f"API key for {whose} (default: ${env})"
    )
    parser.add_argument(
        f"--{prefix}tls-ca", default=None, help=f"CA of {whose}'s TLS certificate: connect over TLS"
    )


def client_security(args: argparse.Namespace, prefix: str = "") -> ClientSecurity:
    from easyphoto.rpc.wire import ClientSecurity

    name = prefix.replace("-", "_")
    ca = getattr(args, f"{name}tls_ca")
    return ClientSecurity(api_key=getattr(args, f"{name}api_key"), tls_ca=Path(ca) if ca else None)
