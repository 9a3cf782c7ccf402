"""The final LoRA (MISSION.md §1.9): the element-wise mean of the checkpoints named by the best
validation images (equal weights, a checkpoint counted once per image that names it)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from easyphoto.engines.lora import LoraLayer, LoraWeights

from .validation import ValidationImage


def best_images(results: list[ValidationImage], top_k: int) -> list[ValidationImage]:
    """The ``top_k`` highest-scoring validation images, best first (earlier step on ties)."""
    return sorted(results, key=lambda r: (-r.score, r.step, r.template))[:top_k]


def mean_lora(loras: list[LoraWeights], name: str) -> LoraWeights:
    """Element-wise mean of LoRAs with the same layers (down and up matrices averaged separately)."""
    if not loras:
        raise ValueError("no LoRA to merge")
    keys = [(layer.target, layer.module) for layer in loras[0].layers]
    tables = [{(x.target, x.module): x for x in lora.layers} for lora in loras]
    if any(table.keys() != set(keys) for table in tables):
        raise ValueError("the checkpoints do not have the same LoRA layers")
    layers = []
    for key in keys:
        group = [table[key] for table in tables]
        down = torch.stack([x.down.float() for x in group]).mean(dim=0)
        up = torch.stack([x.up.float() for x in group]).mean(dim=0)
        layers.append(LoraLayer(key[0], key[1], down, up, group[0].alpha))
    return LoraWeights(name, layers)


def merge_checkpoints(
    results: list[ValidationImage], top_k: int, load: Callable[[int], LoraWeights], name: str
) -> tuple[LoraWeights, list[ValidationImage]]:
    """The merged LoRA and the images that chose it (best first). ``load`` reads step N's LoRA."""
    chosen = best_images(results, top_k)
    cache: dict[int, LoraWeights] = {}
    for image in chosen:
        if image.step not in cache:  # each checkpoint read once, however many images name it
            cache[image.step] = load(image.step)
    return mean_lora([cache[image.step] for image in chosen], name), chosen
