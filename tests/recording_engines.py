"""What the engine tests share: the real engines recording what each model evaluation was given,
a user's LoRA of random factors on every targeted layer, and passes run together through a step
engine as concurrent requests."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

import torch

from easyphoto.diffusion.inpaint import InpaintPass
from easyphoto.diffusion.steps import StepEngine
from easyphoto.engines.interface import Engines
from easyphoto.engines.lora import LoraLayer, LoraTargets, LoraWeights


class RecordingEngines(Engines):
    """The real engines, recording every model evaluation (ControlNets with their weights, and the
    adapter of its rows) and counting each model's rows."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.calls: list[dict[str, float]] = []
        self.loras: list[tuple[str, float] | None] = []
        self.variants: list[str] = []
        self.rows: Counter[str] = Counter()

    def vae_moments(self, images: torch.Tensor) -> torch.Tensor:
        self.rows["vae_encode"] += len(images)
        return super().vae_moments(images)

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        self.rows["vae_decode"] += len(latents)
        return super().vae_decode(latents)

    def predict_noise(self, sample, timestep, encoder_hidden_states, controls, adapters=None, variant=""):  # type: ignore[no-untyped-def]
        self.rows["unet"] += len(sample)
        self.rows["controlnet"] += len(sample) * len(controls)
        self.calls.append({c.kind: _one_weight(c.scale) for c in controls})
        keys = {row.key for row in adapters or () if row is not None}
        assert len(keys) <= 1, keys  # one request: one user's adapter on every row
        self.loras.append(keys.pop() if keys else None)
        self.variants.append(variant)
        return super().predict_noise(sample, timestep, encoder_hidden_states, controls, adapters, variant)


def _one_weight(scale: float | torch.Tensor) -> float:
    """A control's weight: the step engine gives one per row, all the same for one request."""
    if isinstance(scale, float):
        return scale
    assert torch.all(scale == scale[0]), scale
    return round(float(scale[0]), 6)


def random_user_lora(targets: LoraTargets, name: str, seed: int) -> LoraWeights:
    """Rank-4 factors of 0.1 x normal noise on every targeted layer: an adapter that changes
    outputs visibly (trained ones do), unlike the fixtures' near-zero one."""
    generator = torch.Generator().manual_seed(seed)
    layers = [
        LoraLayer(
            target, module, torch.randn(4, *shape[1:], generator=generator) * 0.1,
            torch.randn(shape[0], 4, *[1] * (len(shape) - 2), generator=generator) * 0.1, 4.0,
        )
        for target, modules in targets.items()
        for module, shape in modules.items()
    ]  # fmt: skip
    return LoraWeights(name, layers)


def run_together(
    engine: StepEngine, makers: list[Callable[[], InpaintPass]]
) -> list[torch.Tensor | BaseException]:
    """Every pass started at once, each from its own thread (as concurrent requests)."""
    results: list[torch.Tensor | BaseException] = [torch.empty(0)] * len(makers)
    start = threading.Barrier(len(makers))

    def run(index: int) -> None:
        inpaint = makers[index]()
        start.wait()
        try:
            results[index] = engine.run(inpaint)
        except BaseException as error:
            results[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(makers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results
