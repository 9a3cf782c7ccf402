"""The SDXL roles that paint a template from text: both text encoders (the penultimate hidden
states, and the second's pooled projection), the UNet with SDXL's added text-and-time condition,
and the VAE decoder. Described like every role (``roles/diffusion.py``), so they run in either
backend and export to ONNX, TensorRT plans and Triton the same way.

* ``sdxl_text_encoder``: ``input_ids`` ``[batch, 77]`` -> ``hidden_states`` (the penultimate layer's);
* ``sdxl_text_encoder_2``: the same, and ``text_embeds`` ``[batch, projection]``;
* ``sdxl_unet``: ``sample``, a per-sample ``timestep``, ``encoder_hidden_states`` (both encoders'
  states side by side), ``text_embeds`` and ``time_ids`` ``[batch, 6]`` (original size, crop
  corner, target size) -> ``noise_pred``;
* ``sdxl_vae_decoder``: UNet-space latents -> images in [-1, 1]; fp32 when the VAE asks for it
  (SDXL's overflows in fp16: ``force_upcast``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.sdxl import SdxlFamily
from ..shapes import AxisRange, TensorSpec, sym
from .description import BATCH, RoleDescription
from .diffusion import MAX_BATCH, VaeDecoderModule

TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE_DECODER = (
    "sdxl_text_encoder",
    "sdxl_text_encoder_2",
    "sdxl_unet",
    "sdxl_vae_decoder",
)
SDXL_ROLES = (TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE_DECODER)
TIME_IDS = 6  # original height, width; crop top, left; target height, width
LATENT_H, LATENT_W = sym("latent_height"), sym("latent_width")


class PenultimateStates(nn.Module):
    """A CLIP text encoder's penultimate hidden states (SDXL's text condition), and with a
    projection the pooled text embedding."""

    def __init__(self, encoder: nn.Module, pooled: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooled = pooled

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.encoder(input_ids.long(), output_hidden_states=True, return_dict=True)
        states = out.hidden_states[-2]
        return (states, out.text_embeds) if self.pooled else (states,)


class SdxlUNetModule(nn.Module):
    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> tuple[torch.Tensor]:
        conditions = {"text_embeds": text_embeds, "time_ids": time_ids}
        noise = self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=conditions,
            return_dict=False,
        )[0]  # fmt: skip
        return (noise,)


def describe_sdxl_roles(family: SdxlFamily) -> dict[str, RoleDescription]:
    """The four SDXL roles of ``family``, keyed by role name."""
    factor = family.vae_scale_factor
    lo, opt, hi = (size // factor for size in family.image_sizes)
    multiple = family.image_multiple // factor
    latent_axes = {
        "batch": AxisRange(1, 2, MAX_BATCH),
        "latent_height": AxisRange(lo, opt, hi, multiple),
        "latent_width": AxisRange(lo, opt, hi, multiple),
    }
    length = family.text_length
    ids = TensorSpec("input_ids", "int32", (BATCH, length))
    first = int(family.text_encoder.config.hidden_size)
    second = int(family.text_encoder_2.config.hidden_size)
    pooled = int(family.text_encoder_2.config.projection_dim)
    channels = int(family.unet.config.in_channels)
    latent = (BATCH, channels, LATENT_H, LATENT_W)
    image = (BATCH, 3, LATENT_H * factor, LATENT_W * factor)
    text_axes = {"batch": AxisRange(1, 2, MAX_BATCH)}
    vocabulary: dict[str, tuple[float, float]] = {"input_ids": (0, len(family.tokenizer))}
    return {
        TEXT_ENCODER: RoleDescription(
            name=TEXT_ENCODER,
            inputs=(ids,),
            outputs=(TensorSpec("hidden_states", "float32", (BATCH, length, first)),),
            axes=text_axes,
            build_module=lambda: PenultimateStates(family.text_encoder, pooled=False),
            sample_ranges=vocabulary,
        ),
        TEXT_ENCODER_2: RoleDescription(
            name=TEXT_ENCODER_2,
            inputs=(ids,),
            outputs=(
                TensorSpec("hidden_states", "float32", (BATCH, length, second)),
                TensorSpec("text_embeds", "float32", (BATCH, pooled)),
            ),
            axes=text_axes,
            build_module=lambda: PenultimateStates(family.text_encoder_2, pooled=True),
            sample_ranges=vocabulary,
        ),
        UNET: RoleDescription(
            name=UNET,
            inputs=(
                TensorSpec("sample", "float32", latent),
                TensorSpec("timestep", "float32", (BATCH,)),
                TensorSpec("encoder_hidden_states", "float32", (BATCH, length, first + second)),
                TensorSpec("text_embeds", "float32", (BATCH, pooled)),
                TensorSpec("time_ids", "float32", (BATCH, TIME_IDS)),
            ),
            outputs=(
                TensorSpec(
                    "noise_pred", "float32", (BATCH, int(family.unet.config.out_channels), LATENT_H, LATENT_W)
                ),
            ),
            axes=latent_axes,
            build_module=lambda: SdxlUNetModule(family.unet),
            sample_ranges={"timestep": (0.0, 999.0), "time_ids": (0.0, float(family.image_sizes[2]))},
        ),
        VAE_DECODER: RoleDescription(
            name=VAE_DECODER,
            inputs=(
                TensorSpec(
                    "latents", "float32", (BATCH, int(family.vae.config.latent_channels), LATENT_H, LATENT_W)
                ),
            ),
            outputs=(TensorSpec("images", "float32", image),),
            axes=latent_axes,
            build_module=lambda: VaeDecoderModule(family.vae),
            fp16=not bool(family.vae.config.get("force_upcast", False)),
        ),
    }
