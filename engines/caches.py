"""A bounded cache that loads each key once: what stays hot in a serving process (users' adapters
by bytes, users' references by count).

Entries leave least recently used first once their total size passes the bound (one entry always
stays). A key being loaded is loaded once: other callers asking for it wait for that load and
share its result or its error, while keys already cached are served meanwhile (the load runs
outside the lock).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class HotCache(Generic[K, V]):
    def __init__(self, max_size: int, size: Callable[[V], int] = lambda value: 1) -> None:
        self.max_size = max_size
        self._size = size
        self._values: OrderedDict[K, V] = OrderedDict()
        self._loading: dict[K, Future[V]] = {}
        self._lock = threading.Lock()

    def get(self, key: K, load: Callable[[], V]) -> V:
        """The cached value of ``key``, or ``load()``'s, cached."""
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
            pending = self._loading.get(key)
            loads = pending is None
            if pending is None:
                pending = self._loading[key] = Future()
        if not loads:
            return pending.result()
        try:
            value = load()
        except BaseException as error:
            with self._lock:
                del self._loading[key]
            pending.set_exception(error)
            raise
        with self._lock:
            del self._loading[key]
            self._values[key] = value
            while self._total() > self.max_size and len(self._values) > 1:
                self._values.popitem(last=False)
        pending.set_result(value)
        return value

    def discard(self, which: Callable[[K], bool]) -> int:
        """Drops the cached entries whose key ``which`` holds (a load under way is left alone);
        how many."""
        with self._lock:
            keys = [key for key in self._values if which(key)]
            for key in keys:
                del self._values[key]
        return len(keys)

    def __contains__(self, key: K) -> bool:
        with self._lock:
            return key in self._values

    @property
    def size(self) -> int:
        with self._lock:
            return self._total()

    def _total(self) -> int:
        return sum(self._size(value) for value in self._values.values())

    @property
    def keys(self) -> list[K]:
        """Least recently used first."""
        with self._lock:
            return list(self._values)
