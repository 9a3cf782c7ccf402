"""Offline tokenizer, diffusers-folder round trip and single-file ControlNet loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from easyphoto.engines.models.builders import TINY_VERSION, build_tiny_family
from easyphoto.engines.models.family import ModelFamily
from easyphoto.engines.models.loading import FamilySpec, ModelLoadError, load_controlnet, load_family
from easyphoto.engines.models.tokenizer import sd15_tokenizer


def test_sd15_tokenizer_builds_offline_with_clip_ids(tmp_path: Path) -> None:
    tokenizer = sd15_tokenizer(tmp_path)
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tokenizer("easyphoto_face", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_diffusers_folder_round_trip(tmp_path: Path, cache_dir: Path) -> None:
    family = build_tiny_family(seed=7, cache_dir=cache_dir)
    family.save_pretrained(tmp_path / "family")
    loaded = load_family(FamilySpec(base=str(tmp_path / "family")))
    assert loaded.is_random and loaded.name == "tiny"
    assert set(loaded.controlnets) == set(family.controlnets)
    for name, module in family.modules().items():
        _assert_same(module, loaded.modules()[name])
    assert loaded.tokenizer("a cat").input_ids == family.tokenizer("a cat").input_ids
    # A different seed gives different weights, so the comparison above can fail.
    other = build_tiny_family(seed=8, cache_dir=cache_dir)
    assert not torch.equal(other.unet.conv_in.weight, loaded.unet.conv_in.weight)


def test_controlnet_single_file_loads_offline(tmp_path: Path, tiny: ModelFamily) -> None:
    net = tiny.controlnets["canny"]
    config_dir = tmp_path / "cn-config"
    net.save_config(config_dir)
    path = tmp_path / "control_canny.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    loaded = load_controlnet(path, config_dir=config_dir)
    _assert_same(net, loaded)


def test_missing_paths_raise_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        load_family(FamilySpec(base=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a complete"):
        load_family(FamilySpec(base=str(tmp_path / "empty")))
    with pytest.raises(ModelLoadError):
        load_controlnet(tmp_path / "missing.safetensors")


def test_single_file_checkpoint_round_trip(tmp_path: Path, tiny: ModelFamily, cache_dir: Path) -> None:
    from safetensors import safe_open

    from easyphoto.fixtures.checkpoints import save_single_file

    path = tmp_path / "tiny.safetensors"
    save_single_file(tiny, path)
    with safe_open(str(path), "pt") as handle:
        keys = set(handle.keys())
    # The original LDM layout, as real SD 1.5 files have it.
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in keys
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in keys
    tiny_folder = cache_dir / "models" / f"tiny-v{TINY_VERSION}"
    loaded = load_family(FamilySpec(base=str(path)), config_dir=tiny_folder)
    for name in ("unet", "vae", "text_encoder"):
        _assert_same(tiny.modules()[name], loaded.modules()[name])


def test_shipped_sd15_configs_have_sd15_sizes(cache_dir: Path) -> None:
    from diffusers import ControlNetModel, UNet2DConditionModel

    from easyphoto.engines.models.builders import sd15_config
    from easyphoto.engines.models.loading import single_file_config_dir

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(sd15_config("unet"))
        controlnet = ControlNetModel.from_config(sd15_config("controlnet"))
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6) == 860
    assert round(sum(p.numel() for p in controlnet.parameters()) / 1e6) == 361
    folder = single_file_config_dir(cache_dir)
    for part in ("model_index.json", "unet/config.json", "vae/config.json", "tokenizer/vocab.json"):
        assert (folder / part).is_file(), part


def test_processes_building_the_tiny_family_at_once_on_a_cold_cache_all_load_it(tmp_path: Path) -> None:
    """Replicas starting together on one empty cache: each stages its own copy, one wins."""
    import subprocess
    import sys

    script = "import sys; from pathlib import Path; from easyphoto.engines.models.loading import tiny_family;"
    script += " print(tiny_family(Path(sys.argv[1])).name)"
    builders = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(3)]  # fmt: skip
    results = [builder.communicate(timeout=300) for builder in builders]
    assert [builder.returncode for builder in builders] == [0, 0, 0], [err[-2000:] for _, err in results]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        f"tiny-v{TINY_VERSION}"
    ]  # no staging left
