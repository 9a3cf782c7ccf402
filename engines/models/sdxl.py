"""The SDXL family that paints templates from text (EasyPhoto's text-to-template): its two text
encoders, UNet (with the added text-and-time embedding), VAE and scheduler.

Loaded from a local diffusers folder (``StableDiffusionXLPipeline``'s layout: ``unet/``, ``vae/``,
``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``, ``scheduler/``), from an
SDXL checkpoint file in the original layout (converted offline with the shipped configs), or built:
``tiny-sdxl`` (the SDXL architecture at a few hundred thousand parameters, seeded, for tests and
the demo) and ``sdxl-random`` (full SDXL base shapes, for benchmarks). Random families paint
noise (``is_random``), never a template worth showing.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .builders import cache_root
from .built_once import build_once
from .family import freeze
from .tokenizer import sd15_tokenizer

SDXL_FILE = "easyphoto_sdxl.json"
TINY_SDXL_SEED = 4321
TINY_SDXL_VERSION = 3  # 3: a wider second text encoder; the folder is a StableDiffusionXLPipeline's
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
TINY_SDXL_UNET: dict[str, Any] = {
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [2, 4],
    "transformer_layers_per_block": [1, 2],
    "cross_attention_dim": 80,  # the two text encoders' hidden sizes, 32 + 48
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 96,  # 6 time ids x 8, and the pooled 48
    "norm_num_groups": 8,
    "sample_size": 16,
}
TINY_SDXL_VAE: dict[str, Any] = {
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 128,
}
TINY_SDXL_TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
}
# The second encoder is wider than the first, as in SDXL (1280 against 768): diffusers' single-file
# loader tells the two apart by their widths.
TINY_SDXL_TEXT_2: dict[str, Any] = {**TINY_SDXL_TEXT, "hidden_size": 48, "projection_dim": 48}
TINY_SDXL_IMAGE_SIZES = (64, 128, 256)
SDXL_IMAGE_SIZES = (512, 1024, 1536)
# OpenCLIP bigG's tokenizer (SDXL's second) pads with "!", the first with the end token.
SECOND_TOKENIZER_PAD = "!"


@dataclass
class SdxlFamily:
    name: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    scheduler_config: dict[str, Any]
    is_random: bool
    image_sizes: tuple[int, int, int] = SDXL_IMAGE_SIZES
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def vae_scale_factor(self) -> int:
        return int(2 ** (len(self.vae.config.block_out_channels) - 1))

    @property
    def image_multiple(self) -> int:
        """Image sides must be multiples of this (VAE factor x the UNet's down factor)."""
        return self.vae_scale_factor * int(2 ** (len(self.unet.config.block_out_channels) - 1))

    @property
    def text_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {
            "unet": self.unet,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
        }

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> SdxlFamily:
        """Every module on ``device`` in ``dtype``, the VAE in fp32 where it asks to be
        (``force_upcast``: SDXL's overflows in fp16)."""
        for name, module in self.modules().items():
            upcast = name == "vae" and bool(self.vae.config.get("force_upcast", False))
            wanted = torch.float32 if upcast else dtype
            module.to(device=torch.device(device))
            if next(module.parameters()).dtype != wanted:  # diffusers warns on every dtype cast
                module.to(dtype=wanted)
        return self

    def eval(self) -> SdxlFamily:
        freeze(self.modules().values())
        return self

    def save_pretrained(self, directory: Path) -> None:
        """The diffusers ``StableDiffusionXLPipeline`` folder layout."""
        directory.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(directory / "unet")
        self.vae.save_pretrained(directory / "vae")
        self.text_encoder.save_pretrained(directory / "text_encoder")
        self.text_encoder_2.save_pretrained(directory / "text_encoder_2")
        self.tokenizer.save_pretrained(directory / "tokenizer")
        self.tokenizer_2.save_pretrained(directory / "tokenizer_2")
        (directory / "scheduler").mkdir(exist_ok=True)
        (directory / "scheduler" / "scheduler_config.json").write_text(json.dumps(self.scheduler_config))
        (directory / "model_index.json").write_text(_config_text("model_index.json"))
        meta = {"name": self.name, "is_random": self.is_random, "image_sizes": list(self.image_sizes)}
        (directory / SDXL_FILE).write_text(json.dumps(meta))


@dataclass(frozen=True)
class SdxlFacts:
    """What the text-to-image pass needs besides the roles: the tokenizers, the scheduler config
    and the VAE's scaling factor (a Triton deployment reads them from its export's manifest)."""

    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    scheduler_config: dict[str, Any]
    vae_scaling_factor: float
    is_random: bool = False
    source: str = ""

    @classmethod
    def of(cls, family: SdxlFamily) -> SdxlFacts:
        return cls(
            family.tokenizer,
            family.tokenizer_2,
            dict(family.scheduler_config),
            float(family.vae.config.scaling_factor),
            family.is_random,
            family.source,
        )


class SdxlLoadError(RuntimeError):
    """A path that is not a loadable SDXL folder (the message says what is missing)."""


def sdxl_config(component: str) -> dict[str, Any]:
    """A shipped SDXL base config (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``, ``scheduler``)."""
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return dict(json.loads(_config_text(component, name)))


def _config_text(*parts: str) -> str:
    return resources.files(__package__).joinpath("configs", "sdxl", *parts).read_text()


def single_file_config_dir(cache_dir: Path | None = None) -> Path:
    """SDXL base's diffusers config folder (configs, pipeline index, both tokenizers): what an
    SDXL checkpoint in the original layout is converted with, offline."""
    target = (cache_dir or cache_root()) / f"sdxl-config-v{TINY_SDXL_VERSION}"

    def write(staging: Path) -> None:
        shutil.copytree(Path(str(resources.files(__package__).joinpath("configs", "sdxl"))), staging)
        tokenizer = sd15_tokenizer(cache_root())
        tokenizer.save_pretrained(staging / "tokenizer")
        second = CLIPTokenizer.from_pretrained(
            cache_root() / "tokenizer", local_files_only=True, pad_token=SECOND_TOKENIZER_PAD
        )
        second.save_pretrained(staging / "tokenizer_2")

    build_once(target, "model_index.json", write)
    return target


def load_sdxl_single_file(path: Path, config_dir: Path | None = None) -> SdxlFamily:
    """An SDXL checkpoint in the original (SGM) layout, converted by diffusers offline with the
    shipped SDXL base configs (or ``config_dir``'s: a family of other shapes)."""
    config = config_dir or single_file_config_dir()
    try:
        with torch.no_grad():
            pipe = StableDiffusionXLPipeline.from_single_file(
                str(path), config=str(config), local_files_only=True
            )
    except Exception as exc:
        raise SdxlLoadError(f"cannot load SDXL checkpoint {path}: {exc}") from exc
    family = SdxlFamily(
        name=path.stem,
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        text_encoder_2=pipe.text_encoder_2,
        tokenizer=pipe.tokenizer,
        tokenizer_2=pipe.tokenizer_2,
        scheduler_config=dict(pipe.scheduler.config),
        is_random=False,
        source=str(path),
    )
    return family.eval()


def build_sdxl_family(
    name: str, overrides: dict[str, dict[str, Any]], seed: int, image_sizes: tuple[int, int, int]
) -> SdxlFamily:
    """Every module from the SDXL configs with ``overrides``, weights seeded."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config({**sdxl_config("unet"), **overrides.get("unet", {})})
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL.from_config({**sdxl_config("vae"), **overrides.get("vae", {})})
    encoders = []
    for index, (component, cls) in enumerate(
        (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection))
    ):
        torch.manual_seed(seed + 2 + index)
        config = CLIPTextConfig(**{**sdxl_config(component), **overrides.get(component, {})})
        encoders.append(cls(config))
    tokenizer = sd15_tokenizer(cache_root())
    second = CLIPTokenizer.from_pretrained(
        cache_root() / "tokenizer", local_files_only=True, pad_token=SECOND_TOKENIZER_PAD
    )
    family = SdxlFamily(
        name=name,
        unet=unet,
        vae=vae,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        tokenizer=tokenizer,
        tokenizer_2=second,
        scheduler_config=sdxl_config("scheduler"),
        is_random=True,
        image_sizes=image_sizes,
        source=f"random:{name}:seed={seed}",
    )
    return family.eval()


def build_tiny_sdxl_family(seed: int = TINY_SDXL_SEED) -> SdxlFamily:
    overrides = {
        "unet": TINY_SDXL_UNET,
        "vae": TINY_SDXL_VAE,
        "text_encoder": TINY_SDXL_TEXT,
        "text_encoder_2": TINY_SDXL_TEXT_2,
    }
    return build_sdxl_family("tiny-sdxl", overrides, seed, TINY_SDXL_IMAGE_SIZES)


def tiny_sdxl_family(cache_dir: Path | None = None) -> SdxlFamily:
    """The tiny seeded SDXL family, built once into ``<cache>/models/tiny-sdxl-v<N>`` and loaded back."""
    folder = (cache_dir or cache_root()) / "models" / f"tiny-sdxl-v{TINY_SDXL_VERSION}"
    build_once(folder, SDXL_FILE, lambda staging: build_tiny_sdxl_family().save_pretrained(staging))
    return load_sdxl_family(folder)


def load_sdxl_family(folder: Path) -> SdxlFamily:
    """An SDXL diffusers folder; SdxlLoadError saying what is missing or unreadable."""
    if not folder.is_dir():
        raise SdxlLoadError(f"{folder} is not a folder (an SDXL diffusers folder is needed)")
    meta = json.loads((folder / SDXL_FILE).read_text()) if (folder / SDXL_FILE).is_file() else {}
    try:
        family = SdxlFamily(
            name=meta.get("name") or folder.name,
            unet=UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True),
            vae=AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True),
            text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
                folder / "text_encoder_2", local_files_only=True
            ),
            tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True),
            tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2", local_files_only=True),
            scheduler_config=json.loads((folder / "scheduler" / "scheduler_config.json").read_text()),
            is_random=bool(meta.get("is_random", False)),
            image_sizes=tuple(meta.get("image_sizes", SDXL_IMAGE_SIZES)),
            source=str(folder),
        )
    except (OSError, ValueError, KeyError) as exc:
        raise SdxlLoadError(f"{folder} is not a complete SDXL diffusers folder: {exc}") from exc
    if family.unet.config.addition_embed_type != "text_time":
        raise SdxlLoadError(f"{folder}/unet is not an SDXL UNet (no text-and-time embedding)")
    return family.eval()


def resolve_sdxl_family(models: str, cache_dir: Path | None = None) -> SdxlFamily:
    """``tiny-sdxl``, ``sdxl-random`` (full shapes, random weights), an SDXL diffusers folder or
    an SDXL checkpoint file (``.safetensors``, ``.ckpt``)."""
    if models == "tiny-sdxl":
        return tiny_sdxl_family(cache_dir)
    if models == "sdxl-random":
        return build_sdxl_family("sdxl-random", {}, TINY_SDXL_SEED, SDXL_IMAGE_SIZES)
    path = Path(models).expanduser()
    if path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        return load_sdxl_single_file(path)
    return load_sdxl_family(path)
