"""Loading real weights from local paths, never from a hub.

A :class:`FamilySpec` names the base model (a diffusers folder or one SD 1.5 ``.safetensors`` /
``.ckpt`` file), an optional VAE override (e.g. ``vae-ft-mse-840000``) and one path per
ControlNet kind (diffusers folder, or a single ``.safetensors`` / ``.pth`` file). Single files are
converted with diffusers' own converters, fed the SD 1.5 configs that ship with this package
instead of the ones diffusers would download.
"""

from __future__ import annotations

import json
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusers import AutoencoderKL, ControlNetModel, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from .builders import (
    TINY_VERSION,
    build_sd15_random_family,
    build_tiny_family,
    cache_root,
    sd15_config,
    sd15_config_dir,
)
from .built_once import build_once
from .family import CONTROLNET_KINDS, FAMILY_FILE, ModelFamily
from .tokenizer import sd15_tokenizer

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt", ".bin")


class ModelLoadError(RuntimeError):
    """A model path is missing, unreadable or not an SD 1.5-shaped model."""


@dataclass
class FamilySpec:
    base: str
    controlnets: dict[str, str] = field(default_factory=dict)
    vae: str | None = None
    name: str | None = None

    @classmethod
    def from_json(cls, path: Path) -> FamilySpec:
        data = json.loads(path.read_text())
        return cls(
            base=data["base"],
            controlnets=dict(data.get("controlnets", {})),
            vae=data.get("vae"),
            name=data.get("name"),
        )


def is_single_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise ModelLoadError(f"{what} not found: {path}")
    return path


def single_file_config_dir(cache_dir: Path | None = None) -> Path:
    """A diffusers-layout config folder (SD 1.5 configs + tokenizer) for single-file loading."""
    target = (cache_dir or cache_root()) / "sd15-config"
    if not (target / "tokenizer" / "vocab.json").is_file():
        shutil.copytree(sd15_config_dir(), target, dirs_exist_ok=True)
        sd15_tokenizer(target)
    return target


def load_base_single_file(path: Path, config_dir: Path | None = None) -> StableDiffusionPipeline:
    """An SD 1.5 checkpoint in the original (LDM) layout, converted offline."""
    config = config_dir or single_file_config_dir()
    try:
        return StableDiffusionPipeline.from_single_file(
            str(path), config=str(config), local_files_only=True, safety_checker=None
        )
    except Exception as exc:
        raise ModelLoadError(f"cannot load SD 1.5 checkpoint {path}: {exc}") from exc


def load_controlnet(path: Path, config_dir: Path | None = None) -> ControlNetModel:
    _require(path, "ControlNet")
    try:
        if path.is_dir():
            return ControlNetModel.from_pretrained(str(path), local_files_only=True)
        config = config_dir or _controlnet_config_dir()
        return ControlNetModel.from_single_file(str(path), config=str(config), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot load ControlNet {path}: {exc}") from exc


def _controlnet_config_dir() -> Path:
    target = cache_root() / "sd15-controlnet-config"
    if not (target / "config.json").is_file():
        target.mkdir(parents=True, exist_ok=True)
        (target / "config.json").write_text(json.dumps(sd15_config("controlnet"), indent=2))
    return target


def _load_folder_components(folder: Path) -> dict[str, Any]:
    try:
        return {
            "unet": UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True),
            "vae": AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True),
            "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True),
            "tokenizer": _folder_tokenizer(folder),
            "scheduler_config": json.loads((folder / "scheduler" / "scheduler_config.json").read_text()),
        }
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{folder} is not a complete SD 1.5 diffusers folder: {exc}") from exc


def _folder_tokenizer(folder: Path) -> CLIPTokenizer:
    if (folder / "tokenizer" / "vocab.json").is_file():
        return CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    return sd15_tokenizer(cache_root())


# diffusers and transformers load through process-wide patches of torch (empty-weight init):
# two threads loading at once corrupt each other's modules, so one load runs at a time.
_LOADING = threading.RLock()


def load_family(spec: FamilySpec, config_dir: Path | None = None) -> ModelFamily:
    with _LOADING:
        return _load_family(spec, config_dir)


def _load_family(spec: FamilySpec, config_dir: Path | None) -> ModelFamily:
    base = _require(Path(spec.base).expanduser(), "base model")
    meta: dict[str, Any] = {}
    if is_single_file(base):
        pipe = load_base_single_file(base, config_dir)
        parts: dict[str, Any] = {
            "unet": pipe.unet,
            "vae": pipe.vae,
            "text_encoder": pipe.text_encoder,
            "tokenizer": pipe.tokenizer,
            "scheduler_config": dict(pipe.scheduler.config),
        }
    elif base.is_dir():
        parts = _load_folder_components(base)
        if (base / FAMILY_FILE).is_file():
            meta = json.loads((base / FAMILY_FILE).read_text())
    else:
        raise ModelLoadError(
            f"base model must be a diffusers folder or one of {SINGLE_FILE_SUFFIXES}: {base}"
        )
    if spec.vae:
        vae_path = _require(Path(spec.vae).expanduser(), "VAE")
        parts["vae"] = _load_vae(vae_path)
    controlnets = {kind: load_controlnet(Path(p).expanduser()) for kind, p in spec.controlnets.items()}
    for kind in meta.get("controlnets", []):
        if kind not in controlnets and (base / f"controlnet_{kind}").is_dir():
            controlnets[kind] = load_controlnet(base / f"controlnet_{kind}")
    unknown = set(controlnets) - set(CONTROLNET_KINDS)
    if unknown:
        raise ModelLoadError(f"unknown ControlNet kinds {sorted(unknown)}; known: {CONTROLNET_KINDS}")
    family = ModelFamily(
        name=spec.name or meta.get("name") or base.stem,
        controlnets=controlnets,
        is_random=bool(meta.get("is_random", False)),
        image_sizes=tuple(meta.get("image_sizes", (256, 512, 1024))),
        source=str(base),
        **parts,
    )
    return family.eval()


def _load_vae(path: Path) -> AutoencoderKL:
    try:
        if path.is_dir():
            return AutoencoderKL.from_pretrained(str(path), local_files_only=True)
        return AutoencoderKL.from_single_file(
            str(path), config=str(single_file_config_dir()), subfolder="vae", local_files_only=True
        )
    except Exception as exc:
        raise ModelLoadError(f"cannot load VAE {path}: {exc}") from exc


def tiny_family(cache_dir: Path | None = None) -> ModelFamily:
    """The tiny seeded family, built once into ``<cache>/models/tiny-v<N>`` and loaded from there."""
    root = cache_dir or cache_root()
    folder = root / "models" / f"tiny-v{TINY_VERSION}"
    with _LOADING:
        build_once(
            folder, FAMILY_FILE, lambda staging: build_tiny_family(cache_dir=root).save_pretrained(staging)
        )
    return load_family(FamilySpec(base=str(folder)))


def resolve_family(models: str, cache_dir: Path | None = None) -> ModelFamily:
    """``tiny``, ``sd15-random`` (full SD 1.5 shapes, random weights, for benchmarks only), a family
    spec ``.json``, a diffusers folder or an SD 1.5 single file."""
    if models == "tiny":
        return tiny_family(cache_dir)
    if models == "sd15-random":
        with _LOADING:
            return build_sd15_random_family(cache_dir=cache_dir)
    path = Path(models).expanduser()
    if path.suffix == ".json" and path.is_file():
        return load_family(FamilySpec.from_json(path))
    return load_family(FamilySpec(base=str(path)))
