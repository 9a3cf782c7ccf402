"""Returning the C heap's free pages (``rpc/heap.py``): for real on this machine's glibc, in a
process of its own so that the RSS measured is that process's alone."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest

from easyphoto.rpc import heap
from easyphoto.rpc.heap import HeapTrimmer

needs_glibc = pytest.mark.skipif(heap._MALLOC_TRIM is None, reason="the C library has no malloc_trim")

# 2000 blocks of 100 kB (under glibc's mmap threshold, so on the heap), then all freed but every
# 50th: the freed pages lie between live blocks, where free() alone never returns them.
FRAGMENT = """
import json, os
from easyphoto.rpc.heap import trim_heap

def rss_mb():
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

blocks = [bytearray(100_000) for _ in range(2000)]
kept = blocks[::50]
del blocks
before = rss_mb()
returned = trim_heap()
print(json.dumps({"before": before, "after": rss_mb(), "returned": returned, "kept": len(kept)}))
"""


@needs_glibc
def test_trim_heap_returns_the_pages_between_live_blocks() -> None:
    run = subprocess.run([sys.executable, "-c", FRAGMENT], capture_output=True, text=True, check=True)
    measured = json.loads(run.stdout)
    assert measured["returned"] is True
    # ~190 MB lay freed between the 40 kept blocks; at least most of it goes back.
    assert measured["before"] - measured["after"] > 150, measured


class FakeClock:
    """Each reading advances by ``step`` seconds: a trim takes ``step`` between its two readings."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


@needs_glibc
def test_trimmer_spaces_trims_to_stay_within_its_budget() -> None:
    clock = FakeClock(step=0.01)
    trimmer = HeapTrimmer(budget=0.05, clock=clock)
    assert trimmer() is True  # the first call trims: 0.01 s, so the next waits 0.2 s
    trimmed_at = clock.now
    results = []
    while clock.now < trimmed_at + 0.5:
        read_at = clock.now + clock.step  # the trimmer's first reading in this call
        results.append((round(read_at - trimmed_at, 2), trimmer()))
    trims = [at for at, trimmed in results if trimmed]
    assert trims, results
    # The second trim comes at the first reading 0.2 s after the first trim ended.
    assert 0.2 <= trims[0] <= 0.21, results
    assert trimmer.trims == 1 + len(trims)
    assert all(later - earlier >= 0.2 for earlier, later in itertools.pairwise(trims))


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5])
def test_trimmer_refuses_a_budget_outside_0_to_1(budget: float) -> None:
    with pytest.raises(ValueError, match="budget"):
        HeapTrimmer(budget=budget)
