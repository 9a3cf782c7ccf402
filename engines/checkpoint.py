"""Writing a family as one SD 1.5 checkpoint in the original (LDM) layout.

The inverse of the single-file converters diffusers ships: users of other tools (A1111, ComfyUI)
can take a base model, or a LoRA-merged one, as one ``.safetensors``, and the loader's single-file
path is tested on files we write ourselves (no real checkpoint can be downloaded here).
Key rules follow the LDM layout: UNet under ``model.diffusion_model.``, VAE under
``first_stage_model.``, the CLIP text model under ``cond_stage_model.transformer.``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from .family import ModelFamily

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_resnet(rest: str, table: dict[str, str]) -> str:
    head, _, tail = rest.partition(".")
    for ours, theirs in table.items():
        if rest.startswith(ours + "."):
            return theirs + rest[len(ours) :]
    return f"{head}.{tail}" if tail else head


def unet_key(key: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> str:
    for ours, theirs in UNET_TOP.items():
        if key.startswith(ours + "."):
            return theirs + key[len(ours) :]
    per_block = layers_per_block + 1
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        slot = f"input_blocks.{per_block * block + index + 1}"
        return f"{slot}.0.{_rename_resnet(rest, UNET_RESNET)}" if kind == "resnets" else f"{slot}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{per_block * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_rename_resnet(m[2], UNET_RESNET)}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        slot = f"output_blocks.{per_block * block + index}"
        return f"{slot}.0.{_rename_resnet(rest, UNET_RESNET)}" if kind == "resnets" else f"{slot}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
        block = int(m[1])
        position = 2 if block in up_blocks_with_attention else 1
        return f"output_blocks.{per_block * block + layers_per_block}.{position}.{m[2]}"
    raise KeyError(f"no LDM name for UNet key {key}")


def vae_key(key: str, num_blocks: int) -> str:
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
        rest = m[2]
        for ours, theirs in VAE_ATTENTION.items():
            if rest.startswith(ours + "."):
                rest = theirs + rest[len(ours) :]
        return f"{m[1]}.mid.attn_1.{rest}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"decoder.up.{num_blocks - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
        return f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.{m[2]}"
    return key


def ldm_state_dict(family: ModelFamily) -> dict[str, torch.Tensor]:
    """The family's UNet, VAE and text encoder under LDM names, as one state dict."""
    unet_config = family.unet.config
    with_attention = {i for i, name in enumerate(unet_config.up_block_types) if "CrossAttn" in name}
    state: dict[str, torch.Tensor] = {}
    for key, tensor in family.unet.state_dict().items():
        state[UNET_PREFIX + unet_key(key, int(unet_config.layers_per_block), with_attention)] = tensor
    num_blocks = len(family.vae.config.block_out_channels)
    for key, tensor in family.vae.state_dict().items():
        name = vae_key(key, num_blocks)
        is_attention_matrix = ".mid.attn_1." in name and name.endswith("weight") and tensor.ndim == 2
        state[VAE_PREFIX + name] = tensor[:, :, None, None] if is_attention_matrix else tensor
    for key, tensor in family.text_encoder.state_dict().items():
        # Real SD 1.5 files keep transformers' old nesting (``text_model.``), which
        # transformers 5.6+ flattened away.
        state[TEXT_PREFIX + (key if key.startswith("text_model.") else "text_model." + key)] = tensor
    return state


def save_single_file(family: ModelFamily, path: Path) -> None:
    state = {k: v.detach().to("cpu").contiguous() for k, v in ldm_state_dict(family).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
