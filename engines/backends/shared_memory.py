"""Shared memory between the orchestrator and a Triton server on the same host: system (POSIX)
or CUDA regions, one per (role, input), registered once and rewritten only when their source
tensor changed.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import numpy as np
import torch

from easyphoto.rpc.errors import (
    EngineUnavailable,
)


class SystemRegions:
    """POSIX shared memory (``/dev/shm``): a Triton server on this host reads the inputs in place."""

    kind = "system"

    def __init__(self, client: Any) -> None:
        import tritonclient.utils.shared_memory as shm

        self._shm = shm
        self._client = client

    def create(self, name: str, size: int) -> object:
        return self._shm.create_shared_memory_region(name, f"/{name}", size)

    def register(self, name: str, handle: object, size: int) -> None:
        self._client.register_system_shared_memory(name, f"/{name}", size)

    def unregister(self, name: str) -> None:
        self._client.unregister_system_shared_memory(name)

    def write(self, handle: object, array: np.ndarray) -> None:
        self._shm.set_shared_memory_region(handle, [array])

    def destroy(self, handle: object) -> None:
        self._shm.destroy_shared_memory_region(handle)


class CudaRegions:
    """Device memory on Triton's GPU, shared through a CUDA IPC handle (a GPU host, with the
    ``gpu`` extra's cuda-python): the inputs are copied to the GPU once and every step's call
    reads them there. A probe region is made at start, so a host without a usable GPU says so
    at once instead of at the first request."""

    kind = "cuda"

    def __init__(self, client: Any, device_id: int = 0) -> None:
        try:
            import tritonclient.utils.cuda_shared_memory as cudashm
        except (ImportError, RuntimeError) as exc:  # tritonclient raises RuntimeError without cuda-python
            raise EngineUnavailable(f"CUDA shared memory needs cuda-python (the gpu extra): {exc}") from exc
        self._cudashm = cudashm
        self._client = client
        self.device_id = device_id
        try:
            self.destroy(self.create(f"easyphoto-probe-{os.getpid()}", 64))
        except Exception as exc:  # CudaSharedMemoryException: no device, no driver
            why = f"{exc} ({exc.__cause__})" if exc.__cause__ else str(exc)
            raise EngineUnavailable(
                f"CUDA shared memory on GPU {device_id} is not usable here: {why}"
            ) from exc

    def create(self, name: str, size: int) -> object:
        return self._cudashm.create_shared_memory_region(name, size, self.device_id)

    def register(self, name: str, handle: object, size: int) -> None:
        raw = self._cudashm.get_raw_handle(handle)
        self._client.register_cuda_shared_memory(name, raw, self.device_id, size)

    def unregister(self, name: str) -> None:
        self._client.unregister_cuda_shared_memory(name)

    def write(self, handle: object, array: np.ndarray) -> None:
        self._cudashm.set_shared_memory_region(handle, [array])

    def destroy(self, handle: object) -> None:
        self._cudashm.destroy_shared_memory_region(handle)


SharedRegions = SystemRegions | CudaRegions


SHARED_MEMORY_KINDS = ("none", "system", "cuda")


UNREGISTER_ATTEMPTS = 20
UNREGISTER_WAIT_SECONDS = 0.05


class SharedInputs:
    """One shared memory region per (role, input), registered with Triton once and reused.

    A region is rewritten only when its source tensor changed: the same tensor object at the same
    torch version counter (kept alive here, so its memory cannot be reused by another tensor) is
    already in place. Prompt embeddings and control images, the same at every step of a pass, are
    therefore copied once per pass instead of being serialized into every call (while the pass's
    steps run alone; a step batched with other passes' is a new concatenation, written each step).
    """

    def __init__(self, regions: SharedRegions, prefix: str) -> None:
        self.regions = regions
        self._prefix = prefix
        self._held: dict[str, tuple[object, int]] = {}
        self._sources: dict[str, tuple[torch.Tensor, int]] = {}
        self.writes = 0

    def place(self, key: str, source: torch.Tensor, array: np.ndarray) -> tuple[str, int]:
        """The region's name and the bytes used, with ``array`` (the prepared ``source``) in it."""
        name = self._name(key)
        held = self._held.get(key)
        if held is None or held[1] < array.nbytes:
            if held is not None:
                self._drop(key)
            handle = self.regions.create(name, array.nbytes)
            try:
                self.regions.register(name, handle, array.nbytes)
            except BaseException:  # Triton away: else the next create would reuse this memory's name
                self.regions.destroy(handle)
                raise
            self._held[key] = (handle, array.nbytes)
        cached = self._sources.get(key)
        if cached is None or cached[0] is not source or cached[1] != source._version:
            self.regions.write(self._held[key][0], np.ascontiguousarray(array))
            self._sources[key] = (source, source._version)
            self.writes += 1
        return name, array.nbytes

    def register_again(self) -> None:
        """Registers every region with Triton again: a restarted server has forgotten them, while
        their memory (ours) still holds the inputs."""
        for key, (handle, size) in self._held.items():
            with contextlib.suppress(Exception):  # not registered: the usual case after a restart
                self.regions.unregister(self._name(key))
            self.regions.register(self._name(key), handle, size)

    def _drop(self, key: str) -> None:
        # Unregistered first: when Triton cannot be asked, the region stays held (and is dropped
        # by a later call), rather than forgotten here with its memory still under its name.
        self._unregister(self._name(key))
        handle, _ = self._held.pop(key)
        self._sources.pop(key, None)
        self.regions.destroy(handle)

    def _unregister(self, name: str) -> None:
        """Triton lets go of a region a moment after the response of the last call that read it
        (it refuses with "currently in use" until then): asked again for up to a second."""
        for attempt in range(UNREGISTER_ATTEMPTS):
            try:
                self.regions.unregister(name)
                return
            except Exception as error:
                if "in use" not in str(error) or attempt == UNREGISTER_ATTEMPTS - 1:
                    raise
                time.sleep(UNREGISTER_WAIT_SECONDS)

    def _name(self, key: str) -> str:
        """The region's name, in Triton and in /dev/shm: unique to this backend and input."""
        return f"{self._prefix}-{key}"

    def close(self) -> None:
        for key in list(self._held):
            self._drop(key)
