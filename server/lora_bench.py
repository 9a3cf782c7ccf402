"""``easyphoto bench --only lora``: a UNet step with users' adapters against the base weights.

The per-sample adapters of ``engines/adapters.py`` (forward hooks adding each row's low-rank
update) are timed on one UNet step at the batch sizes the step engine makes, with one user on every
row and with a different user on each CFG pair, beside the base weights (what merged weights cost
a step) and beside what merging one LoRA into the weights and taking it out again costs (one user
switch when serving merged). Random weights and random LoRAs: speed, not quality. The section goes
into ``docs/benchmarks.md``; ``docs/design.md`` takes its adapters-or-merged rule from it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from diffusers import UNet2DConditionModel

from easyphoto.engines.adapters import Adapter, AdapterHooks, SampleAdapter
from easyphoto.engines.backends.torch_backend import default_device, default_dtype
from easyphoto.engines.lora import LoraWeights, fuse_lora, lora_targets
from easyphoto.engines.models.family import ModelFamily
from easyphoto.engines.models.loading import resolve_family
from easyphoto.fixtures.users import random_lora

from .bench import device_name

RANK = 128
PRECISION = {torch.float16: "fp16", torch.float32: "fp32"}
PROMPT_TOKENS = 77


@dataclass(frozen=True)
class StepTimes:
    """Median seconds of one UNet step of ``batch`` rows."""

    batch: int
    base: float
    one_user: float
    mixed: float  # a different user on every row: the most adapters one call can carry

    def overhead(self, seconds: float) -> float:
        return seconds / self.base - 1


@dataclass(frozen=True)
class LoraTimes:
    steps: list[StepTimes]
    switch: float  # merging one LoRA into the UNet's weights and taking it out again
    cold_load: float  # one LoRA's factors onto the device (an adapter into the hot cache)
    layers: int
    parameters: int
    device: str  # the device type the UNet ran on ("cuda", "cpu")


def lora_section(
    models: str = "sd15-random", batches: tuple[int, ...] | None = None, repeats: int = 3
) -> str:
    device = default_device()
    batches = batches or ((2, 8, 32) if device.type == "cuda" else (2,))
    family = resolve_family(models).to(device, default_dtype(device))
    return _section(models, time_lora(family, batches, repeats), repeats, family.unet.dtype)


def time_lora(family: ModelFamily, batches: tuple[int, ...], repeats: int) -> LoraTimes:
    """The family's UNet timed where it is, in its dtype."""
    device, dtype = family.unet.device, family.unet.dtype
    unet = family.unet
    targets = lora_targets(family.lora_roots())
    loras = [random_lora(family, f"user{index}", RANK, index) for index in range(max(batches))]
    unet_layers = [layer for layer in loras[0].layers if layer.target == "unet"]
    adapters, loads = [], []
    for lora in loras:
        started = _synced(device)
        adapters.append(Adapter.from_lora(lora.name, lora, device, dtype))
        loads.append(_synced(device) - started)
    hooks = AdapterHooks.on({"unet": unet}, targets)
    steps = [_time_batch(unet, hooks, adapters, batch, repeats, dtype) for batch in batches]
    hooks.remove()
    cached = _on_device(loras[0], device)  # a merge from the hot cache, not from host memory
    (switch,) = _medians([lambda: _merge_and_unmerge(unet, cached)], repeats, device)
    parameters = sum(layer.down.numel() + layer.up.numel() for layer in unet_layers)
    return LoraTimes(steps, switch, statistics.median(loads), len(unet_layers), parameters, device.type)


def _time_batch(
    unet: UNet2DConditionModel,
    hooks: AdapterHooks,
    adapters: list[Adapter],
    batch: int,
    repeats: int,
    dtype: torch.dtype,
) -> StepTimes:
    device = unet.device
    inputs = _step_inputs(unet.config.in_channels, unet.config.cross_attention_dim, batch, device, dtype)

    def step(rows: list[SampleAdapter | None]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.inference_mode(), hooks.rows(rows, len(rows)):
                return unet(*inputs, return_dict=False)[0]

        return run

    base = step([None] * batch)
    one_user = step([SampleAdapter(adapters[0], 1.0)] * batch)
    mixed = step([SampleAdapter(adapters[row], 1.0) for row in range(batch)])
    _check_adapters_apply(base(), one_user())
    return StepTimes(batch, *_medians([base, one_user, mixed], repeats, device))


def _step_inputs(
    channels: int, width: int, batch: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(batch)
    side = 64  # a 512 crop's latents
    sample = torch.randn(batch, channels, side, side, generator=generator)
    timesteps = torch.full((batch,), 500.0)
    context = torch.randn(batch, PROMPT_TOKENS, width, generator=generator)
    return tuple(t.to(device, dtype) for t in (sample, timesteps, context))


def _check_adapters_apply(base: torch.Tensor, adapted: torch.Tensor) -> None:
    """A timing of hooks that changed nothing would time the base model twice."""
    if torch.equal(base, adapted):
        raise RuntimeError("the adapters did not change the UNet's output: the hooks are not active")


def _on_device(lora: LoraWeights, device: torch.device) -> LoraWeights:
    layers = [replace(layer, down=layer.down.to(device), up=layer.up.to(device)) for layer in lora.layers]
    return LoraWeights(lora.name, layers)


def _merge_and_unmerge(unet: torch.nn.Module, lora: LoraWeights) -> None:
    fuse_lora(unet, lora, "unet", 1.0)
    fuse_lora(unet, lora, "unet", -1.0)


def _medians(calls: list[Callable[[], object]], repeats: int, device: torch.device) -> list[float]:
    """Each call's median seconds, the calls taken in turn within each repeat, so that a drift in
    the machine's speed (these CPUs drift by 10-15 % over minutes) hits them alike."""
    for call in calls:
        call()  # warm-up: kernels chosen, caches filled
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for call, seconds in zip(calls, times, strict=True):
            started = _synced(device)
            call()
            seconds.append(_synced(device) - started)
    return [statistics.median(seconds) for seconds in times]


def _synced(device: torch.device) -> float:
    """The clock once the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _section(models: str, times: LoraTimes, repeats: int, dtype: torch.dtype) -> str:
    key = f"{models}:{times.device}"
    lines = [
        f"<!-- bench:lora:{key}:begin -->",
        f"### Users' LoRAs as per-sample adapters against the base weights ({models}, {device_name()})",
        "",
        f"`easyphoto bench --only lora --models {models}`: one UNet step (64x64 latents, a 77-token"
        f" context), torch {torch.__version__}, {PRECISION.get(dtype, str(dtype))}, median of {repeats}."
        f" Each user's LoRA is rank {RANK} on all {times.layers} LoRA-targeted UNet layers"
        f" ({times.parameters / 1e6:.1f} M parameters); the base weights are what merged weights cost a"
        " step. Mixed: a different user on every row, the most adapters one call can carry (a"
        " request's CFG pair shares one), the three timed in turn.",
        "",
        "| rows | base ms | one user ms | mixed users ms | one user | mixed users |",
        "| --- | --- | --- | --- | --- | --- |",
        *(
            f"| {s.batch} | {s.base * 1e3:.1f} | {s.one_user * 1e3:.1f} | {s.mixed * 1e3:.1f}"
            f" | {s.overhead(s.one_user):+.0%} | {s.overhead(s.mixed):+.0%} |"
            for s in times.steps
        ),
        "",
        f"Merging one LoRA into the UNet's weights and taking it out again (a switch when serving merged"
        f" weights): {times.switch * 1e3:.1f} ms. One LoRA's factors onto the device (a cold adapter"
        f" into the hot cache): {times.cold_load * 1e3:.1f} ms. A switch to a cached adapter is free:"
        " the rows of a call name their adapters.",
        f"<!-- bench:lora:{key}:end -->",
    ]
    return "\n".join(lines)
