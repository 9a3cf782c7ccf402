"""One ControlNet inpainting pass over the engines: the loop both services run.

The orchestrator runs each diffusion stage through the step engine (``diffusion/steps.py``, which
batches the steps of concurrent passes), the trainer's validation runs it alone (:func:`run_inpaint`);
both drive an :class:`InpaintState`. Its semantics are
those of diffusers' ``StableDiffusionControlNetInpaintPipeline`` with a 4-channel UNet: the image
is encoded, noised to the strength's first timestep, and after every step the known (unmasked)
latents are re-noised to the next timestep and blended back. Random draws happen in the same
order as in that pipeline, so one seed gives the same image through both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from diffusers import (
    SchedulerMixin,
)
from diffusers.utils.torch_utils import randn_tensor

from easyphoto.engines.adapters import SampleAdapter, active_rows
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
    # The user's LoRA and its weight, applied to every sample of the pass (None: the base model).
    adapter: SampleAdapter | None = None
    # The UNet it denoises with: "" the base, "lcm" the copy with the LCM-LoRA fused in.
    unet_variant: str = ""


def binarize_mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask >= 0.5).to(mask.dtype)


def step_kwargs(scheduler: SchedulerMixin, generator: torch.Generator | None) -> dict[str, Any]:
    """The generator for the scheduler's step, where it takes one (the stochastic schedulers)."""
    import inspect

    accepted = inspect.signature(scheduler.step).parameters
    return {"generator": generator} if "generator" in accepted else {}


def run_inpaint(engines: Engines, inpaint: InpaintPass, scheduler_config: dict[str, Any]) -> torch.Tensor:
    """Runs the pass here, one model call after another; the decoded image in [-1, 1] (NCHW).
    (The orchestrator runs passes through :class:`diffusion.steps.StepEngine`, which batches the
    steps of concurrent passes; both drive an :class:`InpaintState`.)"""
    state = InpaintState(engines, inpaint, scheduler_config)
    state.begin(engines.vae_moments(state.image))
    while not state.done:
        inpaint.raise_if_stopped()
        state.advance(engines.predict_noise(*state.step_inputs()))
    return engines.vae_decode(state.latents)


class StepInputs(NamedTuple):
    """One step's model evaluation: the scaled model input, a timestep per row, the text
    embeddings, the controls, each row's adapter and the UNet variant (the arguments of
    ``Engines.predict_noise``)."""

    sample: torch.Tensor
    timesteps: torch.Tensor
    embeds: torch.Tensor
    controls: list[ControlInput]
    adapters: list[SampleAdapter | None] | None
    variant: str = ""


class InpaintState:
    """One pass in progress, a step at a time. Made from an :class:`InpaintPass` without a model
    call, begun with the VAE encoder's moments of its image, advanced with each step's noise
    prediction, and its latents decoded at the end: whoever makes the model calls (one pass alone,
    or many passes' steps batched), the pass computes the same."""

    def __init__(self, engines: Engines, inpaint: InpaintPass, scheduler_config: dict[str, Any]) -> None:
        device, dtype = engines.backend.device, engines.backend.dtype
        self.engines = engines
        self.inpaint = inpaint
        self.scheduler = make_scheduler(inpaint.scheduler, scheduler_config)
        self.timesteps = strength_timesteps(self.scheduler, inpaint.steps, inpaint.strength)
        if len(self.timesteps) == 0:
            raise InvalidArgument(
                f"strength {inpaint.strength} with {inpaint.steps} steps runs no step", field="strength"
            )
        self.image = inpaint.image.to(device=device, dtype=dtype)
        self.cfg = inpaint.guidance_scale > 1.0
        embeds = (
            torch.cat([inpaint.negative_prompt_embeds, inpaint.prompt_embeds])
            if self.cfg
            else inpaint.prompt_embeds
        )
        self.embeds = embeds.to(device=device, dtype=dtype)
        self.controls = [_prepare_control(c, self.cfg, device, dtype) for c in inpaint.controls]
        self.rows = self.image.shape[0] * (2 if self.cfg else 1)  # of every model call
        # The user's adapter on every row, where it has UNet layers (else the base UNet).
        self.adapters = active_rows([inpaint.adapter] * self.rows, "unet")
        self.index = 0
        self._mask = binarize_mask(inpaint.mask.to(device=device, dtype=dtype))
        self._step_kwargs = step_kwargs(self.scheduler, inpaint.generator)

    def begin(self, moments: torch.Tensor) -> None:
        """The latents to denoise: the image's, noised to the strength's first timestep. Random
        draws happen in diffusers' order, with the pass's generator."""
        generator, device, dtype = self.inpaint.generator, self.image.device, self.image.dtype
        self.image_latents = self.engines.latents_from_moments(moments, generator)
        shape = tuple(self.image_latents.shape)
        self.noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        batch = self.image.shape[0]
        self.latents = self.scheduler.add_noise(
            self.image_latents, self.noise, self.timesteps[:1].repeat(batch)
        )
        # diffusers also encodes the masked image here (unused by a 4-channel UNet): draw the same
        # random numbers it draws so that seeds reproduce its images, without the wasted encode.
        randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        self.latent_mask = F.interpolate(self._mask, size=shape[-2:])

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.latents.shape[1:])

    def step_inputs(self) -> StepInputs:
        """The next step's model evaluation, as :meth:`Engines.predict_noise` takes it."""
        t = self.timesteps[self.index]
        model_input = torch.cat([self.latents] * 2) if self.cfg else self.latents
        model_input = self.scheduler.scale_model_input(model_input, t)
        timesteps = t.reshape(1).expand(self.rows).to(model_input.dtype)
        return StepInputs(
            model_input, timesteps, self.embeds, self.controls, self.adapters, self.inpaint.unet_variant
        )

    def advance(self, noise_pred: torch.Tensor) -> None:
        """One scheduler step with the step's noise prediction, then the known latents blended back."""
        t = self.timesteps[self.index]
        if self.cfg:
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + self.inpaint.guidance_scale * (text - uncond)
        latents = self.scheduler.step(noise_pred, t, self.latents, **self._step_kwargs, return_dict=False)[0]
        self.latents = put_known_back(
            self.scheduler,
            latents,
            self.image_latents,
            self.noise,
            self.timesteps,
            self.index,
            self.latent_mask,
        )
        self.index += 1
        if self.inpaint.on_step is not None:
            self.inpaint.on_step(StepEvent(self.index, len(self.timesteps), float(t)))


def put_known_back(
    scheduler: SchedulerMixin,
    latents: torch.Tensor,
    known: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    step: int,
    mask: torch.Tensor,
) -> torch.Tensor:
    """``latents`` after step ``step`` with the known (unmasked) latents put back: the image's,
    noised with ``noise`` to the next timestep (clean after the last step), as diffusers'
    inpainting pipeline does with a 4-channel UNet."""
    if step < len(timesteps) - 1:
        known = scheduler.add_noise(known, noise, torch.tensor([timesteps[step + 1]]))
    return (1 - mask) * known + mask * latents


def _prepare_control(
    control: ControlInput, cfg: bool, device: torch.device, dtype: torch.dtype
) -> ControlInput:
    image = control.image.to(device=device, dtype=dtype)
    return ControlInput(control.kind, torch.cat([image] * 2) if cfg else image, control.scale)
