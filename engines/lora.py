"""LoRA weights: reading peft/diffusers and kohya files, and the layers they may target.

Formats (both read; the trainer writes the first):
* peft/diffusers: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (and ``text_encoder.``), or
  the older diffusers ``lora.down.weight`` / ``lora.up.weight``; the scale ``alpha / rank`` from a
  ``<module>.alpha`` tensor when present, else the file's ``lora_alpha`` metadata, else 1.
* kohya (sd-scripts, A1111): ``lora_unet_<module with _>.lora_down.weight`` / ``lora_up.weight`` /
  ``.alpha``, and ``lora_te_`` for the text encoder; module names are resolved against the model's
  LoRA-targeted layers (:data:`TARGET_MODULES`), which the engine manifest lists with their shapes,
  so a LoRA is resolved and checked without the weights too.

Serving never patches these into shared weights: :mod:`engines.adapters` applies a user's factors
per sample of a call.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import ModelMixin
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from easyphoto.rpc.errors import InvalidArgument

TARGETS = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
# The layers a LoRA may patch (peft regexes, matched against whole module names): the UNet's
# transformer blocks (attention projections, feed-forward, proj_in/out) and the text encoder's
# attention and MLP. The trainer trains exactly these; serving accepts adapters on exactly these.
TARGET_MODULES = {
    "unet": (
        r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\."
        r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))"
    ),
    "text_encoder": r".*encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))",
}
# For each target, each LoRA-targeted layer by the name LoRA files use, and its weight's shape:
# what resolves kohya names and checks that a LoRA fits, with or without the model's weights.
LoraTargets = dict[str, dict[str, tuple[int, ...]]]
# LoRA files name CLIP text-encoder modules ``text_model.encoder...`` (transformers 4 layout);
# transformers 5 dropped the ``text_model`` level. Files keep the old names so they stay portable.
TEXT_MODEL = "text_model."


@dataclass
class LoraLayer:
    target: str  # "unet" or "text_encoder"
    module: str  # dotted module path inside the target
    down: torch.Tensor  # (rank, in) or (rank, in, 1, 1)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        """The full-rank weight update at strength 1, shaped like the target's weight."""
        down = self.down.flatten(1).float()
        up = self.up.flatten(1).float()
        update = (up @ down) * (self.alpha / self.rank)
        return update.reshape(self.up.shape[0], *self.down.shape[1:])


@dataclass
class LoraWeights:
    name: str
    layers: list[LoraLayer]

    @property
    def targets(self) -> set[str]:
        return {layer.target for layer in self.layers}


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors and metadata. Read whole and parsed from memory: ``safe_open``'s
    ``get_tensor`` (safetensors 0.8) keeps about 58 bytes per tensor for good, a megabyte every ~40
    loads of a LoRA, and a serving process loads one per user version."""
    try:
        data = path.read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        return load_safetensors(data), dict(header.get("__metadata__") or {})
    except Exception as exc:
        raise InvalidArgument(f"cannot read LoRA file {path}: {exc}", field="lora") from exc


def load_lora(path: Path, targets: LoraTargets | None = None) -> LoraWeights:
    """Reads either format. With ``targets`` (see :func:`lora_targets`) kohya names are resolved
    against them and every layer is checked to fit (:func:`check_fits`); without, kohya files are
    refused and nothing is checked."""
    tensors, metadata = _read(path)
    # The name says which file, at which modification time, these weights were read from.
    name = f"{path.resolve()}@{path.stat().st_mtime_ns}"
    if any(k.startswith(tuple(TARGETS.values())) for k in tensors):
        if targets is None:
            raise InvalidArgument("kohya LoRA keys need the model to resolve module names", field="lora")
        lora = LoraWeights(name, _kohya_layers(tensors, targets))
    else:
        lora = LoraWeights(name, _peft_layers(tensors, metadata))
    if targets is not None:
        check_fits(lora, targets)
    return lora


def lora_targets(modules: dict[str, nn.Module]) -> LoraTargets:
    """The LoRA-targeted layers of ``modules`` (``{"unet": ..., "text_encoder": ...}``) with their
    weight shapes, keyed by the names LoRA files use."""
    patterns = {target: re.compile(TARGET_MODULES[target]) for target in modules}
    return _layer_table(
        modules,
        lambda target, name, module: (
            bool(patterns[target].fullmatch(name))
            and isinstance(getattr(module, "weight", None), torch.Tensor)
        ),
    )


def every_layer(modules: dict[str, nn.Module]) -> LoraTargets:
    """Every linear and convolution layer of ``modules`` with its weight's shape, keyed by the
    names LoRA files use: what a LoRA fused into the weights may touch (an LCM-LoRA also adapts
    the resnets' convolutions and time projections, which users' LoRAs never do)."""
    return _layer_table(modules, lambda target, name, module: isinstance(module, nn.Linear | nn.Conv2d))


def _layer_table(modules: dict[str, nn.Module], keep: Callable[[str, str, nn.Module], bool]) -> LoraTargets:
    """The layers ``keep`` takes (target, module name, module), by file name, with weight shapes."""
    return {
        target: {
            file_name(target, root, name): tuple(module.weight.shape)
            for name, module in root.named_modules()
            if keep(target, name, module)
        }
        for target, root in modules.items()
    }


def fuse_lora(root: nn.Module, lora: LoraWeights, target: str, weight: float) -> None:
    """Adds ``weight`` times each of ``lora``'s updates for ``target`` into ``root``'s weights, in
    place: for a copy of a model that serves only with this LoRA (never the shared base)."""
    with torch.no_grad():
        for layer in lora.layers:
            if layer.target == target:
                parameter = submodule(root, layer.module).weight
                assert isinstance(parameter, torch.Tensor)
                parameter.add_((layer.delta() * weight).to(parameter.device, parameter.dtype))


def fused_copy(model: ModelMixin, lora: LoraWeights, target: str, weight: float) -> ModelMixin:
    """A copy of ``model`` with ``lora``'s ``target`` layers fused in at ``weight``, built afresh
    from its config and weights: it shares no tensor with ``model`` and carries none of its hooks
    (a deep copy would copy the adapter hooks' per-thread state, which cannot be copied)."""
    copy = type(model).from_config(model.config)
    copy.load_state_dict(model.state_dict())
    copy.to(device=model.device).eval()
    if copy.dtype != model.dtype:
        copy.to(dtype=model.dtype)
    fuse_lora(copy, lora, target, weight)
    return copy


def check_fits(lora: LoraWeights, targets: LoraTargets) -> None:
    """InvalidArgument (field ``lora``) naming the first layer of ``lora`` that is not a targeted
    layer of the model or whose update is not the shape of that layer's weight."""
    for layer in lora.layers:
        shape = targets.get(layer.target, {}).get(layer.module)
        if shape is None:
            raise InvalidArgument(
                f"LoRA layer {layer.target}.{layer.module} is not a LoRA-targeted layer of this model",
                field="lora",
            )
        update = (int(layer.up.shape[0]), *(int(d) for d in layer.down.shape[1:]))
        if update != shape:
            raise InvalidArgument(
                f"LoRA layer {layer.target}.{layer.module} is {update}, the model's weight is {shape}",
                field="lora",
            )


# The (down, up) key suffixes of peft files, and of the diffusers files saved before diffusers
# moved to peft (0.23 and earlier, the LCM-LoRAs among them).
PEFT_SUFFIXES = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"))


def _peft_layers(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> list[LoraLayer]:
    default_alpha = float(metadata["lora_alpha"]) if "lora_alpha" in metadata else None
    layers = []
    for key, down in tensors.items():
        suffixes = next((pair for pair in PEFT_SUFFIXES if key.endswith(pair[0])), None)
        if suffixes is None:
            continue
        stem = key.removesuffix(suffixes[0])
        target, _, module = stem.partition(".")
        if target not in TARGETS:
            raise InvalidArgument(f"LoRA key {key!r} has no unet./text_encoder. prefix", field="lora")
        up = tensors.get(stem + suffixes[1])
        if up is None:
            raise InvalidArgument(f"LoRA key {key!r} has no {stem + suffixes[1]!r} beside it", field="lora")
        alpha_tensor = tensors.get(f"{stem}.alpha")
        alpha = float(alpha_tensor) if alpha_tensor is not None else (default_alpha or float(down.shape[0]))
        layers.append(LoraLayer(target, module, down, up, alpha))
    if not layers:
        raise InvalidArgument(
            "no LoRA layers found (expected peft lora_A/lora_B or kohya keys)", field="lora"
        )
    return layers


def file_name(target: str, root: nn.Module, name: str) -> str:
    """The name LoRA files use for ``root``'s submodule ``name`` (see TEXT_MODEL)."""
    prefix = TEXT_MODEL if target == "text_encoder" and not hasattr(root, "text_model") else ""
    return prefix + name


def module_name(root: nn.Module, name: str) -> str:
    """A LoRA file's module name as it is in ``root`` (either text-encoder layout)."""
    if name.startswith(TEXT_MODEL) and not hasattr(root, "text_model"):
        return name.removeprefix(TEXT_MODEL)
    return name


def submodule(root: nn.Module, name: str) -> nn.Module:
    """Resolves a LoRA file's module name in either text-encoder layout."""
    return root.get_submodule(module_name(root, name))


def _kohya_layers(tensors: dict[str, torch.Tensor], targets: LoraTargets) -> list[LoraLayer]:
    names = {
        prefix + name.replace(".", "_"): (target, name)
        for target, prefix in TARGETS.items()
        for name in targets.get(target, {})
    }
    layers = []
    for key, down in tensors.items():
        if not key.endswith(".lora_down.weight"):
            continue
        stem = key.removesuffix(".lora_down.weight")
        if stem not in names:
            raise InvalidArgument(
                f"LoRA key {key!r} names no LoRA-targeted layer of this model", field="lora"
            )
        target, module = names[stem]
        alpha = tensors.get(f"{stem}.alpha")
        up = tensors[f"{stem}.lora_up.weight"]
        layers.append(
            LoraLayer(target, module, down, up, float(alpha) if alpha is not None else float(down.shape[0]))
        )
    return layers


def save_lora(weights: LoraWeights, path: Path, kohya: bool = False, alpha_tensors: bool = True) -> None:
    """Writes peft/diffusers keys (with ``.alpha`` tensors), or kohya keys. ``alpha_tensors=False``:
    alpha / rank folded into each up factor instead, the plain layout diffusers'
    ``load_lora_weights`` reads at scale 1 (it takes no alpha from peft keys)."""
    tensors: dict[str, torch.Tensor] = {}
    for layer in weights.layers:
        up = layer.up if alpha_tensors else layer.up * (layer.alpha / layer.rank)
        if kohya:
            stem = TARGETS[layer.target] + layer.module.replace(".", "_")
            tensors[f"{stem}.lora_down.weight"] = layer.down
            tensors[f"{stem}.lora_up.weight"] = up
        else:
            stem = f"{layer.target}.{layer.module}"
            tensors[f"{stem}.lora_A.weight"] = layer.down
            tensors[f"{stem}.lora_B.weight"] = up
        if alpha_tensors:
            tensors[f"{stem}.alpha"] = torch.tensor(layer.alpha)
    path.parent.mkdir(parents=True, exist_ok=True)
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(
        contiguous, str(path), metadata={"format": "pt", "easyphoto": json.dumps({"name": weights.name})}
    )
