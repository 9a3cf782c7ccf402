"""Graphs with LoRA inputs: how a compiled model (ONNX, TensorRT, served by Triton) computes rows of
several users in one call.

A role that takes a LoRA (``lora_target``) gets a variant, ``<role>_lora``, whose inputs are the
role's own followed by ``lora_index`` ``[batch]`` (which adapter each row uses), ``lora_scale``
``[batch]`` (its weight; 0 for a row of the base model) and, for each LoRA-targeted layer ``i`` in
the order of :func:`lora_layers`, ``lora_down_{i}`` ``[adapters, lora_rank, in]`` and ``lora_up_{i}``
``[adapters, out, lora_rank]`` (alpha / rank folded into up, as :class:`engines.adapters.Adapter`
holds them). Its module adds each row's low-rank update on every targeted layer with the same
:func:`engines.adapters.low_rank_update` the torch backend uses. The server keeps the factors next
to the model (a call sends adapter names, not factors) and pads one call's adapters to one rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..adapters import low_rank_update
from ..lora import LoraTargets, lora_targets, submodule
from ..models.family import ModelFamily
from ..shapes import AxisRange, TensorSpec, sym
from .description import BATCH, RoleDescription

LORA_SUFFIX = "_lora"
MAX_ADAPTERS = 16  # distinct adapters in one call: at most one per row of the largest batch
MAX_RANK = 256
ADAPTERS, LORA_RANK = sym("adapters"), sym("lora_rank")


def lora_role_name(role: str) -> str:
    return role + LORA_SUFFIX


def lora_layers(targets: LoraTargets, target: str) -> list[str]:
    """The targeted layers of ``target`` in the order the graph's factor inputs follow."""
    return sorted(targets.get(target, {}))


def describe_with_lora(description: RoleDescription, family: ModelFamily) -> RoleDescription:
    """The ``<role>_lora`` variant of a role that takes a LoRA (see the module)."""
    target = description.lora_target
    if target is None:
        raise ValueError(f"{description.name} takes no LoRA")
    roots = family.lora_roots(description.variant)
    targets = lora_targets(roots)
    layers = lora_layers(targets, target)
    factors: list[TensorSpec] = []
    for index, layer in enumerate(layers):
        shape = targets[target][layer]
        factors += [
            TensorSpec(f"lora_down_{index}", "float32", (ADAPTERS, LORA_RANK, shape[1])),
            TensorSpec(f"lora_up_{index}", "float32", (ADAPTERS, shape[0], LORA_RANK)),
        ]
    small = {spec.name: (-0.02, 0.02) for spec in factors}  # sample LoRAs of a trained one's size
    return RoleDescription(
        name=lora_role_name(description.name),
        inputs=(
            *description.inputs,
            TensorSpec("lora_index", "int64", (BATCH,)),
            TensorSpec("lora_scale", "float32", (BATCH,)),
            *factors,
        ),
        outputs=description.outputs,
        axes={
            **description.axes,
            "adapters": AxisRange(1, 2, MAX_ADAPTERS),
            "lora_rank": AxisRange(1, 4, MAX_RANK),
        },
        build_module=lambda: WithLoraInputs(description.build_module(), roots[target], layers),
        fp16=description.fp16,
        sample_ranges={**description.sample_ranges, "lora_index": (0, 1), "lora_scale": (0.0, 1.0), **small},
        lora_target=target,
    )


class WithLoraInputs(nn.Module):
    """A role's module taking its LoRA factors as inputs (see the module): its own inputs, then the
    adapter index and scale per row, then each layer's factors."""

    def __init__(
        self, module: Callable[..., tuple[torch.Tensor, ...]], root: nn.Module, layers: list[str]
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError("a LoRA-input graph wraps a torch module")
        self.module = module
        self.root = root
        self.layers = layers

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        count = len(args) - 2 - 2 * len(self.layers)
        inputs, (index, scale), factors = args[:count], args[count : count + 2], args[count + 2 :]
        with self._updates(index, scale, factors):
            return self.module(*inputs)

    @contextmanager
    def _updates(
        self, index: torch.Tensor, scale: torch.Tensor, factors: tuple[torch.Tensor, ...]
    ) -> Iterator[None]:
        """Each targeted layer adds its rows' updates during this call (hooks that live for it)."""
        handles = []
        for position, name in enumerate(self.layers):
            layer = submodule(self.root, name)
            down, up = factors[2 * position], factors[2 * position + 1]
            handles.append(layer.register_forward_hook(_row_update(index, scale, down, up, layer)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _row_update(
    index: torch.Tensor, scale: torch.Tensor, down: torch.Tensor, up: torch.Tensor, layer: nn.Module
) -> Callable[..., torch.Tensor]:
    conv = isinstance(layer, nn.Conv2d)

    def add(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        rows_down, rows_up = down.index_select(0, index), up.index_select(0, index)
        update = low_rank_update(args[0], rows_down, rows_up, conv)
        return output + update * scale.reshape(-1, *[1] * (output.dim() - 1)).to(output.dtype)

    return add
