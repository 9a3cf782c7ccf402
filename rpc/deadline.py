"""The deadline of the request the current thread works for, so remote engine calls end with it.

The gRPC layer opens :func:`request_deadline` around a request; a remote backend asks
:func:`time_left` for each call's timeout, so a call never outlives the request it serves (an
in-process call cannot be interrupted and is bounded by the pipeline's checks between steps).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar

from .errors import DeadlineExceeded

_deadline: ContextVar[float | None] = ContextVar("easyphoto_request_deadline", default=None)


def request_deadline(seconds: float | None) -> AbstractContextManager[None]:
    """Calls made inside end within ``seconds`` from now (None: no deadline)."""
    return request_deadline_at(None if seconds is None else time.monotonic() + seconds)


@contextmanager
def request_deadline_at(deadline: float | None) -> Iterator[None]:
    """Calls made inside end by ``deadline`` (``time.monotonic()`` seconds; None: no deadline).
    A thread that works for several requests at once (the step engine) opens it around each call."""
    token = _deadline.set(deadline)
    try:
        yield
    finally:
        _deadline.reset(token)


def deadline_at() -> float | None:
    """The deadline of the request this thread works for (``time.monotonic()`` seconds), to hand
    to another thread with the work."""
    return _deadline.get()


def time_left(limit: float) -> float:
    """The timeout of a call made now: ``limit``, or less when the request's deadline is nearer.
    Raises :class:`DeadlineExceeded` once the deadline passed."""
    deadline = _deadline.get()
    if deadline is None:
        return limit
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("the request's deadline passed before an engine call")
    return min(limit, left)
