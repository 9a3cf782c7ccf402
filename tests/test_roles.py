"""Every role's description against its torch module, and the shape arithmetic behind them."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from easyphoto.engines.errors import EngineInputError
from easyphoto.engines.family import ModelFamily
from easyphoto.engines.roles import describe_roles, residual_specs
from easyphoto.engines.shapes import AxisRange, Dim

EXPECTED_ROLES = {
    "text_encoder",
    "vae_encoder",
    "vae_decoder",
    "unet",
    "controlnet_canny",
    "controlnet_openpose",
    "controlnet_color",
    "controlnet_tile",
}


def test_tiny_family_has_every_role(tiny: ModelFamily) -> None:
    assert set(describe_roles(tiny)) == EXPECTED_ROLES


@pytest.mark.parametrize("point", ["min", "opt"])
@pytest.mark.parametrize("role", sorted(EXPECTED_ROLES))
def test_sample_input_gives_declared_output_shapes(tiny: ModelFamily, role: str, point: str) -> None:
    description = describe_roles(tiny)[role]
    inputs = description.sample_inputs(point)  # type: ignore[arg-type]
    with torch.inference_mode():
        outputs = description.build_module()(*[inputs[s.name] for s in description.inputs])
    shapes = description.shapes(point)  # type: ignore[arg-type]
    assert len(outputs) == len(description.outputs)
    for spec, tensor in zip(description.outputs, outputs, strict=True):
        assert tuple(tensor.shape) == shapes[spec.name], spec.name
        assert torch.isfinite(tensor).all(), spec.name


def test_residuals_follow_sd15_layout(tiny: ModelFamily) -> None:
    specs = residual_specs(tiny)
    assert len(specs) == 13  # 12 down residuals + mid, as in SD 1.5
    values = {"batch": 2, "latent_height": 16, "latent_width": 8}
    channels = [s.resolve(values)[1] for s in specs]
    sizes = [s.resolve(values)[2:] for s in specs]
    assert channels == [32, 32, 32, 32, 32, 32, 32, 64, 64, 64, 64, 64, 64]
    assert sizes[0] == (16, 8) and sizes[3] == (8, 4) and sizes[-1] == (2, 1)


def test_dim_names_and_resolution() -> None:
    dim = Dim("latent_height", Fraction(1, 4))
    assert dim.name == "latent_height/4"
    assert (Dim("latent_height") * 8).name == "8*latent_height"
    assert dim.resolve({"latent_height": 16}) == 4
    with pytest.raises(ValueError):
        dim.resolve({"latent_height": 10})


def test_axis_range_rejects_bad_profiles() -> None:
    with pytest.raises(ValueError):
        AxisRange(4, 2, 8)
    with pytest.raises(ValueError):
        AxisRange(8, 12, 16, multiple=8)
    assert AxisRange(8, 16, 32, multiple=8).admits(24)
    assert not AxisRange(8, 16, 32, multiple=8).admits(20)


def test_bind_rejects_inconsistent_or_out_of_profile_inputs(tiny: ModelFamily) -> None:
    unet = describe_roles(tiny)["unet"]
    shapes = {name: tuple(t.shape) for name, t in unet.sample_inputs("opt").items()}
    assert unet.bind(shapes) == unet.axis_values("opt")
    wrong_batch = {**shapes, "timestep": (3,)}
    with pytest.raises(EngineInputError, match="batch"):
        unet.bind(wrong_batch)
    too_big = unet.shapes("max", {"latent_height": unet.axes["latent_height"].max * 2})
    with pytest.raises(EngineInputError, match="outside the profile"):
        unet.bind({s.name: too_big[s.name] for s in unet.inputs})
    missing = dict(shapes)
    missing.pop("mid_block_res")
    with pytest.raises(EngineInputError, match="missing"):
        unet.bind(missing)


def test_manifest_is_json_ready(tiny: ModelFamily) -> None:
    import json

    manifest = describe_roles(tiny)["controlnet_canny"].manifest()
    text = json.dumps(manifest)
    assert '"conditioning_scale"' in text
    assert manifest["inputs"][0]["shape"] == ["batch", 4, "latent_height", "latent_width"]  # type: ignore[index]
