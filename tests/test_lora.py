"""LoRA files (peft/diffusers and kohya keys) patched into the tiny models, against diffusers."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from easyphoto.engines.adapters import Adapter, SampleAdapter
from easyphoto.engines.interface import Engines
from easyphoto.engines.lora import LoraLayer, LoraWeights, load_lora, save_lora, submodule
from easyphoto.engines.models.family import ModelFamily
from easyphoto.rpc.errors import InvalidArgument

UNET_TARGETS = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v",
    "mid_block.attentions.0.proj_in",
    "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2",
]
TEXT_TARGETS = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1"]


def _random_lora(tiny: ModelFamily, rank: int = 4, alpha: float = 2.0) -> LoraWeights:
    generator = torch.Generator().manual_seed(0)
    layers = []
    for target, module_names in (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS)):
        root = tiny.unet if target == "unet" else tiny.text_encoder
        for name in module_names:
            weight = submodule(root, name).weight
            down = torch.randn(rank, *weight.shape[1:], generator=generator) * 0.5
            up = torch.randn(weight.shape[0], rank, *[1] * (weight.dim() - 2), generator=generator) * 0.5
            layers.append(LoraLayer(target, name, down, up, alpha))
    return LoraWeights("random", layers)


def _unet_out(engines: Engines, adapter: SampleAdapter | None = None) -> torch.Tensor:
    """The UNet on a fixed sample (batch 2), every row with ``adapter``."""
    unet = engines.roles["unet"]
    sample = unet.sample_inputs("opt", seed=3)
    rows = [adapter] * len(sample["sample"]) if adapter else None
    return engines.backend.infer("unet", sample, rows)["noise_pred"].clone()


def _adapter(engines: Engines, name: str, lora: LoraWeights) -> Adapter:
    return engines.backend.adapter(name, lambda: lora)


def test_an_adapter_changes_its_rows_and_never_the_weights(
    tiny: ModelFamily, engines: Engines, tmp_path: Path
) -> None:
    lora = _random_lora(tiny)
    save_lora(lora, tmp_path / "lora.safetensors")
    loaded = load_lora(tmp_path / "lora.safetensors")
    assert {(layer.target, layer.module) for layer in loaded.layers} == {
        (x.target, x.module) for x in lora.layers
    }
    adapter = _adapter(engines, "ann@v1", loaded)
    base_state = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    base = _unet_out(engines)
    base_text = engines.encode_prompts(["easyphoto_face"]).clone()
    patched = _unet_out(engines, SampleAdapter(adapter, 0.9))
    assert (patched - base).abs().max() > 1e-3
    text = engines.encode_prompts(["easyphoto_face"], SampleAdapter(adapter, 0.9))
    assert (text - base_text).abs().max() > 1e-4  # cache keyed by adapter and weight
    assert torch.equal(_unet_out(engines, SampleAdapter(adapter, 0.0)), base)
    assert all(torch.equal(v, base_state[k]) for k, v in tiny.unet.state_dict().items())
    assert torch.equal(engines.encode_prompts(["easyphoto_face"]), base_text)


def test_an_adapter_equals_diffusers_fused_lora(tiny: ModelFamily, engines: Engines, tmp_path: Path) -> None:
    from easyphoto.server.bench import baseline_pipeline

    lora = _random_lora(tiny, rank=4, alpha=8.0)
    path = tmp_path / "peft.safetensors"
    save_lora(lora, path, alpha_tensors=False)  # the plain layout: alpha / rank folded into up
    read_back = {(x.target, x.module): x.delta() for x in load_lora(path).layers}
    assert all(torch.allclose(read_back[(x.target, x.module)], x.delta()) for x in lora.layers)
    adapter = _adapter(engines, "peft@v1", lora)
    ours = _unet_out(engines, SampleAdapter(adapter, 0.7))
    base = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    # diffusers fuses the file's text-encoder layers too: both go back, the family is the session's.
    base_text = {k: v.clone() for k, v in tiny.text_encoder.state_dict().items()}
    pipe = baseline_pipeline(tiny, ["canny"])
    try:
        pipe.load_lora_weights(str(path), adapter_name="user")
        pipe.fuse_lora(lora_scale=0.7, adapter_names=["user"])
        pipe.unload_lora_weights()
        touched = {k for k, v in tiny.unet.state_dict().items() if not torch.equal(v, base[k])}
        assert touched == {f"{name}.weight" for name in UNET_TARGETS}  # diffusers read every layer
        theirs = _unet_out(engines)  # the fused weights, no adapter
    finally:
        tiny.unet.load_state_dict(base)
        tiny.text_encoder.load_state_dict(base_text)
    scale = float(theirs.abs().max())
    assert float((ours - theirs).abs().max()) <= 1e-4 * scale


def test_the_bench_baseline_paints_with_the_users_lora_while_it_is_loaded(
    tiny: ModelFamily, engines: Engines
) -> None:
    from easyphoto.server.bench import baseline_pipeline, lora_loaded

    lora = _random_lora(tiny, rank=4, alpha=8.0)
    ours = _unet_out(engines, SampleAdapter(_adapter(engines, "bench@v1", lora), 1.0))
    base = _unet_out(engines)
    with lora_loaded(baseline_pipeline(tiny, ["canny"]), lora):
        theirs = _unet_out(engines)  # the UNet the pipeline shares, through diffusers' peft layers
    assert float((ours - base).abs().max()) > 1e-3
    assert float((ours - theirs).abs().max()) <= 1e-4 * float(theirs.abs().max())
    assert torch.equal(_unet_out(engines), base)  # unloaded after: the base model again


def test_a_bench_baseline_lora_that_fails_to_load_leaves_no_layers_behind(
    tiny: ModelFamily, engines: Engines
) -> None:
    """diffusers injects peft layers into the shared UNet before it reads their weights: a LoRA
    that does not fit fails there and, unless unloaded, leaves those layers in every later call."""
    from easyphoto.server.bench import baseline_pipeline, lora_loaded

    lora = _random_lora(tiny)
    first = lora.layers[0]  # a UNet layer that does not fit the model
    lora.layers[0] = replace(first, down=torch.zeros(first.rank, first.down.shape[1] + 1))
    base = _unet_out(engines)
    with (
        pytest.raises(RuntimeError, match="size mismatch"),
        lora_loaded(baseline_pipeline(tiny, ["canny"]), lora),
    ):
        pass
    assert not [name for name, _ in tiny.unet.named_modules() if "lora_" in name]
    assert torch.equal(_unet_out(engines), base)


def test_kohya_keys_round_trip(tiny: ModelFamily, engines: Engines, tmp_path: Path) -> None:
    lora = _random_lora(tiny)
    save_lora(lora, tmp_path / "kohya.safetensors", kohya=True)
    loaded = load_lora(tmp_path / "kohya.safetensors", engines.backend.lora_targets())
    by_name = {(x.target, x.module): x for x in loaded.layers}
    for layer in lora.layers:
        other = by_name[(layer.target, layer.module)]
        assert torch.equal(other.delta(), layer.delta())
    with pytest.raises(InvalidArgument):
        load_lora(tmp_path / "kohya.safetensors")  # kohya names need the model


def test_older_diffusers_keys_read_as_peft_keys(tiny: ModelFamily, engines: Engines, tmp_path: Path) -> None:
    """``lora.down.weight`` / ``lora.up.weight``: diffusers' files before it moved to peft."""
    lora = _random_lora(tiny)
    save_lora(lora, tmp_path / "peft.safetensors")
    tensors = load_file(tmp_path / "peft.safetensors")
    older = {
        key.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight"): value
        for key, value in tensors.items()
    }
    save_file(older, tmp_path / "older.safetensors")
    loaded = load_lora(tmp_path / "older.safetensors", engines.backend.lora_targets())
    by_name = {(x.target, x.module): x for x in loaded.layers}
    assert len(by_name) == len(lora.layers)
    for layer in lora.layers:
        assert torch.equal(by_name[(layer.target, layer.module)].delta(), layer.delta())
    del older[next(key for key in older if key.endswith(".lora.up.weight"))]
    save_file(older, tmp_path / "half.safetensors")
    with pytest.raises(InvalidArgument, match=r"has no .*lora\.up\.weight' beside it"):
        load_lora(tmp_path / "half.safetensors")


def test_mismatched_lora_is_refused_and_not_cached(tiny: ModelFamily, engines: Engines) -> None:
    bad = LoraWeights("bad", [LoraLayer("unet", UNET_TARGETS[0], torch.ones(2, 7), torch.ones(9, 2), 2.0)])
    with pytest.raises(InvalidArgument, match="the model's weight is"):
        _adapter(engines, "bad@v1", bad)
    assert "bad@v1" not in engines.backend.adapters  # type: ignore[attr-defined]


def test_loading_a_lora_again_and_again_keeps_no_memory(tmp_path: Path) -> None:
    """A serving process loads a LoRA per user version for as long as it runs: safetensors'
    ``get_tensor`` kept ~58 bytes per tensor of every load (34 kB per load of this file)."""
    import gc
    import tracemalloc

    layers = [
        LoraLayer("unet", f"block.{i}.to_q", torch.ones(4, 8), torch.ones(8, 4), 4.0) for i in range(200)
    ]
    path = tmp_path / "many.safetensors"
    save_lora(LoraWeights("many", layers), path)
    load_lora(path)
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(50):
            assert len(load_lora(path).layers) == 200
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 100_000, f"{grown} bytes kept by 50 loads"
