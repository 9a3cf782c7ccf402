"""Users' LoRAs as per-request data, never a patch of shared weights.

An :class:`Adapter` is one LoRA's low-rank factors on the serving device, named by the user and
version it belongs to (``ann@v3``). A model call carries one :class:`SampleAdapter` (adapter and
weight) or None per row of its batch, so one call can serve samples of several users: on each
LoRA-targeted layer, the rows of each adapter get ``weight * up @ down @ x`` added to the layer's
output in place, one pair of small matmuls per run of an adapter's neighbouring rows (the grouped
low-rank matmul of Punica/S-LoRA). Rows without an adapter see the base weights, bit for bit.

:class:`AdapterCache` keeps the adapters hot on the device, least recently used first out, bounded
by bytes; :class:`AdapterHooks` installs the per-row update on a model's targeted layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .caches import HotCache
from .lora import LoraTargets, LoraWeights, check_fits, submodule
from .roles.lora_feed import Factors

# A gibibyte of factors: a rank-128 SD 1.5 LoRA (75 M parameters) is 150 MB in fp16, 300 MB in fp32.
DEFAULT_CACHE_BYTES = 4 << 30


@dataclass(frozen=True)
class AdapterLayer:
    down: torch.Tensor  # (rank, in)
    up: torch.Tensor  # (out, rank), alpha / rank folded in


@dataclass(frozen=True, eq=False)
class Adapter:
    """One LoRA on the serving device; compared by identity (its factors are not compared)."""

    name: str
    layers: dict[tuple[str, str], AdapterLayer]  # (target, module as LoRA files name it)

    @classmethod
    def from_lora(cls, name: str, lora: LoraWeights, device: torch.device, dtype: torch.dtype) -> Adapter:
        layers = {}
        for layer in lora.layers:
            down = layer.down.flatten(1).to(device=device, dtype=dtype)
            up = (layer.up.flatten(1).float() * (layer.alpha / layer.rank)).to(device=device, dtype=dtype)
            layers[(layer.target, layer.module)] = AdapterLayer(down.contiguous(), up.contiguous())
        return cls(name, layers)

    @property
    def targets(self) -> set[str]:
        return {target for target, _ in self.layers}

    @property
    def nbytes(self) -> int:
        return sum(
            layer.down.numel() * layer.down.element_size() + layer.up.numel() * layer.up.element_size()
            for layer in self.layers.values()
        )


@dataclass(frozen=True)
class SampleAdapter:
    """The adapter a sample is computed with, at ``weight`` (the request's LoRA weight)."""

    adapter: Adapter
    weight: float

    @property
    def key(self) -> tuple[str, float]:
        return self.adapter.name, self.weight


AdapterRows = Sequence[SampleAdapter | None]


def active_rows(adapters: AdapterRows | None, target: str | None = None) -> list[SampleAdapter | None] | None:
    """The rows' adapters that change something: a weight other than 0 (and layers of ``target``,
    when given; a row whose adapter has none computes as the base model). None when no row's does,
    so a call without one runs the base model as it is."""
    if adapters is None:
        return None
    rows = [
        row
        if row is not None and row.weight != 0 and (target is None or target in row.adapter.targets)
        else None
        for row in adapters
    ]
    return rows if any(rows) else None


def concat_rows(parts: Sequence[tuple[AdapterRows | None, int]]) -> list[SampleAdapter | None] | None:
    """The adapters of several calls' rows made one call (each part: its rows' adapters, or None for
    ``count`` rows of the base model)."""
    return active_rows([row for adapters, count in parts for row in (adapters or [None] * count)])


class AdapterCache(HotCache[str, Adapter]):
    """Adapters by name, the least recently used dropped first once they pass ``max_bytes``
    (a batch running with a dropped adapter keeps it until it ends: it holds its own reference)."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        super().__init__(max_bytes, size=lambda adapter: adapter.nbytes)


@dataclass(frozen=True)
class _Group:
    """The rows of one (adapter, weight) in a call, as runs of neighbouring rows: a request's rows
    are neighbours in a batched step, so each run is a view of the batch, never a copy."""

    sample: SampleAdapter
    spans: tuple[tuple[int, int], ...]  # [start, stop) row ranges


_HOOKS_ATTRIBUTE = "_easyphoto_adapter_hooks"


class AdapterHooks:
    """The per-row LoRA update on every LoRA-targeted layer of a model; active only inside
    :meth:`rows`, for the calls of the thread that entered it. Installed once per model
    (:meth:`on`): every backend over the same modules shares the hooks."""

    @classmethod
    def on(cls, modules: dict[str, nn.Module], targets: LoraTargets) -> AdapterHooks:
        """The hooks of these modules, installed on first use. They are kept on the first module
        itself, not in a registry: a registry whose values hold their keys (the modules) would
        keep every model ever hooked alive, a trainer's fresh family per job among them."""
        key = next(iter(modules.values()), None)
        if key is None:
            return cls({}, targets)
        hooks = getattr(key, _HOOKS_ATTRIBUTE, None)
        if not isinstance(hooks, AdapterHooks) or hooks.modules != modules:
            if isinstance(hooks, AdapterHooks):
                hooks.remove()
            hooks = cls(modules, targets)
            setattr(key, _HOOKS_ATTRIBUTE, hooks)
        return hooks

    def __init__(self, modules: dict[str, nn.Module], targets: LoraTargets) -> None:
        self.modules = modules
        self.targets = targets
        self._rows: ContextVar[tuple[_Group, ...]] = ContextVar(f"adapter_rows_{id(self)}", default=())
        self._handles = []
        for target, root in modules.items():
            for name in targets.get(target, {}):
                layer = submodule(root, name)
                self._handles.append(layer.register_forward_hook(self._hook((target, name), layer)))

    @contextlib.contextmanager
    def rows(self, adapters: AdapterRows | None, batch: int) -> Iterator[None]:
        """Calls made inside compute each row with its adapter (``adapters``: one per row)."""
        rows = active_rows(adapters)
        if rows is None:
            yield
            return
        if len(rows) != batch:
            raise ValueError(f"{len(rows)} adapters for a batch of {batch} rows")  # a caller's bug
        token = self._rows.set(_groups(rows))
        try:
            yield
        finally:
            self._rows.reset(token)

    def _hook(self, key: tuple[str, str], layer: nn.Module) -> Callable[..., torch.Tensor | None]:
        conv = isinstance(layer, nn.Conv2d)

        def add_updates(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            for group in self._rows.get():
                factors = group.sample.adapter.layers.get(key)
                if factors is None:
                    continue
                for start, stop in group.spans:
                    add_low_rank_update_(
                        output[start:stop], args[0][start:stop], factors, conv, group.sample.weight
                    )

        return add_updates

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def adapter_from_lora(
    name: str, lora: LoraWeights, targets: LoraTargets, device: torch.device, dtype: torch.dtype
) -> Adapter:
    """``lora`` checked against the model's targeted layers and put on the device."""
    check_fits(lora, targets)
    return Adapter.from_lora(name, lora, device, dtype)


def adapter_factors(adapter: Adapter, target: str, layers: Sequence[str]) -> Factors:
    """The adapter's factors for one target in a graph's layer order, as numpy (what a graph with
    LoRA inputs is fed from: :func:`engines.roles.lora_feed.lora_feed`)."""
    factors: Factors = []
    for layer in layers:
        pair = adapter.layers.get((target, layer))
        factors.append(None if pair is None else (_numpy(pair.down), _numpy(pair.up)))
    return factors


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).numpy()


def _groups(adapters: AdapterRows) -> tuple[_Group, ...]:
    spans: dict[tuple[int, float], list[tuple[int, int]]] = {}
    samples: dict[tuple[int, float], SampleAdapter] = {}
    for index, sample in enumerate(adapters):
        if sample is None:
            continue
        key = (id(sample.adapter), sample.weight)
        runs = spans.setdefault(key, [])
        if runs and runs[-1][1] == index:  # the row after the last run's: that run grows
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
        samples[key] = sample
    return tuple(_Group(samples[key], tuple(runs)) for key, runs in spans.items())


def add_low_rank_update_(
    output: torch.Tensor, x: torch.Tensor, factors: AdapterLayer, conv: bool, weight: float
) -> None:
    """``output += weight * up @ down @ x`` in place, with the second matmul and the sum one
    kernel (measured 1.5-2.5x faster than adding :func:`low_rank_update`'s result on a Linear's
    rows, 2-11x on a 1x1 conv's, 2 CPU cores)."""
    down, up = factors.down, factors.up
    if not output.is_contiguous():  # no view to write through (a channels-last conv's output)
        output.add_(low_rank_update(x, down, up, conv), alpha=weight)
    elif conv:
        hidden = torch.matmul(down, x.flatten(2))  # (rows, rank, H*W)
        output.flatten(2).baddbmm_(up.expand(len(x), -1, -1), hidden, alpha=weight)
    else:
        flat = output.view(-1, output.shape[-1])
        flat.addmm_(x.reshape(-1, x.shape[-1]) @ down.T, up.T, alpha=weight)


def low_rank_update(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, conv: bool) -> torch.Tensor:
    """``up @ down @ x`` for a Linear layer's input ``(B, ..., in)`` or a 1x1 conv's ``(B, in, H, W)``,
    with one pair of factors for every row (``down (rank, in)``, ``up (out, rank)``) or a pair per
    row (``(B, rank, in)``, ``(B, out, rank)``, the graphs with LoRA inputs). Batched matmuls only,
    so the same code runs in PyTorch and exports to ONNX and TensorRT."""
    batch = x.shape[0]
    if conv:
        flat = x.flatten(2)  # (B, in, H*W)
        update = up @ (down @ flat)
        return update.reshape(batch, update.shape[1], *x.shape[2:])
    if down.dim() == 2:
        return (x @ down.T) @ up.T
    rows = x.reshape(batch, -1, x.shape[-1])  # (B, T, in)
    update = (rows @ down.transpose(-1, -2)) @ up.transpose(-1, -2)
    return update.reshape(*x.shape[:-1], update.shape[-1])
