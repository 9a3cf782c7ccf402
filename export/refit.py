"""LoRA refit of exported roles: a user's LoRA merged into the weights of a built engine, no rebuild
(for single-user-heavy traffic; mixed users are served per sample, ``engines/adapters.py``).

At export time each LoRA-targeted layer of a role is mapped to the ONNX initializer that holds its
weight (:func:`lora_weight_names`: the PyTorch parameter name, kept because constant folding is
off); an engine built from that graph by TensorRT's ONNX parser names its weights the same, so the
map addresses both. A refit writes only the touched weights, each its base plus ``weight x
delta`` (:func:`merged_weights`), computed ahead. On the GPU host :func:`refit_engine` hands them to
``trt.Refitter``; here :func:`session_with_weights` swaps them into the ONNX graph in onnxruntime,
which checks the map and the merge against PyTorch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from torch import nn

from easyphoto.engines.lora import LoraWeights, lora_targets, module_name
from easyphoto.engines.roles.description import RoleDescription


def lora_weight_names(
    description: RoleDescription, module: nn.Module, roots: dict[str, nn.Module], initializers: set[str]
) -> tuple[dict[str, str], list[str]]:
    """``{LoRA file module name: ONNX initializer}`` for the role's LoRA-targeted layers, and the
    layers whose weight has no initializer of its own (the exporter merged identical tensors into
    one: a ControlNet copied from its UNet shares them, so those layers cannot be refitted alone)."""
    target = description.lora_target
    if target is None or target not in roots:
        return {}, []
    root = roots[target]
    prefix = next((name for name, sub in module.named_modules() if sub is root), None)
    if prefix is None:
        return {}, []
    names, shared = {}, []
    for layer in lora_targets({target: root})[target]:
        weight = ".".join(part for part in (prefix, module_name(root, layer), "weight") if part)
        if weight in initializers:
            names[layer] = weight
        else:
            shared.append(layer)
    return names, shared


def base_weights(graph: Path, names: set[str]) -> dict[str, np.ndarray]:
    """These initializers of the graph, as arrays (the weights a refit starts from and restores)."""
    model = onnx.load(str(graph), load_external_data=False)
    picked = [init for init in model.graph.initializer if init.name in names]
    if any(init.data_location == onnx.TensorProto.EXTERNAL for init in picked):
        onnx.load_external_data_for_model(model, str(graph.parent))
        picked = [init for init in model.graph.initializer if init.name in names]
    return {init.name: numpy_helper.to_array(init) for init in picked}


def merged_weights(
    lora: LoraWeights, weight: float, lora_weights: dict[str, str], base: dict[str, np.ndarray], target: str
) -> dict[str, np.ndarray]:
    """The weights a refit writes for ``lora`` at ``weight``: each touched layer's base plus
    ``weight x delta``, by initializer name (layers of other targets are skipped)."""
    merged = {}
    for layer in lora.layers:
        if layer.target != target:
            continue
        name = lora_weights.get(layer.module)
        if name is None:
            raise KeyError(f"{target}.{layer.module} has no weight of its own in this engine")
        value = base[name]
        merged[name] = (value + weight * layer.delta().numpy().reshape(value.shape)).astype(value.dtype)
    return merged


def session_with_weights(graph: Path, weights: dict[str, np.ndarray]) -> ort.InferenceSession:
    """The graph in onnxruntime with these initializers replaced: what a refitted engine computes.
    Graph optimisation is off: onnxruntime silently keeps the original of an initializer an
    optimisation pass already used."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    values = {
        name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value)) for name, value in weights.items()
    }
    for name, value in values.items():
        options.add_initializer(name, value)
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    session.easyphoto_weights = values  # they must outlive the session: onnxruntime keeps no reference
    return session


def refit_engine(engine: Any, weights: dict[str, np.ndarray]) -> None:  # pragma: no cover - TensorRT, GPU
    """Writes ``weights`` into a refittable TensorRT engine in place (only those: the refitter
    keeps every other weight), then refits it; raises naming a weight the engine does not have."""
    import tensorrt as trt

    refitter = trt.Refitter(engine, trt.Logger(trt.Logger.WARNING))
    for name, value in weights.items():
        if not refitter.set_named_weights(name, trt.Weights(np.ascontiguousarray(value))):
            raise KeyError(f"the engine has no refittable weight {name!r}")
    if not refitter.refit_cuda_engine():
        raise RuntimeError(f"TensorRT could not refit the engine (missing: {refitter.get_missing_weights()})")
