"""SIGTERM and SIGINT for a service process, from its first line to its last.

A container runtime sends SIGTERM whenever it likes: during the imports, while the models load,
under load. Python's default action kills the process with status 143 before a handler exists,
and letting the interpreter finalise while a thread is still inside native code (torch loading
weights, onnxruntime's pools) aborts it ("terminate called without an active exception"). So a
service catches the signals before importing anything heavy, exits 0 at once while it is still
starting (nothing was accepted, so nothing is lost), drains once it serves, and ends the process
without finalising the interpreter once it has stopped in order.

This module imports only the standard library: it runs before the imports it guards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from typing import NoReturn

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Termination:
    """The process's record of a termination signal. ``starting`` until :meth:`serving`: a signal
    then exits at once; afterwards it is recorded for :meth:`wait`, which the main thread blocks
    in until it comes."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.starting = True
        self._done = threading.Event()
        self._installed = False

    def install(self) -> Termination:
        if not self._installed and threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                signal.signal(sig, self._handle)
            self._installed = True
        return self

    def serving(self) -> Termination:
        """From now on a signal asks to drain (the caller is about to accept requests)."""
        self.install()
        self.starting = False
        return self

    def wait(self) -> str:
        """Blocks until a signal came (at once if one already did); returns its name."""
        while not self._done.wait(1.0):
            pass
        return self.received[0]

    def _handle(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if self.starting:
            # Nothing was accepted yet: no request to drain, no job claimed.
            end_process(0, f"{name} while starting: exiting before serving anything")
        self.received.append(name)
        self._done.set()


TERMINATION = Termination()


def end_process(status: int = 0, why: str = "") -> NoReturn:
    """Ends the process now with ``status``: logs flushed, the interpreter not finalised (threads
    still inside native code would abort it)."""
    if why:
        log.warning("%s", why)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to say
            stream.flush()
    os._exit(status)
