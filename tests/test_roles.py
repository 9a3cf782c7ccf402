"""Every role's description against its torch module, and the shape arithmetic behind them."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from easyphoto.engines.models.family import ModelFamily
from easyphoto.engines.roles.diffusion import describe_roles, residual_specs
from easyphoto.engines.shapes import AxisRange, Dim
from easyphoto.rpc.errors import EngineInputError

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


def test_fused_stages_equal_the_separate_calls_and_match_the_orchestrator_passes(tiny: ModelFamily) -> None:
    from easyphoto.diffusion.passes import FIRST_PASS, SEAM_PASS, SECOND_PASS, reference_stages
    from easyphoto.engines.backends.torch_backend import TorchBackend
    from easyphoto.engines.interface import ControlInput, Engines
    from easyphoto.engines.roles.diffusion import describe_stage, stage_role_name

    stages = reference_stages()
    passes = tuple(tuple(p.control_weights()) for p in (FIRST_PASS, SECOND_PASS, SEAM_PASS))
    assert passes == stages  # the stages worth fusing are the orchestrator's passes
    separate = Engines(TorchBackend(tiny, "cpu"), tiny.tokenizer, 1.0)
    fused_backend = TorchBackend(tiny, "cpu")
    for kinds in stages:
        fused_backend.add_role(describe_stage(tiny, kinds))
    fused = Engines(fused_backend, tiny.tokenizer, 1.0)
    called: list[str] = []
    infer = fused_backend.infer
    fused_backend.infer = lambda role, inputs, *rest: called.append(role) or infer(role, inputs, *rest)  # type: ignore[method-assign]
    unet = describe_roles(tiny)["unet"]
    sample = unet.sample_inputs("opt", seed=5)
    generator = torch.Generator().manual_seed(6)
    height, width = (8 * side for side in sample["sample"].shape[2:])
    for kinds in stages:
        controls = [
            ControlInput(kind, torch.rand(2, 3, height, width, generator=generator), 0.5 + 0.1 * i)
            for i, kind in enumerate(kinds)
        ]
        args = (sample["sample"], sample["timestep"], sample["encoder_hidden_states"], controls)
        assert stage_role_name(kinds) in fused.roles and stage_role_name(kinds) not in separate.roles
        called.clear()
        assert torch.allclose(fused.predict_noise(*args), separate.predict_noise(*args), atol=1e-5)
        assert called == [stage_role_name(kinds)]  # one call per step
    with pytest.raises(ValueError):
        describe_stage(tiny, ("canny", "depth"))


def test_controlnet_weights_are_per_sample(tiny: ModelFamily) -> None:
    """One ControlNet call serves samples of several requests, each with its own weight."""
    from easyphoto.engines.backends.torch_backend import TorchBackend

    role = describe_roles(tiny)["controlnet_canny"]
    assert role.batched and role.input("conditioning_scale").shape == role.input("timestep").shape
    backend = TorchBackend(tiny, "cpu")
    inputs = {**role.sample_inputs("opt", seed=3), "conditioning_scale": torch.tensor([0.3, 0.9])}
    together = backend.infer(role.name, inputs)
    for row in range(2):
        alone = backend.infer(role.name, {name: value[row : row + 1] for name, value in inputs.items()})
        for name, value in alone.items():
            assert torch.allclose(together[name][row : row + 1], value, atol=1e-5), (row, name)
    same = {
        name: value[:1].expand(2, *value.shape[1:])
        for name, value in inputs.items()
        if name != "conditioning_scale"
    }
    twice = backend.infer(role.name, {**same, "conditioning_scale": torch.tensor([0.3, 0.9])})[
        "mid_block_res"
    ]
    assert torch.allclose(twice[0] / 0.3, twice[1] / 0.9, atol=1e-5)  # each row scaled by its own weight
