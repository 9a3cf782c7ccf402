"""Typed errors shared by both services, each carrying the gRPC status it maps to.

Engines and pipelines raise these; the gRPC layer (:mod:`rpc.server`) turns them into a status
with a google.rpc ``BadRequest`` (for a field) or ``ErrorInfo`` (for a reason) attached, so the
client always learns which field or stage failed and why.
"""

from __future__ import annotations

import math
from typing import ClassVar


class EasyPhotoError(Exception):
    """Base of every error a client may see. ``code`` is a grpc.StatusCode name."""

    code: ClassVar[str] = "INTERNAL"
    reason: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str, *, field: str = "", metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.metadata = dict(metadata or {})


class InvalidArgument(EasyPhotoError):
    code = "INVALID_ARGUMENT"
    reason = "INVALID_ARGUMENT"


class ImageUnreadable(InvalidArgument):
    reason = "IMAGE_UNREADABLE"


class ImageTooLarge(InvalidArgument):
    reason = "IMAGE_TOO_LARGE"


class ImageTooSmall(InvalidArgument):
    reason = "IMAGE_TOO_SMALL"


class NoFace(EasyPhotoError):
    code = "FAILED_PRECONDITION"
    reason = "NO_FACE"


class FaceTooSmall(EasyPhotoError):
    code = "FAILED_PRECONDITION"
    reason = "FACE_TOO_SMALL"


class TooManyFaces(InvalidArgument):
    reason = "TOO_MANY_FACES"


class NotFound(EasyPhotoError):
    code = "NOT_FOUND"
    reason = "NOT_FOUND"


class NoUsablePhotos(EasyPhotoError):
    """Every training photo was dropped; the message lists each photo's reason."""

    code = "FAILED_PRECONDITION"
    reason = "NO_USABLE_PHOTOS"


class UnknownUser(NotFound):
    reason = "UNKNOWN_USER"


class UserNotReady(EasyPhotoError):
    code = "FAILED_PRECONDITION"
    reason = "USER_NOT_READY"


class Cancelled(EasyPhotoError):
    code = "CANCELLED"
    reason = "CANCELLED"


class DeadlineExceeded(EasyPhotoError):
    code = "DEADLINE_EXCEEDED"
    reason = "DEADLINE_EXCEEDED"


class Overloaded(EasyPhotoError):
    """Too many requests are already waiting; the client should back off and retry."""

    code = "RESOURCE_EXHAUSTED"
    reason = "OVERLOADED"


class TenantLimited(Overloaded):
    """The caller's tenant is past its calls in flight or its calls a second (``rpc.tenants``)."""

    reason = "TENANT_LIMIT"


class Unauthenticated(EasyPhotoError):
    """No API key, or one the server does not know, where a tenants file is in force."""

    code = "UNAUTHENTICATED"
    reason = "UNAUTHENTICATED"


class ModelMissing(EasyPhotoError):
    """The request needs a model this deployment was not given (a pass's ControlNet, say)."""

    code = "FAILED_PRECONDITION"
    reason = "MODEL_MISSING"


class EngineUnavailable(EasyPhotoError):
    code = "UNAVAILABLE"
    reason = "ENGINE_UNAVAILABLE"


class RoleNotServed(EngineUnavailable):
    """An optional role (a fused stage) the engines no longer serve: the caller computes it another
    way (the stage's nets one by one)."""

    def __init__(self, role: str) -> None:
        super().__init__(f"{role} is no longer served", metadata={"role": role})
        self.role = role


class EngineInputError(InvalidArgument):
    """A tensor handed to an engine does not fit the role's description (a bug upstream or a bad size)."""

    reason = "ENGINE_INPUT"

    def __init__(self, role: str, name: str, problem: str) -> None:
        super().__init__(f"{role}: input {name!r} {problem}", field=name, metadata={"role": role})
        self.role = role


class Unimplemented(EasyPhotoError):
    code = "UNIMPLEMENTED"
    reason = "UNIMPLEMENTED"


def check_length(field: str, text: str, limit: int) -> None:
    """InvalidArgument naming ``field`` when ``text`` has more than ``limit`` characters."""
    if len(text) > limit:
        raise InvalidArgument(f"{field} has {len(text)} characters; at most {limit}", field=field)


def check_range(field: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    """InvalidArgument naming ``field`` unless ``low <= value <= high`` (``low < value`` if open);
    NaN is never in range (it compares false with every bound)."""
    below = value <= low if low_open else value < low
    if math.isnan(value) or below or value > high:
        bracket = "(" if low_open else "["
        raise InvalidArgument(f"{field} is {value}; allowed {bracket}{low}, {high}]", field=field)
