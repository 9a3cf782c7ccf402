"""A LoRA fused into a copy of the UNet's weights (the LCM fast path's base): every linear and
convolution layer may be adapted, in kohya or peft keys, and the fused model computes what the
base model plus each layer's low-rank update computes, with the shared base left untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional

from easyphoto.engines.lora import (
    TARGET_MODULES,
    LoraLayer,
    LoraWeights,
    every_layer,
    fused_copy,
    load_lora,
    lora_targets,
    save_lora,
    submodule,
)
from easyphoto.engines.models.family import ModelFamily
from easyphoto.rpc.errors import InvalidArgument

# A conv of a resnet (3x3), a time projection, a 1x1 shortcut-like conv and an attention layer.
LAYERS = ("down_blocks.0.resnets.0.conv1", "down_blocks.0.resnets.0.time_emb_proj", "conv_in")


def _layers(tiny: ModelFamily) -> list[str]:
    attention = next(iter(lora_targets({"unet": tiny.unet})["unet"]))
    return [*LAYERS, attention]


def _random_lora(unet: nn.Module, names: list[str], rank: int = 4) -> LoraWeights:
    generator = torch.Generator().manual_seed(7)
    layers = []
    for name in names:
        weight = unet.get_submodule(name).weight
        tail = tuple(weight.shape[2:])
        down = torch.randn(rank, weight.shape[1], *tail, generator=generator) * 0.1
        up = torch.randn(weight.shape[0], rank, *(1,) * len(tail), generator=generator) * 0.1
        layers.append(LoraLayer("unet", name, down, up, alpha=2.0))
    return LoraWeights("lcm", layers)


def _unet_output(unet: nn.Module, tiny: ModelFamily) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=generator)
    states = torch.randn(1, 77, tiny.text_encoder.config.hidden_size, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([400.0]), encoder_hidden_states=states).sample


def _with_updates(unet: nn.Module, lora: LoraWeights, weight: float) -> list:
    """Forward hooks adding each layer's update to its output, computed from the factors (the
    other way round from fusing: weight * up(down(x)) with the layer's own stride and padding)."""
    handles = []
    for layer in lora.layers:
        module = unet.get_submodule(layer.module)
        scale = weight * layer.alpha / layer.rank

        def hook(
            module: nn.Module,
            args: tuple,
            output: torch.Tensor,
            layer: LoraLayer = layer,
            scale: float = scale,
        ):
            x = args[0]
            if isinstance(module, nn.Conv2d):
                low = functional.conv2d(x, layer.down, None, module.stride, module.padding)
                return output + scale * functional.conv2d(low, layer.up)
            return output + scale * functional.linear(functional.linear(x, layer.down), layer.up)

        handles.append(module.register_forward_hook(hook))
    return handles


@pytest.mark.parametrize("kohya", [True, False])
def test_a_fused_lora_computes_the_base_plus_each_layers_update(
    tiny: ModelFamily, tmp_path: Path, kohya: bool
) -> None:
    lora = _random_lora(tiny.unet, _layers(tiny))
    path = tmp_path / "lcm.safetensors"
    save_lora(lora, path, kohya=kohya)
    loaded = load_lora(path, every_layer({"unet": tiny.unet}))
    assert sorted(layer.module for layer in loaded.layers) == sorted(_layers(tiny))
    before = {name: p.clone() for name, p in tiny.unet.named_parameters()}
    base = _unet_output(tiny.unet, tiny)

    fused = fused_copy(tiny.unet, loaded, "unet", weight=0.8)
    handles = _with_updates(tiny.unet, lora, weight=0.8)
    try:
        expected = _unet_output(tiny.unet, tiny)
    finally:
        for handle in handles:
            handle.remove()
    got = _unet_output(fused, tiny)
    assert (got - base).abs().max() > 1e-2  # the LoRA changes the output, so the check can fail
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), (got - expected).abs().max()
    # The shared base is untouched.
    assert all(torch.equal(p, before[name]) for name, p in tiny.unet.named_parameters())
    assert torch.equal(_unet_output(tiny.unet, tiny), base)
    assert submodule(fused, LAYERS[0]).weight.shape == submodule(tiny.unet, LAYERS[0]).weight.shape


def test_a_fused_copy_of_a_hooked_model_carries_no_hooks(tiny: ModelFamily) -> None:
    """Serving models carry the per-row adapter hooks; the fused copy must be made without them."""
    from easyphoto.engines.adapters import AdapterHooks

    hooks = AdapterHooks.on({"unet": tiny.unet}, lora_targets({"unet": tiny.unet}))
    assert hooks.modules["unet"] is tiny.unet
    fused = fused_copy(tiny.unet, _random_lora(tiny.unet, list(LAYERS)), "unet", weight=1.0)
    assert not any(module._forward_hooks for module in fused.modules())
    shared = {p.data_ptr() for p in tiny.unet.parameters()}
    assert not any(p.data_ptr() in shared for p in fused.parameters())


def test_users_lora_targets_stay_the_attention_layers(tiny: ModelFamily, tmp_path: Path) -> None:
    """A LoRA touching a resnet convolution fuses (every_layer) but is no user's LoRA."""
    path = tmp_path / "lcm.safetensors"
    save_lora(_random_lora(tiny.unet, list(LAYERS[:1])), path, kohya=True)
    assert load_lora(path, every_layer({"unet": tiny.unet})).layers
    with pytest.raises(InvalidArgument, match="names no LoRA-targeted layer"):
        load_lora(path, lora_targets({"unet": tiny.unet}))
    assert "resnets" not in TARGET_MODULES["unet"]
