"""Generate options: MISSION.md §2 defaults for unset fields, typed errors naming bad fields."""

from __future__ import annotations

import pytest

from easyphoto.rpc.errors import InvalidArgument
from easyphoto.server.options import FACE_PROMPT, resolve_options
from easyphoto.v1 import generator_pb2


def test_unset_request_takes_every_reference_default() -> None:
    options = resolve_options(generator_pb2.GenerateRequest())
    first, second, seam = options.first_pass, options.second_pass, options.seam_pass
    assert (first.steps, first.strength, first.guidance_scale, first.scheduler) == (
        50,
        0.45,
        7.0,
        "dpmpp_2m_sde_karras",
    )
    assert first.control_weights() == {"canny": 0.5, "openpose": 0.5, "color": 0.85}
    assert (first.canny_low_threshold, first.canny_high_threshold) == (100, 200)
    assert (second.steps, second.strength, second.guidance_scale) == (20, 0.35, 7.0)
    assert second.control_weights() == {"canny": 1.0, "tile": 1.0}
    assert (seam.steps, seam.strength) == (30, 0.30) and seam.control_weights() == {
        "canny": 1.0,
        "color": 1.0,
    }
    assert not options.background_restore.enabled and options.background_restore.strength == 0.35
    assert options.fusion_before and options.fusion_after
    assert options.fusion_before_ratio == options.fusion_after_ratio == 0.5
    assert options.lora_weight == 0.9 and options.color_shift and options.crop_face
    assert options.crop_scale == 3.0 and options.crop_short_side == 512
    assert options.super_resolution_ratio == 0.5 and options.images_per_template == 1
    assert options.seed is None
    assert options.prompt.startswith(FACE_PROMPT)


def test_set_fields_override_including_zero() -> None:
    request = generator_pb2.GenerateRequest(seed=0, lora_weight=0.0, extra_prompt="red hat")
    request.first_pass.openpose_weight = 0.0
    request.second_pass.enabled = False
    request.fusion.before_enabled = False
    options = resolve_options(request)
    assert options.seed == 0 and options.lora_weight == 0.0
    assert options.first_pass.control_weights() == {"canny": 0.5, "color": 0.85}
    assert not options.second_pass.enabled and not options.fusion_before
    assert options.prompt.endswith("red hat")


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: setattr(r.first_pass, "strength", 0.0), "first_pass.strength"),
        (lambda r: setattr(r.second_pass, "steps", 500), "second_pass.steps"),
        (lambda r: setattr(r.seam_pass, "guidance_scale", 0.5), "seam_pass.guidance_scale"),
        (lambda r: setattr(r.first_pass, "canny_weight", 3.0), "first_pass.canny_weight"),
        (lambda r: setattr(r.first_pass, "scheduler", "magic"), "first_pass.scheduler"),
        (lambda r: setattr(r.first_pass, "canny_low_threshold", 250), "first_pass.canny_low_threshold"),
        (lambda r: setattr(r.fusion, "after_ratio", 1.5), "fusion.after_ratio"),
        (lambda r: setattr(r, "lora_weight", -1.0), "lora_weight"),
        (lambda r: setattr(r, "crop_short_side", 500), "crop_short_side"),
        (lambda r: setattr(r, "images_per_template", 9), "images_per_template"),
        (lambda r: setattr(r.first_pass, "strength", float("nan")), "first_pass.strength"),
        (lambda r: setattr(r.seam_pass, "guidance_scale", float("nan")), "seam_pass.guidance_scale"),
        (lambda r: setattr(r.fusion, "after_ratio", float("nan")), "fusion.after_ratio"),
        (lambda r: setattr(r, "lora_weight", float("inf")), "lora_weight"),
        (lambda r: setattr(r, "super_resolution_ratio", float("-inf")), "super_resolution_ratio"),
    ],
)
def test_out_of_range_options_name_their_field(mutate, field: str) -> None:  # type: ignore[no-untyped-def]
    request = generator_pb2.GenerateRequest()
    mutate(request)
    with pytest.raises(InvalidArgument) as info:
        resolve_options(request)
    assert info.value.field == field


def test_a_strength_set_on_the_wire_runs_the_steps_of_its_default() -> None:
    from easyphoto.diffusion.passes import SECOND_PASS
    from easyphoto.diffusion.schedulers import strength_steps

    request = generator_pb2.GenerateRequest()
    request.second_pass.strength = 0.35  # a proto float: 0.3499999940395355 on the way back
    assert request.second_pass.strength != 0.35
    resolved = resolve_options(request).second_pass
    assert resolved.denoising_steps == SECOND_PASS.denoising_steps == 7  # 20 x 0.35, as diffusers has it
    assert strength_steps(50, 0.45) == 22 and strength_steps(20, 0.3499) == 6 and strength_steps(1, 0.5) == 0


@pytest.mark.parametrize("name", ["unet_learning_rate", "alpha", "text_encoder_learning_rate"])
def test_training_options_that_are_not_numbers_name_their_field(name: str) -> None:
    from easyphoto.trainer.options import resolve_training_options
    from easyphoto.v1 import trainer_pb2

    message = trainer_pb2.TrainingOptions()
    setattr(message, name, float("nan"))
    with pytest.raises(InvalidArgument) as info:
        resolve_training_options(message)
    assert info.value.field == f"options.{name}" and "nan" in info.value.message
