"""A model family: the SD 1.5-shaped set of torch modules every role is built from.

A family is either *real* (weights a user points at on local disk) or *random* (the tiny seeded
family for tests and the demo, or full-size SD 1.5 shapes for benchmarks). Random families paint
noise, never a face: callers must say so wherever they show an output (``family.is_random``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

CONTROLNET_KINDS: tuple[str, ...] = ("canny", "openpose", "color", "tile")
FAMILY_FILE = "easyphoto_family.json"
# The diffusers pipeline index, so a saved family is also a StableDiffusionPipeline folder.
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


@dataclass
class ModelFamily:
    name: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    controlnets: dict[str, ControlNetModel]
    scheduler_config: dict[str, Any]
    is_random: bool
    # Image sizes (pixels) the family is profiled for: min, opt, max of each side.
    image_sizes: tuple[int, int, int] = (256, 512, 1024)
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # Copies of the UNet with a LoRA fused in, by variant name (``lcm``: an LCM-LoRA), each
    # served as its own roles (:func:`engines.roles.diffusion.variant_role`).
    unet_variants: dict[str, UNet2DConditionModel] = field(default_factory=dict)

    @property
    def vae_scale_factor(self) -> int:
        return int(2 ** (len(self.vae.config.block_out_channels) - 1))

    @property
    def unet_down_factor(self) -> int:
        """How much the UNet shrinks its latent: latent sides must be multiples of this."""
        return int(2 ** (len(self.unet.config.block_out_channels) - 1))

    @property
    def image_multiple(self) -> int:
        return self.vae_scale_factor * self.unet_down_factor

    @property
    def text_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def modules(self) -> dict[str, torch.nn.Module]:
        mods: dict[str, torch.nn.Module] = {
            "unet": self.unet,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
        }
        mods.update({f"controlnet_{kind}": net for kind, net in self.controlnets.items()})
        mods.update({f"{variant}_unet": unet for variant, unet in self.unet_variants.items()})
        return mods

    def unet_of(self, variant: str) -> UNet2DConditionModel:
        """The UNet a role of ``variant`` computes with (``""``: the base UNet)."""
        if not variant:
            return self.unet
        if variant not in self.unet_variants:
            raise KeyError(f"no {variant!r} UNet; this family has {sorted(self.unet_variants)}")
        return self.unet_variants[variant]

    def lora_roots(self, variant: str = "") -> dict[str, torch.nn.Module]:
        """The models users' LoRAs adapt, by LoRA target, for the roles of ``variant``."""
        return {"unet": self.unet_of(variant), "text_encoder": self.text_encoder}

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> ModelFamily:
        target = torch.device(device)
        for module in self.modules().values():
            first = next(module.parameters())
            if first.device != target or first.dtype != dtype:
                module.to(device=target, dtype=dtype)
        return self

    def eval(self) -> ModelFamily:
        freeze(self.modules().values())
        return self

    def save_pretrained(self, directory: Path) -> None:
        """Writes the diffusers folder layout (``unet/``, ``vae/``, ``controlnet_canny/``, ...)."""
        directory.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(directory / "unet")
        self.vae.save_pretrained(directory / "vae")
        self.text_encoder.save_pretrained(directory / "text_encoder")
        self.tokenizer.save_pretrained(directory / "tokenizer")
        for kind, net in self.controlnets.items():
            net.save_pretrained(directory / f"controlnet_{kind}")
        scheduler_dir = directory / "scheduler"
        scheduler_dir.mkdir(exist_ok=True)
        (scheduler_dir / "scheduler_config.json").write_text(json.dumps(self.scheduler_config, indent=2))
        (directory / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
        meta = {
            "name": self.name,
            "is_random": self.is_random,
            "image_sizes": list(self.image_sizes),
            "controlnets": sorted(self.controlnets),
        }
        (directory / FAMILY_FILE).write_text(json.dumps(meta, indent=2))


def freeze(modules: Iterable[torch.nn.Module]) -> None:
    """Inference weights: eval mode, no gradients."""
    for module in modules:
        module.eval().requires_grad_(False)
