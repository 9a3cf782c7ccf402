"""Tenants: who is calling, and how much they may ask at once.

With a tenants file (``--tenants FILE``) every call but health and reflection must carry an API key
in its metadata, ``authorization: Bearer KEY`` or ``x-api-key: KEY``; the key names a tenant, or is
a service key (the trainer's, for RefreshUser) that acts for the whole deployment. Keys are kept
as SHA-256 digests only. Each tenant has limits: calls in flight at once, and a token bucket of
calls a second; past either a call is RESOURCE_EXHAUSTED. Without a file the server is open: one
tenant, ``""``, without limits (the local demo).

The file (JSON, or YAML where PyYAML is installed)::

    {"tenants": {"acme": {"keys": ["sha256:<hex>"], "max_concurrent": 8,
                          "requests_per_second": 10, "burst": 20}},
     "service_keys": ["sha256:<hex>"]}

The interceptor puts the caller's :class:`Tenant` where the handler's thread finds it
(:func:`current_tenant`); what a tenant may see (its own users and jobs) is
:class:`easyphoto.users.namespace.Namespace`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from .errors import EasyPhotoError, InvalidArgument, TenantLimited, Unauthenticated
from .metrics import with_behavior

TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
# Calls anyone may make: probes and load balancers check health, tools read the API.
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.")
# Which tenant a service key acts for, where it acts for one.
TENANT_HEADER = "x-easyphoto-tenant"


@dataclass(frozen=True)
class Limits:
    """A tenant's defaults where its entry says nothing."""

    max_concurrent: int = 8
    requests_per_second: float = 10.0
    burst: int = 20


@dataclass(frozen=True)
class Tenant:
    name: str  # "" is the one tenant of an open server
    limits: Limits | None = None  # None: unlimited
    service: bool = False  # a service key: the whole deployment, every tenant's users

    @property
    def label(self) -> str:
        return "(service)" if self.service else self.name or "(open)"


OPEN = Tenant("")
SERVICE = Tenant("", service=True)
_current: ContextVar[Tenant] = ContextVar("tenant", default=OPEN)


def current_tenant() -> Tenant:
    """The caller of the call this thread is handling (the open tenant outside calls)."""
    return _current.get()


def key_digest(key: str) -> str:
    """How a key is written in the tenants file: ``sha256:<hex>`` of its UTF-8 bytes."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@dataclass
class _Bucket:
    """Calls a second (a token bucket) and calls in flight, for one tenant."""

    limits: Limits
    tokens: float = 0.0
    at: float = field(default_factory=time.monotonic)
    in_flight: int = 0

    def __post_init__(self) -> None:
        self.tokens = float(self.limits.burst)

    def take(self, now: float) -> str | None:
        """Takes a call; why not, where it may not."""
        self.tokens = min(self.limits.burst, self.tokens + (now - self.at) * self.limits.requests_per_second)
        self.at = now
        if self.in_flight >= self.limits.max_concurrent:
            return f"{self.in_flight} calls in flight; at most {self.limits.max_concurrent} at once"
        if self.tokens < 1:
            return f"more than {self.limits.requests_per_second:g} calls a second (burst {self.limits.burst})"
        self.tokens -= 1
        self.in_flight += 1
        return None


class TenantDirectory:
    """Keys to tenants, and each tenant's limits."""

    def __init__(self, keys: dict[str, Tenant]) -> None:
        self._keys = keys
        self._named = {t.name: t for t in keys.values() if not t.service}  # what a service key acts for
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    @classmethod
    def read(cls, path: Path) -> TenantDirectory:
        text = path.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            try:
                import yaml
            except ImportError:
                raise InvalidArgument(f"{path} is not JSON (YAML needs PyYAML installed)") from None
            data = yaml.safe_load(text)
        return cls.parse(data, str(path))

    @classmethod
    def parse(cls, data: Any, where: str = "tenants") -> TenantDirectory:
        if not isinstance(data, dict) or not isinstance(data.get("tenants", {}), dict):
            raise InvalidArgument(f"{where}: expected {{'tenants': {{name: {{'keys': [...]}}}}}}")
        keys: dict[str, Tenant] = {}
        for name, entry in data.get("tenants", {}).items():
            if not TENANT_NAME.match(str(name)):
                raise InvalidArgument(f"{where}: tenant name {name!r} must match {TENANT_NAME.pattern}")
            defaults = Limits()
            limits = Limits(
                int(entry.get("max_concurrent", defaults.max_concurrent)),
                float(entry.get("requests_per_second", defaults.requests_per_second)),
                int(entry.get("burst", defaults.burst)),
            )
            for digest in entry.get("keys", []):
                keys[_checked_digest(digest, where)] = Tenant(str(name), limits)
        for digest in data.get("service_keys", []):
            keys[_checked_digest(digest, where)] = SERVICE
        return cls(keys)

    def identify(self, metadata: dict[str, str]) -> Tenant:
        key = metadata.get("x-api-key") or _bearer(metadata.get("authorization", ""))
        if not key:
            raise Unauthenticated("no API key: send 'authorization: Bearer KEY' or 'x-api-key: KEY'")
        tenant = self._keys.get(key_digest(key))
        if tenant is None:
            raise Unauthenticated("the API key is not one this server knows")
        acting_for = metadata.get(TENANT_HEADER, "")
        if tenant.service and acting_for:
            named = self._named.get(acting_for)
            if named is None:
                raise Unauthenticated(f"{TENANT_HEADER} names no tenant", field=TENANT_HEADER)
            return named
        return tenant

    def admit(self, tenant: Tenant) -> None:
        """Counts a call of ``tenant`` in; TenantLimited past its limits. Pair with :meth:`release`."""
        if tenant.limits is None:
            return
        with self._lock:
            bucket = self._buckets.setdefault(tenant.name, _Bucket(tenant.limits))
            why = bucket.take(time.monotonic())
        if why is not None:
            raise TenantLimited(f"tenant {tenant.name}: {why}; retry later")

    def release(self, tenant: Tenant) -> None:
        if tenant.limits is None:
            return
        with self._lock:
            self._buckets[tenant.name].in_flight -= 1


def _checked_digest(digest: Any, where: str) -> str:
    text = str(digest)
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", text):
        raise InvalidArgument(
            f"{where}: keys are written 'sha256:<64 hex digits>' (printf %s KEY | sha256sum)"
        )
    return text


def _bearer(value: str) -> str:
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class TenantInterceptor(grpc.ServerInterceptor):
    """Identifies the caller of every call but health and reflection, holds it to its tenant's
    limits for the call's length, and leaves it to :func:`current_tenant` in the handler."""

    def __init__(
        self, directory: TenantDirectory, abort: Callable[[grpc.ServicerContext, EasyPhotoError], Any]
    ):
        self.directory = directory
        self._abort = abort

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.lstrip("/").startswith(OPEN_SERVICES):
            return handler
        return with_behavior(handler, self._streaming if handler.response_streaming else self._unary)

    def _enter(self, context: grpc.ServicerContext) -> Tenant:
        metadata = {k.lower(): v for k, v in context.invocation_metadata() if isinstance(v, str)}
        try:
            tenant = self.directory.identify(metadata)
            self.directory.admit(tenant)
        except EasyPhotoError as error:
            self._abort(context, error)
            raise
        _current.set(tenant)  # this thread handles this call until it returns
        return tenant

    def _unary(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            tenant = self._enter(context)
            try:
                return behavior(request, context)
            finally:
                self.directory.release(tenant)

        return call

    def _streaming(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            tenant = self._enter(context)
            try:
                yield from behavior(request, context)
            finally:
                self.directory.release(tenant)

        return call
