"""What servers and clients agree on about the wire, with nothing of the server side: the
message-size limit and the decoding of a failed call's google.rpc details. Imports only grpc and
the google.rpc messages, so clients (``easyphoto.cli.client``) use it without torch or the
server machinery of :mod:`rpc.server`, which packs those details.
"""

from __future__ import annotations

from typing import Any, cast

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

# Encoded images are at most 20 MiB each; a request (several templates or photos) at most 256 MiB.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
ERROR_DOMAIN = "easyphoto.serve"


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
