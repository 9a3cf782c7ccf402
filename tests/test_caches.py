"""The serving cache: one load per key under concurrency, errors shared and not kept, LRU by size."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from easyphoto.engines.caches import HotCache


def test_concurrent_callers_of_one_key_share_a_single_load() -> None:
    cache: HotCache[str, int] = HotCache(max_size=10)
    loads: list[str] = []
    start = threading.Barrier(4)
    results: list[int] = []

    def slow_load() -> int:
        loads.append("alice")
        time.sleep(0.2)
        return 7

    def ask() -> None:
        start.wait()
        results.append(cache.get("alice", slow_load))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert loads == ["alice"] and results == [7, 7, 7, 7]


def test_a_cached_key_is_served_while_another_key_loads() -> None:
    cache: HotCache[str, int] = HotCache(max_size=10)
    cache.get("bob", lambda: 1)
    loading, release = threading.Event(), threading.Event()

    def blocked_load() -> int:
        loading.set()
        release.wait(10)
        return 2

    thread = threading.Thread(target=cache.get, args=("carol", blocked_load))
    thread.start()
    assert loading.wait(10)
    assert cache.get("bob", lambda: pytest.fail("bob is cached")) == 1
    release.set()
    thread.join(10)
    assert "carol" in cache


def test_a_failed_load_reaches_every_waiter_and_is_not_cached() -> None:
    cache: HotCache[str, int] = HotCache(max_size=10)
    loading, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def failing_load() -> int:
        loading.set()
        release.wait(10)
        raise OSError("disk gone")

    def ask(load: Callable[[], int]) -> None:
        try:
            cache.get("dave", load)
        except OSError as error:
            errors.append(error)

    first = threading.Thread(target=ask, args=(failing_load,))
    first.start()
    assert loading.wait(10)
    second = threading.Thread(target=ask, args=(lambda: pytest.fail("dave loads once at a time"),))
    second.start()
    time.sleep(0.3)  # the second caller now waits on the first one's load
    release.set()
    for thread in (first, second):
        thread.join(10)
    assert [str(error) for error in errors] == ["disk gone", "disk gone"]
    assert "dave" not in cache
    assert cache.get("dave", lambda: 3) == 3  # a later call loads again


def test_entries_leave_least_recently_used_first_past_the_size_bound() -> None:
    cache: HotCache[str, bytes] = HotCache(max_size=10, size=len)
    cache.get("a", lambda: b"1234")
    cache.get("b", lambda: b"1234")
    cache.get("a", lambda: b"")  # a is used again, b is now the oldest
    cache.get("c", lambda: b"1234")
    assert cache.keys == ["a", "c"] and cache.size == 8
    cache.get("huge", lambda: b"x" * 50)
    assert cache.keys == ["huge"]  # one entry always stays, even over the bound
