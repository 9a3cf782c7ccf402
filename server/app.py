"""The orchestrator's gRPC server: Generator and Serving services, health and reflection.

Models load in the background after the port opens, so health answers at once: NOT_SERVING
while loading, SERVING when the engines are ready (the readiness probe of a deployment).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from easyphoto.engines.errors import EngineUnavailable, Unimplemented
from easyphoto.engines.interface import Engines
from easyphoto.engines.loading import resolve_family
from easyphoto.engines.rpc import GrpcApp, Service, abort
from easyphoto.engines.torch_backend import TorchBackend
from easyphoto.v1 import generator_pb2, generator_pb2_grpc

log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    models: str = "tiny"
    backend: str = "torch"
    device: str | None = None


class EngineHolder:
    """Loads the engines once, off the request path; requests before that get UNAVAILABLE."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._engines: Engines | None = None
        self._error: Exception | None = None
        self.loaded = threading.Event()

    def load(self) -> Engines:
        if self.config.backend != "torch":
            raise ValueError(f"backend {self.config.backend!r} is not available; use 'torch'")
        family = resolve_family(self.config.models)
        backend = TorchBackend(family, device=self.config.device)
        self._engines = Engines(backend, family.tokenizer, float(family.vae.config.scaling_factor))
        log.info("engines ready: %s on %s (%s)", family.name, backend.device, backend.dtype)
        return self._engines

    def load_in_background(self, on_ready: Callable[[], None]) -> None:
        def run() -> None:
            try:
                self.load()
                on_ready()
            except Exception as exc:  # reported by every request and by health staying NOT_SERVING
                log.exception("loading engines failed")
                self._error = exc
            finally:
                self.loaded.set()

        threading.Thread(target=run, name="load-engines", daemon=True).start()

    def get(self) -> Engines:
        if self._engines is None:
            why = f"loading failed: {self._error}" if self._error else "models are still loading"
            raise EngineUnavailable(f"engines not ready ({why})")
        return self._engines


class GeneratorService(generator_pb2_grpc.GeneratorServicer):
    def __init__(self, engines: EngineHolder) -> None:
        self.engines = engines

    def Generate(
        self, request: generator_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> generator_pb2.GenerateResponse:
        abort(context, Unimplemented("Generate is not implemented yet (orchestrator issue)"))

    def GenerateStream(
        self, request: generator_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[generator_pb2.GenerateEvent]:
        abort(context, Unimplemented("GenerateStream is not implemented yet (orchestrator issue)"))
        yield from ()


class ServingService(generator_pb2_grpc.ServingServicer):
    def RefreshUser(
        self, request: generator_pb2.RefreshUserRequest, context: grpc.ServicerContext
    ) -> generator_pb2.RefreshUserResponse:
        abort(context, Unimplemented("RefreshUser is not implemented yet (refit issue)"))


def build_app(config: ServerConfig) -> tuple[GrpcApp, EngineHolder]:
    holder = EngineHolder(config)
    descriptor = generator_pb2.DESCRIPTOR
    app = GrpcApp(
        [
            Service(
                GeneratorService(holder),
                generator_pb2_grpc.add_GeneratorServicer_to_server,
                descriptor.services_by_name["Generator"].full_name,
            ),
            Service(
                ServingService(),
                generator_pb2_grpc.add_ServingServicer_to_server,
                descriptor.services_by_name["Serving"].full_name,
            ),
        ],
        host=config.host,
        port=config.port,
    )
    return app, holder


def serve(config: ServerConfig) -> None:
    app, holder = build_app(config)
    app.start()
    log.info(
        "orchestrator listening on %s:%d (models=%s, backend=%s)",
        config.host,
        app.port,
        config.models,
        config.backend,
    )
    holder.load_in_background(lambda: app.set_serving(True))
    try:
        app.wait()
    except KeyboardInterrupt:
        app.stop()
