"""Offline tokenizer, diffusers-folder round trip and single-file ControlNet loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from easyphoto.engines.builders import build_tiny_family
from easyphoto.engines.family import ModelFamily
from easyphoto.engines.loading import FamilySpec, ModelLoadError, load_controlnet, load_family
from easyphoto.engines.tokenizer import sd15_tokenizer


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
