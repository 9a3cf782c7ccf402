"""The engine manifest is the contract between export and serving: read back, it describes every
role exactly as the family in memory does, names the family's facts and tokenizer, and resolves and
checks LoRA files, all without the model's weights."""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from easyphoto.diffusion.catalogue import role_catalogue
from easyphoto.engines.lora import LoraLayer, LoraWeights, check_fits, load_lora, save_lora
from easyphoto.engines.models.family import ModelFamily
from easyphoto.engines.roles.manifest import EngineManifest, FamilyFacts
from easyphoto.engines.shapes import Dim
from easyphoto.rpc.errors import EngineUnavailable, InvalidArgument


@pytest.fixture(scope="module")
def written(tiny: ModelFamily, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("manifest")
    EngineManifest.of_family(tiny, role_catalogue(tiny)).write(folder, tiny.tokenizer)
    return folder


def test_dim_names_read_back() -> None:
    for dim in (Dim("h"), Dim("h") * 8, Dim("h") / 2, Dim("h") * Fraction(3, 4)):
        assert Dim.parse(dim.name) == dim
    with pytest.raises(ValueError):
        Dim.parse("h+1")


def test_the_manifest_describes_every_role_as_the_family_does(tiny: ModelFamily, written: Path) -> None:
    ours = role_catalogue(tiny)
    read = EngineManifest.read(written)
    assert read.family == FamilyFacts.of(tiny)
    for group in ("family", "stages", "faces"):
        assert sorted(getattr(read.catalogue, group)) == sorted(getattr(ours, group))
    assert read.catalogue.stages  # the fused steps of the reference passes are described too
    for name, role in ours.roles.items():
        theirs = read.catalogue.roles[name]
        assert replace(theirs, build_module=role.build_module) == role, name  # all but the weights
        for point in ("min", "opt"):
            expected, got = role.sample_inputs(point, seed=4), theirs.sample_inputs(point, seed=4)
            assert all(torch.equal(expected[k], got[k]) for k in expected), (name, point)
        with pytest.raises(EngineUnavailable, match="no weights in this process"):
            theirs.build_module()
    prompt = ["easyphoto_face, easyphoto, 1person"]
    assert read.tokenizer()(prompt).input_ids == tiny.tokenizer(prompt).input_ids


def test_lora_files_resolve_and_are_checked_against_the_manifest(
    tiny: ModelFamily, written: Path, tmp_path: Path
) -> None:
    targets = EngineManifest.read(written).lora_targets
    ours = EngineManifest.of_family(tiny, role_catalogue(tiny)).lora_targets
    assert targets == ours and len(targets["unet"]) > 0 and len(targets["text_encoder"]) > 0
    module, shape = next(iter(targets["unet"].items()))
    down, up = torch.randn(2, *shape[1:]), torch.randn(shape[0], 2, *shape[2:])
    fits = LoraWeights("fits", [LoraLayer("unet", module, down, up, 2.0)])
    save_lora(fits, tmp_path / "kohya.safetensors", kohya=True)
    loaded = load_lora(tmp_path / "kohya.safetensors", targets)  # kohya names, resolved without weights
    assert [(x.target, x.module) for x in loaded.layers] == [("unet", module)]
    wide = LoraWeights("wide", [LoraLayer("unet", module, torch.randn(2, shape[1] + 1), up[..., 0, 0], 2.0)])
    save_lora(wide, tmp_path / "wide.safetensors")
    with pytest.raises(InvalidArgument, match="the model's weight is"):
        load_lora(tmp_path / "wide.safetensors", targets)
    untargeted = LoraWeights("conv", [LoraLayer("unet", "conv_in", down, up, 2.0)])
    with pytest.raises(InvalidArgument, match="not a LoRA-targeted layer"):
        check_fits(untargeted, targets)
