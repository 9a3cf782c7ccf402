"""Graphs with LoRA inputs: the ``<role>_lora`` variant fed by ``lora_feed`` computes each row as the
torch backend's per-sample adapters do, and exports to ONNX that matches PyTorch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from easyphoto.engines.adapters import SampleAdapter, adapter_factors
from easyphoto.engines.backends.torch_backend import TorchBackend
from easyphoto.engines.lora import LoraLayer, LoraWeights
from easyphoto.engines.models.family import ModelFamily
from easyphoto.engines.roles.diffusion import describe_roles
from easyphoto.engines.roles.lora_feed import load_factors, lora_feed, save_factors
from easyphoto.engines.roles.lora_inputs import describe_with_lora, lora_layers
from easyphoto.export.onnx_export import export_role


def _lora(backend: TorchBackend, seed: int, rank: int) -> LoraWeights:
    generator = torch.Generator().manual_seed(seed)
    layers = [
        LoraLayer(
            target, module, torch.randn(rank, *shape[1:], generator=generator) * 0.1,
            torch.randn(shape[0], rank, *[1] * (len(shape) - 2), generator=generator) * 0.1, float(rank),
        )
        for target, modules in backend.lora_targets().items()
        for module, shape in list(modules.items())[seed % 2 :: 1 + seed % 2]  # not every layer
    ]  # fmt: skip
    return LoraWeights(f"graph-{seed}", layers)


@pytest.mark.parametrize("role", ["unet", "text_encoder"])
def test_a_lora_graph_computes_each_row_as_the_per_sample_adapters(
    tiny: ModelFamily, role: str, tmp_path: Path
) -> None:
    backend = TorchBackend(tiny, "cpu")
    description = describe_roles(tiny)[role]
    with_lora = describe_with_lora(description, tiny)
    backend.add_role(with_lora)
    adapters = {name: backend.adapter(name, lambda s=seed, r=rank: _lora(backend, s, r))
                for name, seed, rank in (("ann@v1", 1, 4), ("bob@v2", 2, 2))}  # fmt: skip
    rows = [("ann@v1", 0.9), ("bob@v2", 0.5), ("", 0.0), ("ann@v1", 0.3)]
    one = description.sample_inputs("opt", seed=3)
    inputs = {name: torch.cat([value[:1]] * len(rows)) for name, value in one.items()}
    expected = backend.infer(role, inputs, [SampleAdapter(adapters[n], w) if n else None for n, w in rows])
    target = description.lora_target
    assert target is not None
    layers = lora_layers(backend.lora_targets(), target)
    shapes = [backend.lora_targets()[target][layer][:2] for layer in layers]
    for name, adapter in adapters.items():  # the factors travel through their file, as to Triton
        save_factors(tmp_path / f"{name}.npz", layers, adapter_factors(adapter, target, layers))
    factors = {name: load_factors(tmp_path / f"{name}.npz", layers) for name in adapters}
    feed = {k: torch.from_numpy(v) for k, v in lora_feed(rows, factors, shapes).items()}
    assert feed["lora_down_0"].shape[1] == 4  # bob's rank 2 padded to ann's 4
    got = backend.infer(with_lora.name, {**inputs, **feed})
    for name, value in expected.items():
        scale = float(value.abs().max())
        assert float((got[name] - value).abs().max()) <= 1e-5 * scale, name
    base = backend.infer(role, inputs)
    assert torch.equal(got[description.outputs[0].name][2], base[description.outputs[0].name][2])


def test_a_lora_graph_exports_and_matches_pytorch(tiny: ModelFamily, tmp_path: Path) -> None:
    description = describe_with_lora(describe_roles(tiny)["unet"], tiny)
    result = export_role(description, tmp_path, fp16_graph=False)  # as export_all writes it
    assert result.ok, result.max_abs_diff
    assert result.path.name == "model.onnx" and result.path.parent.name == "unet_lora"
    assert result.fp16_path is None and not (result.path.parent / "model.fp16.onnx").exists()


def test_export_writes_each_lora_graph_with_what_feeds_it(tiny: ModelFamily, tmp_path: Path) -> None:
    import json

    from easyphoto.engines.roles.catalogue import RoleCatalogue
    from easyphoto.export.onnx_export import export_all

    text_encoder = describe_roles(tiny)["text_encoder"]
    results = export_all(RoleCatalogue({"text_encoder": text_encoder}), tmp_path, tiny)
    assert [r.role for r in results] == ["text_encoder", "text_encoder_lora"] and all(r.ok for r in results)
    spec = json.loads((tmp_path / "text_encoder_lora" / "lora.json").read_text())
    targets = TorchBackend(tiny, "cpu").lora_targets()["text_encoder"]
    assert spec["target"] == "text_encoder" and spec["layers"] == sorted(targets)
    assert spec["shapes"] == [list(targets[layer][:2]) for layer in spec["layers"]]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["roles"]["text_encoder"]["onnx_lora"] == "text_encoder_lora/model.onnx"
    # serving reads the fp32 graph with LoRA inputs: no fp16 copy of it, one of the base graph
    assert [r.fp16_path is not None for r in results] == [True, False]
