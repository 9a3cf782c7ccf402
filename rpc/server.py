"""The gRPC server both services run: the standard health and reflection services, message-size
limits, typed errors turned into statuses with google.rpc details, graceful termination. It lives
below both, so that ``server`` and ``trainer`` never depend on each other. What clients need too
(the size limit, decoding the details) is in the lighter :mod:`rpc.wire`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from .errors import EasyPhotoError
from .metrics import GrpcMetrics, Metrics, MetricsEndpoint
from .tenants import TenantDirectory, TenantInterceptor
from .wire import ERROR_DOMAIN, MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

# The health service name a liveness probe asks for (Kubernetes: ``grpc: {service: liveness}``):
# SERVING while the process can work, even when not ready (loading, Triton away).
LIVENESS = "liveness"

# How often a running app asks whether it is still ready (its backend, its worker).
READINESS_POLL_SECONDS = 5.0


def to_status(error: EasyPhotoError) -> grpc.Status:
    """The error as a gRPC status with google.rpc details (BadRequest naming the field, ErrorInfo
    with the reason). Every text is clipped: what a client sent (a 100 kB user id) must never make
    the trailing metadata larger than its gRPC library accepts (8 KiB by default)."""
    message, field = clip(error.message, MAX_MESSAGE_CHARS), clip(error.field, MAX_FIELD_CHARS)
    detail = any_pb2.Any()
    if field:
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
        detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        details = [detail]
    else:
        details = []
    metadata = {clip(k, MAX_FIELD_CHARS): clip(v, MAX_FIELD_CHARS) for k, v in error.metadata.items()}
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=metadata))
    status = status_pb2.Status(code=getattr(code_pb2, error.code), message=message, details=[*details, info])
    return rpc_status.to_status(status)


# A status message and each field name or metadata value at most this long (characters).
MAX_MESSAGE_CHARS, MAX_FIELD_CHARS = 400, 120


def clip(text: str, limit: int) -> str:
    """``text``, or its first ``limit`` characters and how many more there were."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def abort(context: grpc.ServicerContext, error: EasyPhotoError) -> NoReturn:
    log.info("request failed: %s %s (%s)", error.code, error.reason, error.message)
    context.abort_with_status(to_status(error))
    raise AssertionError("unreachable: abort_with_status raises")


def present_fields(message: Any, names: Iterable[str]) -> dict[str, Any]:
    """The values of those of ``names`` set in ``message`` (proto3 ``optional``: unset is not zero),
    for ``dataclasses.replace`` onto the defaults."""
    return {name: getattr(message, name) for name in names if message.HasField(name)}


@dataclass(frozen=True)
class Security:
    """Who may call a server, and over what. ``tenants``: a tenants file (``rpc.tenants``); every
    call but health and reflection then needs an API key. ``tls_cert``/``tls_key``: serve gRPC over
    TLS only (probes use the plaintext HTTP ``/readyz`` and ``/healthz`` of the metrics port);
    ``tls_client_ca``: also require client certificates it signed (mTLS). All unset: open and
    plaintext, the local demo."""

    tenants: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None

    def directory(self) -> TenantDirectory | None:
        return TenantDirectory.read(self.tenants) if self.tenants else None

    def credentials(self) -> grpc.ServerCredentials | None:
        if self.tls_cert is None and self.tls_key is None:
            if self.tls_client_ca is not None:
                raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
            return None
        if self.tls_cert is None or self.tls_key is None:
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        ca = self.tls_client_ca.read_bytes() if self.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [(self.tls_key.read_bytes(), self.tls_cert.read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )


@dataclass
class Service:
    """A servicer, the generated function that registers it, and its full name for health/reflection."""

    servicer: Any
    add_to_server: Callable[[Any, grpc.Server], None]
    full_name: str


class GrpcApp:
    """A gRPC server with health (per service, NOT_SERVING until marked ready) and reflection; with
    ``metrics``, every call is counted and timed in its registry, and when ``metrics.port`` is set
    an HTTP endpoint serves ``/metrics``, ``/healthz`` and ``/readyz`` (ready = health SERVING)."""

    def __init__(
        self,
        services: Sequence[Service],
        host: str,
        port: int,
        max_workers: int = 64,
        metrics: Metrics | None = None,
        security: Security | None = None,
    ) -> None:
        security = security or Security()
        tenants = security.directory()
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        interceptors: list[grpc.ServerInterceptor] = [GrpcMetrics(metrics.registry)] if metrics else []
        if tenants is not None:
            interceptors.append(TenantInterceptor(tenants, abort))
        # Streams (WatchJob, GenerateStream) hold a worker thread each; beyond max_workers calls
        # are refused with RESOURCE_EXHAUSTED rather than queued behind them with no answer.
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            options=options,
            interceptors=interceptors,
            maximum_concurrent_rpcs=max_workers,
        )
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [s.full_name for s in services]
        for service in services:
            service.add_to_server(service.servicer, self.server)
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server,
        )
        self.service_names = names
        credentials = security.credentials()
        address = f"{host}:{port}"
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"cannot bind {host}:{port}")
        self.serving = False
        self.alive = True
        self._stopped = threading.Event()
        self.http = (
            MetricsEndpoint(
                metrics.registry, lambda: self.serving, metrics.host, metrics.port, lambda: self.alive
            )
            if metrics and metrics.port is not None
            else None
        )
        self.set_serving(False)
        self.set_alive(True)

    def set_serving(self, serving: bool) -> None:
        self.serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.service_names]:
            self.health.set(name, status)

    def set_alive(self, alive: bool) -> None:
        """The ``liveness`` health service (and ``/healthz``): NOT_SERVING asks to be restarted."""
        self.alive = alive
        serving = health_pb2.HealthCheckResponse.SERVING
        self.health.set(LIVENESS, serving if alive else health_pb2.HealthCheckResponse.NOT_SERVING)

    def follow_readiness(
        self,
        ready: Callable[[], bool],
        interval: float = READINESS_POLL_SECONDS,
        alive: Callable[[], bool] | None = None,
    ) -> None:
        """Keeps health (and ``/readyz``) equal to ``ready()``, asked every ``interval`` seconds
        until the app stops: when what the app depends on goes away (Triton restarting), load
        balancers stop sending it calls, and send them again once it is back. With ``alive``,
        the ``liveness`` service follows it too (false: only a restart helps)."""

        def watch() -> None:
            while not self._stopped.wait(interval):
                try:
                    now = bool(ready())
                except Exception as exc:  # a failing probe means not ready
                    log.warning("readiness probe failed: %s", exc)
                    now = False
                if now != self.serving and not self._stopped.is_set():
                    log.warning("readiness changed: %s", "SERVING" if now else "NOT_SERVING")
                    self.set_serving(now)
                if alive is not None and (living := bool(alive())) != self.alive:
                    log.error("liveness changed: %s", "alive" if living else "dead")
                    self.set_alive(living)

        threading.Thread(target=watch, name="readiness", daemon=True).start()

    def start(self) -> None:
        self.server.start()
        if self.http:
            self.http.start()

    def stop(self, grace: float = 5.0) -> None:
        self._stopped.set()
        self.serving = False
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self.http:
            self.http.stop()
