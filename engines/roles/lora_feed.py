"""The LoRA inputs of a graph with LoRA inputs (:mod:`engines.roles.lora_inputs`), built from
adapters' factors. numpy only, imports nothing of ours: the Triton model that keeps the factors next
to the engine runs this same file (the repository writer copies it beside the model, as it does
``dlib_descriptor.py``).

An adapter's factors for one LoRA target are stored as ``<name>.<target>.npz``: ``layers`` (the
targeted layers, in the graph's order), then ``down_{i}`` ``(rank, in)`` and ``up_{i}`` ``(out,
rank)`` per layer, alpha / rank folded into up.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Per layer, in the graph's order: (down (rank, in), up (out, rank)); None: the layer is untouched.
Factors = list[tuple[np.ndarray, np.ndarray] | None]


def factors_file(name: str, target: str) -> str:
    return f"{name}.{target}.npz"


def save_factors(path: Path, layers: Sequence[str], factors: Factors) -> None:
    """Writes one adapter's factors for one target (``factors``: per layer, a pair or None)."""
    arrays: dict[str, np.ndarray] = {"layers": np.array(layers)}
    for index, pair in enumerate(factors):
        if pair is not None:
            arrays[f"down_{index}"], arrays[f"up_{index}"] = pair
    np.savez(path, allow_pickle=False, **arrays)


def load_factors(path: Path, layers: Sequence[str]) -> Factors:
    """One adapter's factors for one target, checked against the graph's layers."""
    with np.load(path) as data:
        stored = [str(name) for name in data["layers"]]
        if stored != list(layers):
            raise ValueError(f"{path}: adapter factors for other layers than this model's")
        return [
            (data[f"down_{i}"], data[f"up_{i}"]) if f"down_{i}" in data else None for i in range(len(layers))
        ]


def lora_feed(
    rows: Sequence[tuple[str, float]], factors: dict[str, Factors], shapes: Sequence[tuple[int, int]]
) -> dict[str, np.ndarray]:
    """The graph's LoRA inputs for a batch: ``rows``, per row, (adapter name, weight), the name ``""``
    or the weight 0 for the base model; ``factors``, per adapter name, its :data:`Factors`;
    ``shapes``, per layer, its weight's (out, in). Every adapter of the batch is padded to the
    largest rank among them (zeros add nothing); a layer an adapter leaves untouched is zeros."""
    names = list(dict.fromkeys(name for name, weight in rows if name and weight != 0))
    ranks = [pair[0].shape[0] for name in names for pair in factors[name] if pair is not None]
    rank = max(ranks, default=1)
    count = max(len(names), 1)
    feed: dict[str, np.ndarray] = {
        "lora_index": np.array([names.index(n) if n in names and w != 0 else 0 for n, w in rows], np.int64),
        "lora_scale": np.array([w if n in names else 0.0 for n, w in rows], np.float32),
    }
    for index, (out_dim, in_dim) in enumerate(shapes):
        down = np.zeros((count, rank, in_dim), np.float32)
        up = np.zeros((count, out_dim, rank), np.float32)
        for position, name in enumerate(names):
            pair = factors[name][index]
            if pair is not None:
                layer_rank = pair[0].shape[0]
                down[position, :layer_rank] = pair[0]
                up[position, :, :layer_rank] = pair[1]
        feed[f"lora_down_{index}"], feed[f"lora_up_{index}"] = down, up
    return feed
