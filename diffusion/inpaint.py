"""One ControlNet inpainting pass over the engines: the loop both services run.

The orchestrator runs it for each diffusion stage, the trainer for validation. Its semantics are
those of diffusers' ``StableDiffusionControlNetInpaintPipeline`` with a 4-channel UNet: the image
is encoded, noised to the strength's first timestep, and after every step the known (unmasked)
latents are re-noised to the next timestep and blended back. Random draws happen in the same
order as in that pipeline, so one seed gives the same image through both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import (
    SchedulerMixin,
)
from diffusers.utils.torch_utils import randn_tensor

from easyphoto.engines.interface import ControlInput, Engines
from easyphoto.rpc.errors import InvalidArgument

from .schedulers import make_scheduler, strength_timesteps


@dataclass
class StepEvent:
    step: int
    total_steps: int
    timestep: float


@dataclass
class InpaintPass:
    """One inpainting pass: its inputs and settings. Images are NCHW float tensors at the working size:
    ``image`` in [-1, 1], ``mask`` in [0, 1] (1 = repaint), control images in [0, 1]."""

    image: torch.Tensor
    mask: torch.Tensor
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    controls: Sequence[ControlInput] = ()
    steps: int = 50
    strength: float = 0.45
    guidance_scale: float = 7.0
    scheduler: str = "dpmpp_2m_sde_karras"
    generator: torch.Generator | None = None
    on_step: Callable[[StepEvent], None] | None = None
    # Called before every step; raises to stop the pass (the client went away, a deadline passed).
    raise_if_stopped: Callable[[], None] = field(default=lambda: None)


def binarize_mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask >= 0.5).to(mask.dtype)


def _step_kwargs(scheduler: SchedulerMixin, generator: torch.Generator | None) -> dict[str, Any]:
    import inspect

    accepted = inspect.signature(scheduler.step).parameters
    return {"generator": generator} if "generator" in accepted else {}


def run_inpaint(engines: Engines, inpaint: InpaintPass, scheduler_config: dict[str, Any]) -> torch.Tensor:
    """Runs the pass and returns the decoded image in [-1, 1] (NCHW)."""
    latents = inpaint_latents(engines, inpaint, scheduler_config)
    return engines.vae_decode(latents)


def inpaint_latents(engines: Engines, inpaint: InpaintPass, scheduler_config: dict[str, Any]) -> torch.Tensor:
    device, dtype = engines.backend.device, engines.backend.dtype
    generator = inpaint.generator
    scheduler = make_scheduler(inpaint.scheduler, scheduler_config)
    timesteps = strength_timesteps(scheduler, inpaint.steps, inpaint.strength)
    if len(timesteps) == 0:
        raise InvalidArgument(
            f"strength {inpaint.strength} with {inpaint.steps} steps runs no step", field="strength"
        )
    image = inpaint.image.to(device=device, dtype=dtype)
    batch = image.shape[0]
    mask = binarize_mask(inpaint.mask.to(device=device, dtype=dtype))

    image_latents = engines.vae_encode(image, generator)
    noise = randn_tensor(tuple(image_latents.shape), generator=generator, device=device, dtype=dtype)
    latents = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(batch))
    # diffusers also encodes the masked image here (unused by a 4-channel UNet): draw the same
    # random numbers it draws so that seeds reproduce its images, without the wasted encode.
    randn_tensor(tuple(image_latents.shape), generator=generator, device=device, dtype=dtype)
    latent_mask = F.interpolate(mask, size=tuple(image_latents.shape[-2:]))

    cfg = inpaint.guidance_scale > 1.0
    embeds = (
        torch.cat([inpaint.negative_prompt_embeds, inpaint.prompt_embeds]) if cfg else inpaint.prompt_embeds
    )
    embeds = embeds.to(device=device, dtype=dtype)
    controls = [_prepare_control(c, cfg, device, dtype) for c in inpaint.controls]
    step_kwargs = _step_kwargs(scheduler, generator)

    for index, t in enumerate(timesteps):
        inpaint.raise_if_stopped()
        model_input = torch.cat([latents] * 2) if cfg else latents
        model_input = scheduler.scale_model_input(model_input, t)
        noise_pred = engines.predict_noise(model_input, t, embeds, controls)
        if cfg:
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + inpaint.guidance_scale * (text - uncond)
        latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
        known = image_latents
        if index < len(timesteps) - 1:
            known = scheduler.add_noise(image_latents, noise, torch.tensor([timesteps[index + 1]]))
        latents = (1 - latent_mask) * known + latent_mask * latents
        if inpaint.on_step is not None:
            inpaint.on_step(StepEvent(index + 1, len(timesteps), float(t)))
    return latents


def _prepare_control(
    control: ControlInput, cfg: bool, device: torch.device, dtype: torch.dtype
) -> ControlInput:
    image = control.image.to(device=device, dtype=dtype)
    return ControlInput(control.kind, torch.cat([image] * 2) if cfg else image, control.scale)
