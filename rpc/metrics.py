"""Prometheus metrics shared by the orchestrator and the trainer.

Each app owns a :class:`Metrics`: its own ``CollectorRegistry`` (never the global one, so one
process can build several apps) and where its HTTP endpoint listens. :class:`GrpcMetrics` is a
server interceptor that counts calls per method and final status code and times them, under the
names of go-grpc-prometheus (``grpc_server_started_total``, ``grpc_server_handled_total``,
``grpc_server_handling_seconds``) so stock dashboards work; errors are
``grpc_server_handled_total{grpc_code!="OK"}``. :class:`MetricsEndpoint` serves ``/metrics``,
``/healthz`` (liveness: the process answers) and ``/readyz`` (200 once the app is ready, else 503).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
# Seconds, from a health check to a many-step generation on CPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


@dataclass
class Metrics:
    """One app's registry, and where its HTTP endpoint listens (port None: nowhere; 0: any free port)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    host: str = DEFAULT_HOST
    port: int | None = None


# (request streaming, response streaming) -> go-grpc-prometheus type, handler attribute, factory
_KINDS: dict[tuple[bool, bool], tuple[str, str, Callable[..., grpc.RpcMethodHandler]]] = {
    (False, False): ("unary", "unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("server_stream", "unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("client_stream", "stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("bidi_stream", "stream_stream", grpc.stream_stream_rpc_method_handler),
}


def with_behavior(
    handler: grpc.RpcMethodHandler, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> grpc.RpcMethodHandler:
    """The handler with its behaviour (the servicer method) replaced by ``wrap(behaviour)``."""
    _, attribute, factory = _KINDS[(handler.request_streaming, handler.response_streaming)]
    return factory(
        wrap(getattr(handler, attribute)),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class GrpcMetrics(grpc.ServerInterceptor):
    """Counts calls started and handled (by final code) per method and times them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["grpc_service", "grpc_method", "grpc_type"]
        self.started = Counter(
            "grpc_server_started_total", "RPCs started on the server.", labels, registry=registry
        )
        self.handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, by final status code.",
            [*labels, "grpc_code"],
            registry=registry,
        )
        self.seconds = Histogram(
            "grpc_server_handling_seconds",
            "Seconds from the start of an RPC to its final status.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        kind = _KINDS[(handler.request_streaming, handler.response_streaming)][0]
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        labels = (service, method, kind)
        wrap = self._streaming if handler.response_streaming else self._unary
        return with_behavior(handler, lambda behavior: wrap(behavior, labels))

    def _unary(self, behavior: Callable[..., Any], labels: tuple[str, str, str]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            started = self._start(labels)
            try:
                response = behavior(request, context)
            except BaseException:
                self._finish(labels, started, context, failed=True)
                raise
            self._finish(labels, started, context, failed=False)
            return response

        return call

    def _streaming(self, behavior: Callable[..., Any], labels: tuple[str, str, str]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            started = self._start(labels)
            try:
                yield from behavior(request, context)
            except GeneratorExit:  # the client went away mid-stream
                self._finish(labels, started, context, failed=True, default=grpc.StatusCode.CANCELLED)
                raise
            except BaseException:
                self._finish(labels, started, context, failed=True)
                raise
            self._finish(labels, started, context, failed=False)

        return call

    def _start(self, labels: tuple[str, str, str]) -> float:
        self.started.labels(*labels).inc()
        return time.perf_counter()

    def _finish(
        self,
        labels: tuple[str, str, str],
        started: float,
        context: grpc.ServicerContext,
        failed: bool,
        default: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
    ) -> None:
        """The code the handler set (abort sets it); else OK, or what gRPC reports for a failure."""
        # ServicerContext.code() is grpcio's (since 1.38); types-grpcio does not declare it.
        code = context.code() or (default if failed else grpc.StatusCode.OK)  # type: ignore[attr-defined]
        self.handled.labels(*labels, code.name).inc()
        self.seconds.labels(*labels).observe(time.perf_counter() - started)


class _Handler(BaseHTTPRequestHandler):
    def __init__(
        self,
        registry: CollectorRegistry,
        ready: Callable[[], bool],
        alive: Callable[[], bool],
        *args: Any,
        **kwargs: Any,
    ) -> None:
        self.registry = registry
        self.ready = ready
        self.alive = alive
        super().__init__(*args, **kwargs)  # handles the request

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._send(200, encoder(self.registry), content_type)
        elif path == "/healthz":
            alive = self.alive()
            self._send(200 if alive else 503, b"ok\n" if alive else b"dead: restart me\n")
        elif path == "/readyz":
            ready = self.ready()
            self._send(200 if ready else 503, b"ready\n" if ready else b"not ready\n")
        else:
            self._send(404, b"not found: /metrics, /healthz or /readyz\n")

    def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics http: " + format, *args)


class MetricsEndpoint:
    """``/metrics``, ``/healthz`` and ``/readyz`` over HTTP on ``host:port`` (bound at once; 0 = any
    free port, read back from ``port``), served from a daemon thread between start and stop."""

    def __init__(
        self,
        registry: CollectorRegistry,
        ready: Callable[[], bool],
        host: str,
        port: int,
        alive: Callable[[], bool] = lambda: True,
    ) -> None:
        self._server = ThreadingHTTPServer((host, port), partial(_Handler, registry, ready, alive))
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
