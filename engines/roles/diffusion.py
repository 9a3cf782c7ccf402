"""One description per model role: the single source of every name, dtype and shape.

The torch backend, the ONNX exporter, the TensorRT build plan and the Triton config writer all
read these descriptions; nothing restates a shape elsewhere. A description is derived from the
loaded family's configs (channel counts, number of ControlNet residuals, text length), so the
tiny family and SD 1.5 get descriptions of the same form with their own numbers.

Conventions (KServe v2 / Triton names, NCHW):
* ``timestep`` is per sample, so concurrent requests at different steps can share a UNet batch.
* ControlNet residual ``i`` is ``down_block_res_{i}``; the mid residual is ``mid_block_res``.
* ``conditioning_scale`` is a per-sample input (``[batch]``), so one built engine serves every weight
  and one call serves samples of several requests with their own weights.
* A UNet variant (a copy with an LCM-LoRA fused in, ``family.unet_variants``) is served as roles
  of its own, the base's names prefixed (``lcm_unet``, ``lcm_stage_canny_tile``): the same tensors,
  other weights, users' LoRAs applied on top of it per row as on the base.
* The VAE encoder returns the raw Gaussian moments (mean, logvar); sampling and the scaling
  factor happen in :mod:`engines.interface`. The VAE decoder takes UNet-space (scaled) latents.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fractions import Fraction

import torch
from diffusers import AutoencoderKL
from torch import nn

from ..models.family import ModelFamily
from ..shapes import AxisRange, Dim, DimLike, TensorSpec, sym
from .description import BATCH, RoleDescription

LATENT_H = sym("latent_height")


LATENT_W = sym("latent_width")


MAX_BATCH = 16


class TextEncoderModule(nn.Module):
    def __init__(self, family: ModelFamily) -> None:
        super().__init__()
        self.text_encoder = family.text_encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.text_encoder(input_ids.long(), return_dict=True)
        return out.last_hidden_state, out.pooler_output


class VaeEncoderModule(nn.Module):
    def __init__(self, family: ModelFamily) -> None:
        super().__init__()
        self.encoder = family.vae.encoder
        self.quant_conv = family.vae.quant_conv

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor]:
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return (moments,)


class VaeDecoderModule(nn.Module):
    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.vae.decode(latents / self.scaling_factor, return_dict=False)[0],)


class UNetModule(nn.Module):
    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *residuals: torch.Tensor,
    ) -> tuple[torch.Tensor]:
        noise = self.unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            down_block_additional_residuals=list(residuals[:-1]),
            mid_block_additional_residual=residuals[-1],
            return_dict=False,
        )[0]
        return (noise,)


class ControlNetModule(nn.Module):
    def __init__(self, family: ModelFamily, kind: str) -> None:
        super().__init__()
        self.controlnet = family.controlnets[kind]

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        down, mid = self.controlnet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=controlnet_cond,
            conditioning_scale=1.0,
            return_dict=False,
        )
        # Scaling here (not inside the net) keeps the scale a runtime input of the engine, per sample.
        scale = conditioning_scale.reshape(-1, 1, 1, 1)
        return (*(d * scale for d in down), mid * scale)


class StageModule(nn.Module):
    """One denoising step of a pass in one graph: the pass's ControlNets, residuals summed in order
    (as diffusers' MultiControlNetModel does), then the UNet. Four engine calls become one."""

    def __init__(self, family: ModelFamily, kinds: tuple[str, ...], variant: str = "") -> None:
        super().__init__()
        self.controlnets = nn.ModuleList(ControlNetModule(family, kind) for kind in kinds)
        self.unet = UNetModule(family.unet_of(variant))

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *controls: torch.Tensor,  # per ControlNet: its image, then its scale
    ) -> tuple[torch.Tensor]:
        residuals = sum_residuals(
            net(sample, timestep, encoder_hidden_states, controls[2 * index], controls[2 * index + 1])
            for index, net in enumerate(self.controlnets)
        )
        return self.unet(sample, timestep, encoder_hidden_states, *residuals)


def sum_residuals(per_net: Iterable[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """Each ControlNet's residuals added up in order, as diffusers' ``MultiControlNetModel`` does
    (in the fused stage graph and in the orchestrator's step alike)."""
    total: list[torch.Tensor] | None = None
    for residuals in per_net:
        total = list(residuals) if total is None else [a + b for a, b in zip(total, residuals, strict=True)]
    if total is None:
        raise ValueError("no ControlNet residuals to sum")
    return total


# Every denoising role (UNet, ControlNet, fused stage) takes these first, in this order.
STEP_INPUTS = ("sample", "timestep", "encoder_hidden_states")
CONTROLNET_PREFIX = "controlnet_"


def controlnet_role(kind: str) -> str:
    """The role name of the ControlNet of ``kind`` (``canny`` -> ``controlnet_canny``)."""
    return CONTROLNET_PREFIX + kind


def stage_role_name(kinds: tuple[str, ...]) -> str:
    return "stage_" + "_".join(kinds)


def variant_role(role: str, variant: str) -> str:
    """The name of ``role`` computed with the UNet ``variant`` (``unet`` -> ``lcm_unet``; ``""``:
    the base UNet's role itself)."""
    return f"{variant}_{role}" if variant else role


def stage_control_inputs(kind: str) -> tuple[str, str]:
    """A fused stage's inputs for the ControlNet of ``kind``: its image and its scale."""
    return f"{kind}_cond", f"{kind}_scale"


def pixels_per_latent(decoder: RoleDescription) -> int:
    """Image pixels per latent pixel of a VAE decoder role, read off its description."""
    height = decoder.output("images").shape[2]
    return int(height.scale) if isinstance(height, Dim) else 1


def residual_inputs(unet: RoleDescription) -> tuple[TensorSpec, ...]:
    """The UNet's ControlNet residual inputs, in order: every input after the step inputs."""
    return tuple(spec for spec in unet.inputs if spec.name not in STEP_INPUTS)


def residual_specs(family: ModelFamily) -> tuple[TensorSpec, ...]:
    """The ControlNet residuals the UNet takes, in diffusers' order: conv_in, each block's
    resnets then its downsampler, then the mid block."""
    channels = list(family.unet.config.block_out_channels)
    layers = int(family.unet.config.layers_per_block)
    shapes: list[tuple[int, Fraction]] = [(channels[0], Fraction(1))]
    for level, width in enumerate(channels):
        scale = Fraction(1, 2**level)
        shapes += [(width, scale)] * layers
        if level < len(channels) - 1:
            shapes.append((width, scale / 2))
    specs = [
        TensorSpec(f"down_block_res_{i}", "float32", (BATCH, c, LATENT_H * s, LATENT_W * s))
        for i, (c, s) in enumerate(shapes)
    ]
    mid_scale = Fraction(1, 2 ** (len(channels) - 1))
    specs.append(
        TensorSpec(
            "mid_block_res", "float32", (BATCH, channels[-1], LATENT_H * mid_scale, LATENT_W * mid_scale)
        )
    )
    return tuple(specs)


def _latent_axes(family: ModelFamily) -> dict[str, AxisRange]:
    factor = family.vae_scale_factor
    lo, opt, hi = (size // factor for size in family.image_sizes)
    multiple = family.unet_down_factor
    return {
        "batch": AxisRange(1, 2, MAX_BATCH),
        "latent_height": AxisRange(lo, opt, hi, multiple),
        "latent_width": AxisRange(lo, opt, hi, multiple),
    }


def _image_dims(family: ModelFamily) -> tuple[Dim, Dim]:
    factor = family.vae_scale_factor
    return LATENT_H * factor, LATENT_W * factor


def describe_roles(family: ModelFamily) -> dict[str, RoleDescription]:
    """Every role the family can serve, keyed by role name."""
    latent_axes = _latent_axes(family)
    image_h, image_w = _image_dims(family)
    latent_channels = int(family.vae.config.latent_channels)
    hidden = int(family.text_encoder.config.hidden_size)
    latent_shape: tuple[DimLike, ...] = (BATCH, latent_channels, LATENT_H, LATENT_W)
    sample, timestep, text_name = STEP_INPUTS
    step_inputs = (
        TensorSpec(sample, "float32", (BATCH, int(family.unet.config.in_channels), LATENT_H, LATENT_W)),
        TensorSpec(timestep, "float32", (BATCH,)),
        TensorSpec(text_name, "float32", (BATCH, family.text_length, hidden)),
    )
    timestep_range = {timestep: (0.0, 999.0)}
    roles = {
        "text_encoder": RoleDescription(
            name="text_encoder",
            inputs=(TensorSpec("input_ids", "int32", (BATCH, family.text_length)),),
            outputs=(
                TensorSpec("last_hidden_state", "float32", (BATCH, family.text_length, hidden)),
                TensorSpec("pooler_output", "float32", (BATCH, hidden)),
            ),
            axes={"batch": AxisRange(1, 2, MAX_BATCH)},
            build_module=lambda: TextEncoderModule(family),
            sample_ranges={"input_ids": (0, len(family.tokenizer))},
            lora_target="text_encoder",
        ),
        "vae_encoder": RoleDescription(
            name="vae_encoder",
            inputs=(TensorSpec("images", "float32", (BATCH, 3, image_h, image_w)),),
            outputs=(
                TensorSpec("latent_moments", "float32", (BATCH, 2 * latent_channels, LATENT_H, LATENT_W)),
            ),
            axes=latent_axes,
            build_module=lambda: VaeEncoderModule(family),
            sample_ranges={"images": (-1.0, 1.0)},
        ),
        "vae_decoder": RoleDescription(
            name="vae_decoder",
            inputs=(TensorSpec("latents", "float32", latent_shape),),
            outputs=(TensorSpec("images", "float32", (BATCH, 3, image_h, image_w)),),
            axes=latent_axes,
            build_module=lambda: VaeDecoderModule(family.vae),
        ),
    }
    for variant in ("", *family.unet_variants):
        name = variant_role("unet", variant)
        roles[name] = RoleDescription(
            name=name,
            inputs=(*step_inputs, *residual_specs(family)),
            outputs=(
                TensorSpec(
                    "noise_pred", "float32", (BATCH, int(family.unet.config.out_channels), LATENT_H, LATENT_W)
                ),
            ),
            axes=latent_axes,
            build_module=lambda variant=variant: UNetModule(family.unet_of(variant)),  # type: ignore[misc]
            sample_ranges=timestep_range,
            lora_target="unet",
            variant=variant,
        )
    for kind in family.controlnets:
        name = controlnet_role(kind)
        control_channels = int(family.controlnets[kind].config.in_channels)
        roles[name] = RoleDescription(
            name=name,
            inputs=(
                TensorSpec(sample, "float32", (BATCH, control_channels, LATENT_H, LATENT_W)),
                *step_inputs[1:],
                TensorSpec("controlnet_cond", "float32", (BATCH, 3, image_h, image_w)),
                TensorSpec("conditioning_scale", "float32", (BATCH,)),
            ),
            outputs=residual_specs(family),
            axes=latent_axes,
            build_module=lambda kind=kind: ControlNetModule(family, kind),  # type: ignore[misc]
            sample_ranges={**timestep_range, "controlnet_cond": (0.0, 1.0), "conditioning_scale": (0.5, 1.0)},
        )
    return roles


def describe_stage(family: ModelFamily, kinds: tuple[str, ...], variant: str = "") -> RoleDescription:
    """The fused step of a pass with these ControlNets (in this order) and the UNet ``variant``:
    the UNet's step inputs, then ``<kind>_cond`` and ``<kind>_scale`` per ControlNet;
    ``noise_pred`` out."""
    roles = describe_roles(family)
    unet = roles[variant_role("unet", variant)]
    sample = STEP_INPUTS[0]
    if not kinds or any(controlnet_role(kind) not in roles for kind in kinds):
        raise ValueError(
            f"a stage needs loaded ControlNets; asked for {kinds}, have {sorted(family.controlnets)}"
        )
    if any(roles[controlnet_role(kind)].input(sample) != unet.input(sample) for kind in kinds):
        raise ValueError("a fused stage needs ControlNets that take the UNet's sample (a 4-channel UNet)")
    controls: list[TensorSpec] = []
    ranges: dict[str, tuple[float, float]] = {}
    for kind in kinds:
        control = roles[controlnet_role(kind)]
        image, scale = stage_control_inputs(kind)
        controls += [
            TensorSpec(image, "float32", control.input("controlnet_cond").shape),
            TensorSpec(scale, "float32", control.input("conditioning_scale").shape),
        ]
        ranges |= {
            image: control.sample_ranges["controlnet_cond"],
            scale: control.sample_ranges["conditioning_scale"],
        }
    return RoleDescription(
        name=variant_role(stage_role_name(kinds), variant),
        inputs=(*(unet.input(name) for name in STEP_INPUTS), *controls),
        outputs=unet.outputs,
        axes=unet.axes,
        build_module=lambda: StageModule(family, kinds, variant),
        sample_ranges={**unet.sample_ranges, **ranges},
        lora_target=unet.lora_target,
        variant=variant,
    )
