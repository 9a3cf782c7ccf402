"""An SDXL text-to-image pass over the SDXL roles (``engines/roles/sdxl.py``): what paints a template
from a prompt. Its semantics are diffusers' ``StableDiffusionXLPipeline``'s at guidance rescale 0
and no refiner: both encoders' penultimate states side by side, the second's pooled embedding and
the size and crop ids as the added condition, an empty negative prompt as zeros
(``force_zeros_for_empty_prompt``), the same random draws in the same order, so one seed gives
the same image through both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers.utils.torch_utils import randn_tensor

from easyphoto.engines.interface import Backend
from easyphoto.engines.models.sdxl import SdxlFacts
from easyphoto.engines.roles.diffusion import pixels_per_latent
from easyphoto.engines.roles.sdxl import TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE_DECODER

from .inpaint import StepEvent, step_kwargs
from .schedulers import make_scheduler


@dataclass
class TextToImage:
    prompt: str
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    steps: int = 30
    guidance_scale: float = 7.0
    scheduler: str = "dpmpp_2m_sde_karras"
    images: int = 1
    generator: torch.Generator | None = None
    on_step: Callable[[StepEvent], None] | None = None
    raise_if_stopped: Callable[[], None] = field(default=lambda: None)


def run_text_to_image(backend: Backend, facts: SdxlFacts, request: TextToImage) -> torch.Tensor:
    """The images (NCHW, in [-1, 1]) ``request`` asks for."""
    device, dtype = backend.device, backend.dtype
    cfg = request.guidance_scale > 1.0
    embeds, pooled = _encode(backend, facts, [request.prompt] * request.images)
    if cfg:
        negative, negative_pooled = (
            _encode(backend, facts, [request.negative_prompt] * request.images)
            if request.negative_prompt
            else (torch.zeros_like(embeds), torch.zeros_like(pooled))
        )
        embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
    rows = embeds.shape[0]
    size = [request.height, request.width]
    time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=dtype, device=device).expand(rows, -1)
    scheduler = make_scheduler(request.scheduler, facts.scheduler_config)
    scheduler.set_timesteps(request.steps, device=device)
    factor = pixels_per_latent(backend.roles[VAE_DECODER])
    shape = (request.images, _latent_channels(backend), request.height // factor, request.width // factor)
    latents = randn_tensor(shape, generator=request.generator, device=device, dtype=dtype)
    latents = latents * scheduler.init_noise_sigma
    kwargs = step_kwargs(scheduler, request.generator)
    timesteps = scheduler.timesteps
    for index, t in enumerate(timesteps):
        request.raise_if_stopped()
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if cfg else latents, t)
        inputs = {
            "sample": model_input,
            "timestep": t.reshape(1).expand(rows).to(dtype),
            "encoder_hidden_states": embeds,
            "text_embeds": pooled,
            "time_ids": time_ids,
        }
        noise = backend.infer(UNET, inputs)["noise_pred"]
        if cfg:
            uncond, text = noise.chunk(2)
            noise = uncond + request.guidance_scale * (text - uncond)
        latents = scheduler.step(noise, t, latents, **kwargs, return_dict=False)[0]
        if request.on_step is not None:
            request.on_step(StepEvent(index + 1, len(timesteps), float(t)))
    decoded = backend.infer(VAE_DECODER, {"latents": latents})["images"]
    return decoded


def _encode(backend: Backend, facts: SdxlFacts, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Both encoders' penultimate states side by side, and the second's pooled embedding."""
    states = []
    pooled = None
    for role, tokenizer in ((TEXT_ENCODER, facts.tokenizer), (TEXT_ENCODER_2, facts.tokenizer_2)):
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(device=backend.device, dtype=torch.int32)  # fmt: skip
        out = backend.infer(role, {"input_ids": ids})
        states.append(out["hidden_states"])
        pooled = out.get("text_embeds", pooled)
    assert pooled is not None
    return torch.cat(states, dim=-1), pooled


def _latent_channels(backend: Backend) -> int:
    return int(backend.roles[UNET].input("sample").shape[1])  # type: ignore[arg-type]
