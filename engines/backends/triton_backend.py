"""The triton backend: roles served by a Triton Inference Server, called over gRPC (KServe v2).

Inference goes through tritonclient's asyncio client on a private event loop, so
:meth:`TritonBackend.infer_many` sends several calls at once (a step's ControlNets when no fused
stage is served); control-plane calls (readiness, shared memory registration) use the sync client.

Inputs are built from the role descriptions (names, dtypes, shapes checked against the profile
before anything is sent), outputs come back as CPU tensors. Roles the repository does not serve
(dlib's embedder) go to a local ``fallback`` backend, and so do ``optional`` roles (a fused stage,
a face model) while Triton has no model of theirs. Which optional roles Triton serves, and which of
its models take users' adapters, is asked again whenever Triton comes back and every
:data:`ROLE_PROBE_SECONDS` while it is up: a Triton restarted with another repository (or one that
loads models later) is used as it is now. A call of an optional role that fails while Triton is up
asks at once, and runs again without the role if Triton dropped it. Readiness is Triton's
liveness and the required models' readiness; each call's timeout is the backend's ``timeout`` or,
nearer, the request's deadline (:mod:`rpc.deadline`); Triton's UNAVAILABLE and deadline errors
become :class:`EngineUnavailable` and :class:`DeadlineExceeded`. Users' LoRAs: each row of a call
names its adapter and weight; the served model (its graph with LoRA inputs) reads the factors,
which :meth:`TritonBackend.adapter` writes once into the adapter folder; a model without that graph
refuses an adapter with UNIMPLEMENTED rather than silently painting with the base model.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from easyphoto.rpc.deadline import time_left
from easyphoto.rpc.errors import (
    DeadlineExceeded,
    EasyPhotoError,
    EngineInputError,
    EngineUnavailable,
    RoleNotServed,
    Unimplemented,
)

from ..adapters import (
    Adapter,
    AdapterCache,
    AdapterRows,
    SampleAdapter,
    active_rows,
    adapter_factors,
    adapter_from_lora,
)
from ..interface import Backend, Tensors
from ..lora import LoraTargets, LoraWeights
from ..roles.description import RoleDescription
from ..roles.lora_feed import factors_file, save_factors
from ..roles.lora_inputs import lora_layers
from ..shapes import DTYPES, TensorSpec
from .shared_memory import SHARED_MEMORY_KINDS, CudaRegions, SharedInputs, SystemRegions

log = logging.getLogger(__name__)


DEFAULT_TIMEOUT_SECONDS = 60.0
# The optional inputs of a model that serves users' adapters (export/triton_repository.py).
ADAPTER_INPUTS = ("adapter", "adapter_weight")


T = TypeVar("T")


# Inputs at least this large travel through system shared memory when it is on (co-located server).
SHARED_MEMORY_MIN_BYTES = 16 * 1024

# The longest wait between attempts to reconnect to a Triton that went away. gRPC's default backoff
# grows to 120 s, so a restarted Triton would stay unused for long after it is back; a server on this
# host or in the cluster is cheap to ask once a second.
RECONNECT_BACKOFF_MAX_MS = 1000

# How often a ready Triton is asked again which optional roles and adapters its models serve (also
# at once whenever it comes back after being away).
ROLE_PROBE_SECONDS = 30.0


@dataclass(frozen=True)
class ServedRoles:
    """What a Triton serves, as last asked: replaced whole, so a call sees one answer."""

    remote: frozenset[str]  # roles sent to Triton; the others of ``roles`` run in the fallback
    adapters: frozenset[str]  # Triton's models that take users' adapters
    roles: dict[str, RoleDescription]


class TritonBackend:
    name = "triton"

    def __init__(
        self,
        url: str,
        roles: dict[str, RoleDescription],
        fallback: Backend | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        shared_memory: str = "none",
        shared_memory_min_bytes: int = SHARED_MEMORY_MIN_BYTES,
        cuda_device: int = 0,
        lora_targets: LoraTargets | None = None,
        adapter_dir: Path | None = None,
        optional: dict[str, RoleDescription] | None = None,
    ) -> None:
        """``roles`` must be served by Triton; each of ``optional`` is sent there while Triton has a
        model of it (:meth:`serves`), else to the fallback (a fused stage: to nobody, and a step
        calls its nets instead)."""
        import tritonclient.grpc as grpcclient

        self._client = grpcclient.InferenceServerClient(url=url, channel_args=_channel_args())
        self._grpc = grpcclient
        # Shared memory needs Triton on this host; one call at a time owns the regions (calls
        # without it run concurrently).
        try:
            self.shared = self._shared_inputs(shared_memory, cuda_device)
        except Exception:
            self._client.close()
            raise
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="triton-client", daemon=True).start()
        self._aio = self._await(self._connect(url))
        self.shared_min_bytes = shared_memory_min_bytes
        self._lock = threading.Lock()
        self.url = url
        self.timeout = timeout
        self.fallback = fallback
        self._lora_targets = lora_targets or {}
        # Where the served models read users' adapters (the orchestrator writes them there).
        self.adapter_dir = adapter_dir
        self.adapters = AdapterCache()
        self._required = dict(roles)
        self._optional = {k: v for k, v in (optional or {}).items() if k not in roles}
        self._probe_lock = threading.Lock()
        self._probed_at = -math.inf
        self._was_ready = False
        self._served = self._ask_what_is_served()

    def _shared_inputs(self, kind: str, cuda_device: int) -> SharedInputs | None:
        prefix = f"easyphoto-{os.getpid()}-{id(self):x}"
        if kind == "system":
            return SharedInputs(SystemRegions(self._client), prefix)
        if kind == "cuda":
            return SharedInputs(CudaRegions(self._client, cuda_device), prefix)
        if kind == "none":
            return None
        raise ValueError(f"shared memory {kind!r} is unknown; use one of {SHARED_MEMORY_KINDS}")

    @property
    def roles(self) -> dict[str, RoleDescription]:
        return self._served.roles

    @property
    def remote_roles(self) -> frozenset[str]:
        """The roles sent to Triton now."""
        return self._served.remote

    def _ask_what_is_served(self) -> ServedRoles:
        """Which optional roles Triton has models of now, and which of its models take adapters
        (a Triton that does not answer: the required roles, none taking adapters)."""
        remote = set(self._required) | {name for name, role in self._optional.items() if self.serves(role)}
        described = {**self._required, **self._optional}
        adapters = {name for name in remote if described[name].lora_target and self._takes_adapters(name)}
        roles = {name: described[name] for name in sorted(remote)}
        if self.fallback is not None:
            roles.update({k: v for k, v in self.fallback.roles.items() if k not in roles})
        return ServedRoles(frozenset(remote), frozenset(adapters), roles)

    def _probe_again(self) -> None:
        """Asks Triton again what it serves, and says what changed."""
        with self._probe_lock:
            before, now = self._served, self._ask_what_is_served()
            self._served, self._probed_at = now, time.monotonic()
        for level, change, names in (
            (logging.INFO, "now serves", now.remote - before.remote),
            (logging.WARNING, "no longer serves", before.remote - now.remote),
            (logging.INFO, "now takes users' adapters in", now.adapters - before.adapters),
            (logging.WARNING, "no longer takes users' adapters in", before.adapters - now.adapters),
        ):
            if names:
                log.log(level, "triton at %s %s %s", self.url, change, sorted(names))

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def serves(self, description: RoleDescription) -> bool:
        """Whether Triton has a ready model of this role whose inputs and outputs are the
        description's (names and datatypes): an optional role (a fused stage, a face model) is sent
        there only then, so a repository written for other face models is not called by mistake."""
        try:
            if not self._client.is_model_ready(description.name, client_timeout=5):
                return False
            metadata = self._client.get_model_metadata(description.name, as_json=True, client_timeout=5)
        except Exception:  # unknown model or unreachable server
            return False
        theirs = {
            (t["name"], t["datatype"])
            for t in [*metadata.get("inputs", []), *metadata.get("outputs", [])]
            if t["name"] not in ADAPTER_INPUTS  # a model that also serves users' adapters
        }
        ours = {(t.name, DTYPES[t.dtype].triton) for t in (*description.inputs, *description.outputs)}
        if theirs != ours:
            log.warning("triton's %s is another model (%s); not using it", description.name, sorted(theirs))
            return False
        return True

    def ready(self) -> bool:
        """Triton's liveness, as both connections see it (each reconnects on its own after Triton
        comes back: ready only once the one inference uses has too), and every required model's
        readiness. Not Triton's own readiness, which counts every model of its repository: an
        optional one it lost (a fused stage, a face model) is computed without it. A Triton ready
        again after being away (or not asked for a while) is asked which optional roles and
        adapters it serves."""
        try:
            ready = self._client.is_server_live(client_timeout=5) and self._await(
                self._aio.is_server_live(client_timeout=5)  # type: ignore[attr-defined]
            )
            ready = ready and all(
                self._client.is_model_ready(role, client_timeout=5) for role in self._required
            )
        except Exception as exc:  # unreachable server: not ready
            if self._was_ready:
                log.warning("triton at %s not ready: %s", self.url, exc)
            ready = False
        came_back, self._was_ready = ready and not self._was_ready, ready
        if came_back or (ready and time.monotonic() - self._probed_at > ROLE_PROBE_SECONDS):
            self._probe_again()
        return ready

    def lora_targets(self) -> LoraTargets:
        return self._lora_targets

    def retire_adapters(self, which: Callable[[str], bool]) -> None:
        self.adapters.discard(which)

    def adapter(self, name: str, load: Callable[[], LoraWeights]) -> Adapter:
        """The LoRA checked against the manifest's targeted layers (it has to fit before anything is
        sent), its factors written once into the adapter folder the served models read them from."""
        return self.adapters.get(name, lambda: self._publish_adapter(name, load()))

    def warm_adapter(self, adapter: Adapter) -> None:
        """Each of Triton's models that takes ``adapter`` (text encoder, UNet, fused stages) loads its
        factors now, through one call at the smallest shapes it serves: a model reads an adapter's
        file on first use, and that use is then RefreshUser's instead of the user's first request."""
        for role in sorted(self._served.adapters):
            description = self.roles[role]
            if description.lora_target not in adapter.targets:
                continue
            inputs = description.sample_inputs("min")
            self.infer(role, inputs, [SampleAdapter(adapter, 1.0)] * len(next(iter(inputs.values()))))

    def _publish_adapter(self, name: str, lora: LoraWeights) -> Adapter:
        adapter = adapter_from_lora(name, lora, self._lora_targets, torch.device("cpu"), torch.float32)
        if self.adapter_dir is None:
            return adapter
        self.adapter_dir.mkdir(parents=True, exist_ok=True)
        for target in sorted(adapter.targets):
            path = self.adapter_dir / factors_file(name, target)
            if path.is_file():  # names are user@version: a written file never changes
                continue
            layers = lora_layers(self._lora_targets, target)
            factors = adapter_factors(adapter, target, layers)
            _write_whole(path, partial(save_factors, layers=layers, factors=factors))
        return adapter

    def _takes_adapters(self, role: str) -> bool:
        """Whether Triton's model of ``role`` takes users' adapters (its optional ``adapter`` input)."""
        try:
            metadata = self._client.get_model_metadata(role, as_json=True, client_timeout=5)
        except Exception:  # unknown model or unreachable server: no adapters
            return False
        return any(t["name"] == ADAPTER_INPUTS[0] for t in metadata.get("inputs", []))

    def infer(self, role: str, inputs: Tensors, adapters: AdapterRows | None = None) -> Tensors:
        return self._as_served_now({role}, lambda: self._infer_once(role, inputs, adapters))

    def _infer_once(self, role: str, inputs: Tensors, adapters: AdapterRows | None) -> Tensors:
        rows = active_rows(adapters)
        served = self._served
        self._check_served(role, served)
        if rows is not None and role in served.roles and served.roles[role].lora_target is None:
            raise EngineInputError(role, "adapters", "given to a role that takes no LoRA")
        if rows is not None and role not in served.adapters:
            raise Unimplemented(
                f"triton's {role} model serves no users' adapters: export it with its LoRA graph and write"
                " the repository with an adapter folder (easyphoto export --triton DIR --adapter-dir ...)"
            )
        if rows is None:
            return self._infer_many_once([(role, inputs)])[0]
        if self.shared is None:
            return self._send([self._request(role, inputs, rows)])[0]
        return self._infer_shared([(role, inputs, rows)])[0]

    def infer_many(self, calls: list[tuple[str, Tensors]]) -> list[Tensors]:
        """Several calls at once (concurrently on the server); results in the order of ``calls``."""
        return self._as_served_now({role for role, _ in calls}, lambda: self._infer_many_once(calls))

    def _infer_many_once(self, calls: list[tuple[str, Tensors]]) -> list[Tensors]:
        served = self._served
        local = [i for i, (role, _) in enumerate(calls) if role not in served.remote]
        for index in local:
            self._check_served(calls[index][0], served)
        results: dict[int, Tensors] = {i: self.fallback.infer(*calls[i]) for i in local}  # type: ignore[union-attr]
        remote = [i for i in range(len(calls)) if i not in results]
        if self.shared is None:
            answers = self._send([self._request(*calls[i]) for i in remote])
        else:
            answers = self._infer_shared([(*calls[i], None) for i in remote])
        results.update(zip(remote, answers, strict=True))
        return [results[i] for i in range(len(calls))]

    def _check_served(self, role: str, served: ServedRoles) -> None:
        """Nothing when Triton or the fallback serves ``role``; RoleNotServed for an optional one
        neither does now (a fused stage Triton dropped), EngineInputError for any other."""
        if role in served.remote or (self.fallback is not None and role in self.fallback.roles):
            return
        if role in self._optional:
            raise RoleNotServed(role)
        raise EngineInputError(role, "role", f"unknown; this backend serves {sorted(served.roles)}")

    def _as_served_now(self, roles: set[str], call: Callable[[], T]) -> T:
        """``call``; when it fails UNAVAILABLE (or NOT_FOUND) while Triton itself is up, Triton is
        asked at once what it serves. A call that sent an optional role Triton no longer serves (its
        model unloaded, or not ready since its instance died) then runs once more as the roles are
        served now: in the fallback, or for a fused stage as RoleNotServed, which the caller
        computes another way. Without this such a role failed until the next probe."""
        sent = roles & self._served.remote & self._optional.keys()
        started = time.monotonic()
        try:
            return call()
        except RoleNotServed:
            raise
        except EngineUnavailable:
            if not sent or not self._withdrawn(sent, started):
                raise
        return call()

    def _withdrawn(self, sent: set[str], since: float) -> bool:
        """Whether Triton is up and serves some of ``sent`` no longer: asked again, unless it was
        asked after ``since`` (the failed call's start), so calls failing together ask once."""
        try:  # live, not ready: Triton's own readiness counts every model, the dropped one too
            if not self._client.is_server_live(client_timeout=5):
                return False
        except Exception:  # unreachable: a Triton that went away, not a withdrawn role
            return False
        with self._probe_lock:
            fresh = self._probed_at >= since
        if not fresh:
            self._probe_again()
        return bool(sent - self._served.remote)

    def _infer_shared(self, calls: list[tuple[str, Tensors, AdapterRows | None]]) -> list[Tensors]:
        """One call at a time owns the shared regions; a server that lost them (restarted) gets
        them registered again, once, and the calls are retried."""
        assert self.shared is not None
        with self._lock:
            try:
                return self._send(self._shared_control(lambda: [self._request(*call) for call in calls]))
            except EasyPhotoError as error:
                if "shared memory region" not in error.message:
                    raise
                log.warning("triton at %s lost our shared memory regions; registering them again", self.url)
                self._shared_control(self.shared.register_again)
                return self._send(self._shared_control(lambda: [self._request(*call) for call in calls]))

    def _shared_control(self, work: Callable[[], T]) -> T:
        """``work``, which may (un)register regions with Triton (a new or larger input, or every
        region again), its control-plane errors typed as a call's are: a Triton that went away is
        UNAVAILABLE to the client, not an unknown error."""
        try:
            return work()
        except self._grpc.InferenceServerException as exc:
            raise _engine_error("shared memory", exc) from exc

    async def _connect(self, url: str) -> object:
        import tritonclient.grpc.aio as aioclient

        return aioclient.InferenceServerClient(url=url, channel_args=_channel_args())

    def _await(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _request(
        self, role: str, inputs: Tensors, adapters: AdapterRows | None = None
    ) -> tuple[str, list[object], list[object]]:
        description = self.roles[role]
        description.bind({name: tuple(t.shape) for name, t in inputs.items()})
        request = [self._input(role, description, spec, inputs[spec.name]) for spec in description.inputs]
        if adapters is None and role in self._served.adapters:
            # Base rows named as such: Triton's batcher merges only requests with the same inputs.
            adapters = [None] * len(next(iter(inputs.values())))
        if adapters is not None:
            request += self._adapter_inputs(adapters)
        return role, request, [self._grpc.InferRequestedOutput(spec.name) for spec in description.outputs]

    def _adapter_inputs(self, adapters: AdapterRows) -> list[object]:
        """Each row's adapter name (``""``: the base model) and weight: names, never factors."""
        names = np.array([[(s.adapter.name if s else "").encode()] for s in adapters], dtype=np.object_)
        weights = np.array([[s.weight if s else 0.0] for s in adapters], np.float32)
        name_input = self._grpc.InferInput(ADAPTER_INPUTS[0], list(names.shape), "BYTES")
        name_input.set_data_from_numpy(names)
        weight_input = self._grpc.InferInput(ADAPTER_INPUTS[1], list(weights.shape), "FP32")
        weight_input.set_data_from_numpy(weights)
        return [name_input, weight_input]

    def _send(self, requests: list[tuple[str, list[object], list[object]]]) -> list[Tensors]:
        """The requests, concurrently, each bounded by the timeout (or the request's deadline)."""
        timeout = time_left(self.timeout)
        calls = (self._call(*request, timeout) for request in requests)
        return self._await(_gather(calls))

    async def _call(self, role: str, request: list[object], outputs: list[object], timeout: float) -> Tensors:
        try:
            result = await self._aio.infer(role, request, outputs=outputs, client_timeout=timeout)  # type: ignore[attr-defined]
        except Exception as exc:
            raise _engine_error(role, exc) from exc
        return {
            spec.name: torch.from_numpy(result.as_numpy(spec.name).copy())
            for spec in self.roles[role].outputs
        }

    def _input(
        self, role: str, description: RoleDescription, spec: TensorSpec, source: torch.Tensor
    ) -> object:
        array: np.ndarray = source.detach().to("cpu").numpy()
        array = array.astype(DTYPES[spec.dtype].numpy, copy=False)
        if description.per_sample_scalar(spec):
            array = array.reshape(-1, 1)
        tensor = self._grpc.InferInput(spec.name, list(array.shape), DTYPES[spec.dtype].triton)
        if self.shared is not None and array.nbytes >= self.shared_min_bytes:
            region, size = self.shared.place(f"{role}-{spec.name}", source, array)
            tensor.set_shared_memory(region, size)
        else:
            tensor.set_data_from_numpy(np.ascontiguousarray(array))
        return tensor

    def close(self) -> None:
        """Unregisters and frees the shared memory regions and closes the connections."""
        if self.shared is not None:
            with self._lock:  # not under a call that is using them
                self.shared.close()
        self._await(self._aio.close())  # type: ignore[attr-defined]
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._client.close()


def _write_whole(path: Path, write: Callable[..., None]) -> None:
    """``write`` into a temporary file of its own beside ``path``, fsynced, then renamed onto it: a
    reader (Triton's model) or a restart finds the whole file or none, however writers race."""
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(handle)
    temporary = Path(name)
    try:
        write(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _channel_args() -> list[tuple[str, int]]:
    """tritonclient's default channel options (which ``channel_args`` replaces) and a short
    reconnect backoff (:data:`RECONNECT_BACKOFF_MAX_MS`)."""
    from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions

    keepalive = KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS),
    ]


async def _gather(calls: Iterator[Coroutine[Any, Any, T]]) -> list[T]:
    return list(await asyncio.gather(*calls))


def _engine_error(role: str, exc: Exception) -> EasyPhotoError:
    status = str(getattr(exc, "status", lambda: "")() or "")
    message = f"triton {role}: {getattr(exc, 'message', lambda: str(exc))()}"
    if "DEADLINE" in status:
        return DeadlineExceeded(message)
    if "UNAVAILABLE" in status or "NOT_FOUND" in status:
        return EngineUnavailable(message)
    return EasyPhotoError(message, metadata={"role": role, "status": status})
