"""The arithmetic of a model row: how many floating-point operations one sample of each diffusion
model costs at an image size, counted by torch's ``FlopCounterMode`` on a built family's modules on
the meta device (no weights, no compute: the full SD 1.5 size counts in about a second). What a
face costs is these times the rows a request runs (``server/pipeline.py: planned_rows``); the
capacity arithmetic of ``docs/design.md`` starts from both.

Counted: matrix products and convolutions, as multiply-adds x 2, attention's too (on the meta
device attention decomposes into matrix products; torch's fused CPU attention kernel, which real
tensors take, is not counted by ``FlopCounterMode``, so a count on them would miss it). Not counted:
normalisations, activations and a LoRA's low-rank updates, which are a few percent of the FLOPs
but not of the time where memory bandwidth bounds them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .builders import shape_modules

TEXT_TOKENS = 77  # CLIP's context: every prompt is padded to it


@dataclass(frozen=True)
class RowFlops:
    """FLOPs of one row (sample) of each model at one image side."""

    side: int
    unet: float
    controlnet: float
    vae_encode: float
    vae_decode: float


def counted_flops(run: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:
        run()
    return float(counter.get_total_flops())


def row_flops(models: str, side: int) -> RowFlops:
    """One row of ``models``' (a built family: ``tiny``, ``sd15-random``) UNet, ControlNet and VAE
    on a square image of ``side`` pixels."""
    unet, controlnet, vae = shape_modules(models)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    with torch.device("meta"), torch.no_grad():
        image = torch.empty(1, 3, side, side)
        latents = torch.empty(1, int(unet.config.in_channels), side // factor, side // factor)
        text = torch.empty(1, TEXT_TOKENS, int(unet.config.cross_attention_dim))
        timestep = torch.full((1,), 500.0)
        return RowFlops(
            side,
            unet=counted_flops(lambda: unet(latents, timestep, text)),
            controlnet=counted_flops(lambda: controlnet(latents, timestep, text, controlnet_cond=image)),
            vae_encode=counted_flops(lambda: vae.encode(image)),
            vae_decode=counted_flops(lambda: vae.decode(latents)),
        )
