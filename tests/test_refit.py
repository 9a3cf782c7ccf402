"""LoRA refit, checked here without TensorRT: the export maps each LoRA-targeted layer to the weight
an engine built from its graph holds, and swapping a LoRA's merged weights into the graph in
onnxruntime computes what PyTorch computes with that LoRA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from easyphoto.engines.adapters import SampleAdapter
from easyphoto.engines.backends.torch_backend import TorchBackend
from easyphoto.engines.lora import LoraLayer, LoraWeights
from easyphoto.engines.models.family import ModelFamily
from easyphoto.engines.roles.diffusion import describe_roles
from easyphoto.export.onnx_export import export_role
from easyphoto.export.refit import base_weights, merged_weights, session_with_weights


@pytest.fixture(scope="module")
def exported_unet(tiny: ModelFamily, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    roots = {"unet": tiny.unet, "text_encoder": tiny.text_encoder}
    result = export_role(describe_roles(tiny)["unet"], tmp_path_factory.mktemp("refit"), lora_roots=roots)
    return result.path, result.lora_weights


def _lora(backend: TorchBackend, seed: int) -> LoraWeights:
    generator = torch.Generator().manual_seed(seed)
    layers = [
        LoraLayer(
            "unet", module, torch.randn(4, *shape[1:], generator=generator) * 0.1,
            torch.randn(shape[0], 4, *[1] * (len(shape) - 2), generator=generator) * 0.1, 4.0,
        )
        for module, shape in backend.lora_targets()["unet"].items()
    ]  # fmt: skip
    return LoraWeights(f"refit-{seed}", layers)


def test_every_targeted_layer_maps_to_a_weight_of_the_graph(
    exported_unet: tuple[Path, dict[str, str]], tiny: ModelFamily
) -> None:
    path, names = exported_unet
    targets = TorchBackend(tiny, "cpu").lora_targets()["unet"]
    assert set(names) == set(targets)  # all 192... of the tiny UNet, none shared
    base = base_weights(path, set(names.values()))
    for module, name in names.items():
        assert base[name].shape == targets[module], module
        assert np.array_equal(base[name], tiny.unet.get_submodule(module).weight.detach().numpy())


def test_weights_swapped_into_the_graph_equal_pytorch_with_the_lora(
    exported_unet: tuple[Path, dict[str, str]], tiny: ModelFamily
) -> None:
    path, names = exported_unet
    backend = TorchBackend(tiny, "cpu")
    lora = _lora(backend, 3)
    merged = merged_weights(lora, 0.8, names, base_weights(path, set(names.values())), "unet")
    assert set(merged) == set(names.values())  # only the touched weights are written
    unet = describe_roles(tiny)["unet"]
    sample = unet.sample_inputs("opt", seed=5)
    session = session_with_weights(path, merged)
    feed = {spec.name: sample[spec.name].numpy() for spec in unet.inputs}
    (refitted,) = session.run(["noise_pred"], feed)
    adapter = backend.adapter("refit@v1", lambda: lora)
    rows = [SampleAdapter(adapter, 0.8)] * len(sample["sample"])
    ours = backend.infer("unet", sample, rows)["noise_pred"].numpy()
    base = backend.infer("unet", sample)["noise_pred"].numpy()
    assert np.max(np.abs(refitted - ours)) <= 1e-4
    assert np.max(np.abs(refitted - base)) > 1e-2  # the LoRA did change the graph's output


def test_layers_whose_weight_a_controlnet_shares_are_reported_not_mapped(
    tiny: ModelFamily, tmp_path: Path
) -> None:
    """The tiny ControlNets are copies of the UNet's encoder (ControlNetModel.from_unet), so in a fused
    stage graph the exporter keeps one initializer for both: those layers cannot be refitted alone."""
    import json

    from easyphoto.engines.roles.diffusion import describe_stage

    roots = {"unet": tiny.unet, "text_encoder": tiny.text_encoder}
    result = export_role(describe_stage(tiny, ("canny", "tile")), tmp_path, lora_roots=roots)
    shared = json.loads((tmp_path / "stage_canny_tile" / "export.json").read_text())["lora_weights_shared"]
    targets = TorchBackend(tiny, "cpu").lora_targets()["unet"]
    assert set(result.lora_weights) | set(shared) == set(targets) and shared
    assert all(layer.startswith(("down_blocks.", "mid_block.")) for layer in shared)  # what was copied
    assert all(name.startswith("unet.unet.") for name in result.lora_weights.values())
