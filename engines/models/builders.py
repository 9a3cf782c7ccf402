"""Random-weight families built offline from the shipped SD 1.5 configs, with fixed seeds.

* ``tiny``: the SD 1.5 architecture (same blocks, same 12 ControlNet residuals, VAE factor 8, the
  real 49 408-token tokenizer) at a few million parameters; builds in about a second. Tests and
  the demo run on it.
* ``sd15-random``: full SD 1.5 shapes (860M UNet, 361M per ControlNet) for speed and memory
  benchmarks only.

Both are random: their images are noise and are never shown as a result.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .family import CONTROLNET_KINDS, ModelFamily
from .tokenizer import sd15_tokenizer

TINY_SEED = 1234
# Bump when the tiny recipe changes: the cache folder is named by it, so stale builds are not reused.
TINY_VERSION = 1

TINY_UNET: dict[str, Any] = {
    "block_out_channels": [32, 32, 64, 64],
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "sample_size": 8,
}
TINY_VAE: dict[str, Any] = {
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}
TINY_CONTROLNET: dict[str, Any] = {"conditioning_embedding_out_channels": [8, 16, 16, 16]}
TINY_TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
}
TINY_IMAGE_SIZES = (64, 128, 256)
# Each built family's changes to the SD 1.5 configs, by component.
OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {"unet": TINY_UNET, "vae": TINY_VAE, "controlnet": TINY_CONTROLNET, "text_encoder": TINY_TEXT},
    "sd15-random": {},
}


def cache_root() -> Path:
    """Where built families and derived files live (``$EASYPHOTO_CACHE`` or ``~/.cache/easyphoto``)."""
    return Path(os.environ.get("EASYPHOTO_CACHE", Path.home() / ".cache" / "easyphoto"))


def sd15_config(component: str) -> dict[str, Any]:
    """A shipped SD 1.5 config (``unet``, ``vae``, ``controlnet``, ``text_encoder``, ``scheduler``)."""
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    text = resources.files(__package__).joinpath("configs", "sd15", component, name).read_text()
    return dict(json.loads(text))


def sd15_config_dir() -> Path:
    return Path(str(resources.files(__package__).joinpath("configs", "sd15")))


def _config(component: str, overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {**sd15_config(component), **overrides.get(component, {})}


def _controlnet(unet: UNet2DConditionModel, overrides: dict[str, dict[str, Any]]) -> ControlNetModel:
    return ControlNetModel.from_unet(unet, load_weights_from_unet=True, **overrides.get("controlnet", {}))


def shape_modules(name: str) -> tuple[UNet2DConditionModel, ControlNetModel, AutoencoderKL]:
    """A built family's UNet, one of its ControlNets and its VAE on the meta device: their shapes
    and no weights, built in a moment at any size (to count their work, ``engines/models/work.py``)."""
    overrides = OVERRIDES[name]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_config("unet", overrides))
        return unet, _controlnet(unet, overrides), AutoencoderKL.from_config(_config("vae", overrides))


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def build_family(
    name: str,
    overrides: dict[str, dict[str, Any]],
    seed: int,
    image_sizes: tuple[int, int, int],
    cache_dir: Path | None = None,
) -> ModelFamily:
    """Builds every module from the SD 1.5 configs with ``overrides`` applied, weights seeded."""
    cache_dir = cache_dir or cache_root()
    _seeded(seed)
    unet = UNet2DConditionModel.from_config(_config("unet", overrides))
    _seeded(seed + 1)
    vae = AutoencoderKL.from_config(_config("vae", overrides))
    _seeded(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**_config("text_encoder", overrides)))
    controlnets: dict[str, ControlNetModel] = {}
    for index, kind in enumerate(CONTROLNET_KINDS):
        _seeded(seed + 10 + index)
        controlnets[kind] = _controlnet(unet, overrides)
        # from_unet copies the UNet and zero-initialises the ControlNet's output convolutions,
        # which would make every residual zero; random output layers make the nets matter in tests.
        _randomize_zero_convs(controlnets[kind], seed + 20 + index)
    family = ModelFamily(
        name=name,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=sd15_tokenizer(cache_dir),
        controlnets=controlnets,
        scheduler_config=sd15_config("scheduler"),
        is_random=True,
        image_sizes=image_sizes,
        source=f"random:{name}:seed={seed}",
    )
    return family.eval()


def _randomize_zero_convs(net: ControlNetModel, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    zero_convs = [
        *net.controlnet_down_blocks,
        net.controlnet_mid_block,
        net.controlnet_cond_embedding.conv_out,
    ]
    with torch.no_grad():
        for conv in zero_convs:
            for param in conv.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def build_tiny_family(seed: int = TINY_SEED, cache_dir: Path | None = None) -> ModelFamily:
    return build_family("tiny", OVERRIDES["tiny"], seed, TINY_IMAGE_SIZES, cache_dir)


def build_sd15_random_family(seed: int = TINY_SEED, cache_dir: Path | None = None) -> ModelFamily:
    return build_family("sd15-random", OVERRIDES["sd15-random"], seed, (256, 512, 1024), cache_dir)
