"""What servers and clients agree on about the wire, with nothing of the server side: the
message-size limit, the decoding of a failed call's google.rpc details and the routing of a user's
calls to one replica. Imports only grpc and
the google.rpc messages, so clients (``easyphoto.cli.client``) use it without torch or the
server machinery of :mod:`rpc.server`, which packs those details.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

# Encoded images are at most 20 MiB each; a request (several templates or photos) at most 256 MiB.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
ERROR_DOMAIN = "easyphoto.serve"
# Routing by user: a call carries its user in this header, and a channel whose target resolves to
# several orchestrators (a headless Service) sends equal values to the same one with gRPC's
# ring_hash policy hashing the header (gRFC A76), so a user's adapter stays hot on one replica.
ROUTE_HEADER = "x-easyphoto-route"
# grpcio (1.85 here) reads ring_hash's requestHashHeader only with this set; it is read when a
# channel's policy is configured, so setting it then is in time.
_RING_HASH_HEADER_SWITCH = "GRPC_EXPERIMENTAL_RING_HASH_SET_REQUEST_HASH_KEY"


def error_details(error: grpc.RpcError) -> dict[str, Any]:
    """Client side: the code name, message, reason (and its metadata) and field violations of a
    failed call."""
    result: dict[str, Any] = {
        "code": error.code().name,
        "message": error.details(),
        "reason": "",
        "metadata": {},
        "fields": {},
    }
    status = rpc_status.from_call(cast(grpc.Call, error))  # a stub's RpcError is also its Call
    if status is None:
        return result
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            result["reason"] = info.reason
            result["metadata"] = dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            result["fields"] = {v.field: v.description for v in bad.field_violations}
    return result


def route_by_user_options() -> list[tuple[str, Any]]:
    """Channel options that route each call by its :data:`ROUTE_HEADER` over the target's addresses
    (one address: every call goes there, as without them)."""
    os.environ.setdefault(_RING_HASH_HEADER_SWITCH, "true")
    policy = {"ring_hash_experimental": {"requestHashHeader": ROUTE_HEADER}}
    return [("grpc.service_config", json.dumps({"loadBalancingConfig": [policy]}))]


def route_metadata(user_ids: Sequence[str]) -> list[tuple[str, str]]:
    """The routing header of a call for ``user_ids`` (as their tenant's clients name them): its first
    user's, so a group photo goes where that user's own requests go. None without a user (ring_hash
    then picks at random). Two tenants' ``alice`` share a replica, which costs nothing."""
    first = next((user for user in user_ids if user), "")
    return [(ROUTE_HEADER, first)] if first else []


@dataclass(frozen=True)
class ClientSecurity:
    """How a client reaches a secured server: an API key sent with every call (and, for a service
    key, the tenant it acts for), and the CA that signed the server's TLS certificate."""

    api_key: str = ""
    tls_ca: Path | None = None
    tenant: str = ""  # with a service key: act for this tenant

    def metadata(self) -> list[tuple[str, str]]:
        pairs = [("authorization", f"Bearer {self.api_key}")] if self.api_key else []
        return pairs + ([("x-easyphoto-tenant", self.tenant)] if self.tenant else [])

    def channel(self, target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        if self.tls_ca is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=self.tls_ca.read_bytes())
            channel = grpc.secure_channel(target, credentials, options=list(options))
        else:
            channel = grpc.insecure_channel(target, options=list(options))
        metadata = self.metadata()
        return grpc.intercept_channel(channel, _WithMetadata(metadata)) if metadata else channel


class _WithMetadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds fixed metadata (the API key) to every call of a channel."""

    def __init__(self, metadata: list[tuple[str, str]]) -> None:
        self._metadata = metadata

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or ()), *self._metadata])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)
