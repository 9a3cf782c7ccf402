"""A small Python client of the Generator service.

Imports only the generated API (``easyphoto.v1``), grpc and the standard library, plus the light
:mod:`easyphoto.rpc.wire` (no torch, no server machinery), so it is cheap to import anywhere::

    with GeneratorClient("127.0.0.1:50051", timeout=120) as client:
        response = client.generate(["template.jpg"], ["alice"], seed=7, **{"first_pass.steps": 30})

Request options are set by name on the ``GenerateRequest`` (``easyphoto/v1/generator.proto``):
a dotted name reaches a nested field (``first_pass.steps``), and a mapping sets several fields of
a nested message (``second_pass={"steps": 20, "strength": 0.3}``). A failed call raises
:class:`ServiceError` with the status code, message, reason and field violations.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from easyphoto.rpc.wire import (
    MAX_MESSAGE_BYTES,
    ClientSecurity,
    error_details,
    route_by_user_options,
    route_metadata,
)
from easyphoto.v1 import generator_pb2, generator_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
Template = bytes | str | os.PathLike[str]
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_INTEGERS = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_SFIXED64,
}


class ServiceError(Exception):
    """A failed call: its status ``code``, ``message``, the ``reason`` (google.rpc ErrorInfo) with
    its ``metadata``, and ``fields`` (google.rpc BadRequest: field name -> what is wrong)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str = "",
        fields: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.reason = reason
        self.fields = dict(fields or {})
        self.metadata = dict(metadata or {})
        super().__init__(str(self))

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> ServiceError:
        details = error_details(error)
        return cls(
            error.code(),
            details["message"] or "",
            details["reason"],
            details["fields"],
            details["metadata"],
        )

    def __str__(self) -> str:
        head = self.code.name if self.reason in ("", self.code.name) else f"{self.code.name} {self.reason}"
        lines = [f"{head}: {self.message}", *(f"  {field}: {why}" for field, why in self.fields.items())]
        return "\n".join(lines)


# ---- options by name ----


def option_field(message: Message | type[Message], name: str) -> FieldDescriptor:
    """The field a (dotted) option name names in ``message`` (a message or its class); ValueError
    listing the known names otherwise."""
    descriptor = cast(Descriptor, message.DESCRIPTOR)  # protobuf's stubs union it with upb's type
    *parents, last = name.split(".")
    for part in parents:
        field = _known(descriptor, part, name)
        if field.message_type is None or field.is_repeated:
            raise ValueError(f"{name!r}: {part!r} has no fields")
        descriptor = field.message_type
    field = _known(descriptor, last, name)
    if field.is_repeated:
        raise ValueError(f"{name!r} is a list; it has its own argument")
    return field


def _known(descriptor: Descriptor, part: str, name: str) -> FieldDescriptor:
    field = descriptor.fields_by_name.get(part)
    if field is None:
        raise ValueError(
            f"unknown option {name!r}; {descriptor.name} has {sorted(descriptor.fields_by_name)}"
        )
    return field


def set_option(message: Message, name: str, value: Any) -> None:
    """Sets the (dotted) field ``name`` of ``message``; a mapping or message sets a nested message."""
    field = option_field(message, name)
    *parents, last = name.split(".")
    for part in parents:
        message = getattr(message, part)
    try:
        if field.message_type is None:
            setattr(message, last, value)
        elif isinstance(value, Message):
            getattr(message, last).CopyFrom(value)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                set_option(getattr(message, last), key, item)
        else:
            raise TypeError(f"a message: give a mapping of its fields or set {name}.FIELD")
    except (TypeError, ValueError) as error:
        raise ValueError(f"option {name!r}: {error}") from error


def parse_option(message: Message | type[Message], assignment: str) -> tuple[str, Any]:
    """``NAME=VALUE`` (a dotted name) with the value typed from the field of ``message``."""
    name, equals, text = assignment.partition("=")
    if not equals:
        raise ValueError(f"{assignment!r} is not NAME=VALUE")
    field = option_field(message, name)
    try:
        return name, _typed(field, text)
    except ValueError as error:
        raise ValueError(f"option {name!r}: {error}") from error


def _typed(field: FieldDescriptor, text: str) -> Any:
    if field.type == FieldDescriptor.TYPE_BOOL:
        if text.lower() not in _TRUE + _FALSE:
            raise ValueError(f"{text!r} is not a boolean ({'/'.join(_TRUE)} or {'/'.join(_FALSE)})")
        return text.lower() in _TRUE
    if field.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return float(text)
    if field.type in _INTEGERS:
        return int(text)
    if field.type == FieldDescriptor.TYPE_STRING:
        return text
    if field.type == FieldDescriptor.TYPE_BYTES:
        return text.encode()
    if field.enum_type is not None:
        values = field.enum_type.values_by_name
        return values[text].number if text in values else int(text)
    raise ValueError("is a message; set one of its fields (NAME.FIELD=VALUE)")


def build_request(
    templates: Sequence[Template], user_ids: Sequence[str], options: Mapping[str, Any]
) -> generator_pb2.GenerateRequest:
    """Templates as encoded bytes or paths; ``options`` by (dotted) name."""
    request = generator_pb2.GenerateRequest(
        templates=[t if isinstance(t, bytes) else Path(t).read_bytes() for t in templates],
        user_ids=list(user_ids),
    )
    for name, value in options.items():
        set_option(request, name, value)
    return request


# ---- the client ----


class GeneratorClient:
    """Generate and GenerateStream on one channel to ``target``. Every call gets ``timeout``
    seconds (None: no deadline) unless it passes its own, and ``metadata``; failures raise
    :class:`ServiceError`. With ``route_by_user``, a target of several orchestrators (a headless
    Service's name, or ``ipv4:HOST:PORT,HOST:PORT``) gets each user's calls on one of them, where
    that user's adapter stays hot (:func:`easyphoto.rpc.wire.route_by_user_options`)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        timeout: float | None = 600.0,
        metadata: Sequence[tuple[str, str]] = (),
        channel: grpc.Channel | None = None,
        security: ClientSecurity | None = None,
        route_by_user: bool = False,
    ) -> None:
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            *(route_by_user_options() if route_by_user else []),
        ]
        self._channel = channel or (security or ClientSecurity()).channel(target, options=options)
        self._stub = generator_pb2_grpc.GeneratorStub(self._channel)
        self.timeout = timeout
        self.metadata = tuple(metadata)

    def generate(
        self,
        templates: Sequence[Template],
        user_ids: Sequence[str],
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> generator_pb2.GenerateResponse:
        request = build_request(templates, user_ids, options)
        try:
            return self._stub.Generate(
                request, timeout=self._timeout(timeout), metadata=self._metadata(user_ids)
            )
        except grpc.RpcError as error:
            raise ServiceError.from_rpc(error) from None

    def generate_stream(
        self,
        templates: Sequence[Template],
        user_ids: Sequence[str],
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> Iterator[generator_pb2.Progress | generator_pb2.GenerateResponse]:
        """Progress messages, then the response once the call ended OK; stopping early cancels it."""
        request = build_request(templates, user_ids, options)
        call = self._stub.GenerateStream(
            request, timeout=self._timeout(timeout), metadata=self._metadata(user_ids)
        )
        results = []
        try:
            for event in call:
                if event.WhichOneof("event") == "progress":
                    yield event.progress
                else:
                    results.append(event.result)
        except grpc.RpcError as error:
            raise ServiceError.from_rpc(error) from None
        finally:
            call.cancel()  # a no-op once the call is over
        if len(results) != 1:
            raise ServiceError(grpc.StatusCode.INTERNAL, f"the stream sent {len(results)} results, not one")
        yield results[0]

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _metadata(self, user_ids: Sequence[str]) -> tuple[tuple[str, str], ...]:
        return (*self.metadata, *route_metadata(user_ids))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GeneratorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
