"""Our engines against diffusers' StableDiffusionControlNetInpaintPipeline on the same tiny weights."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionControlNetInpaintPipeline

from easyphoto.diffusion.inpaint import InpaintPass, run_inpaint
from easyphoto.engines.interface import ControlInput, Engines
from easyphoto.engines.models.family import ModelFamily
from easyphoto.server.bench import baseline_inpaint, baseline_pipeline

SIZE = 128
PROMPT = "easyphoto_face, easyphoto, 1person"
NEGATIVE = "blurry, lowres"
SCALES = {"canny": 0.5, "openpose": 0.5, "color": 0.85}


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., 32:96, 40:100] = 1
    tensors = {"image": torch.rand(1, 3, SIZE, SIZE, generator=generator), "mask": mask}
    tensors.update({kind: torch.rand(1, 3, SIZE, SIZE, generator=generator) for kind in SCALES})
    return tensors


def _pipeline(tiny: ModelFamily) -> StableDiffusionControlNetInpaintPipeline:
    return baseline_pipeline(tiny, list(SCALES))


def _run_diffusers(
    pipe: StableDiffusionControlNetInpaintPipeline,
    inputs: dict[str, torch.Tensor],
    steps: int,
    **options: float,
):
    controls = [ControlInput(k, inputs[k], s) for k, s in SCALES.items()]
    return baseline_inpaint(
        pipe, PROMPT, NEGATIVE, inputs["image"], inputs["mask"], controls, steps=steps, seed=42, **options
    )


def _inpaint_pass(engines: Engines, inputs: dict[str, torch.Tensor], **options: object) -> InpaintPass:
    embeds = engines.encode_prompts([PROMPT, NEGATIVE])
    inpaint = InpaintPass(
        image=inputs["image"] * 2 - 1,
        mask=inputs["mask"],
        prompt_embeds=embeds[:1],
        negative_prompt_embeds=embeds[1:],
        generator=torch.Generator().manual_seed(42),
    )
    for name, value in options.items():
        setattr(inpaint, name, value)
    return inpaint


def test_one_unet_controlnet_step_equals_diffusers(
    tiny: ModelFamily, engines: Engines, inputs: dict[str, torch.Tensor]
) -> None:
    pipe = _pipeline(tiny)
    captured: list[tuple[tuple, dict, torch.Tensor]] = []

    def hook(module, args, kwargs, output):  # type: ignore[no-untyped-def]
        captured.append((args, kwargs, output[0].clone()))

    handle = tiny.unet.register_forward_hook(hook, with_kwargs=True)
    try:
        _run_diffusers(pipe, inputs, steps=10)
    finally:
        handle.remove()
    assert captured, "the pipeline never called the UNet"
    args, kwargs, expected = captured[1]
    sample, timestep = args[0], args[1]
    controls = [ControlInput(k, torch.cat([inputs[k]] * 2), s) for k, s in SCALES.items()]
    ours = engines.predict_noise(sample, torch.as_tensor(timestep), kwargs["encoder_hidden_states"], controls)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() <= 1e-5


def test_whole_pass_equals_diffusers_with_same_seed(
    tiny: ModelFamily, engines: Engines, inputs: dict[str, torch.Tensor]
) -> None:
    expected = _run_diffusers(_pipeline(tiny), inputs, steps=20)
    request = _inpaint_pass(
        engines,
        inputs,
        controls=[ControlInput(k, inputs[k], s) for k, s in SCALES.items()],
        steps=20,
        strength=0.45,
        guidance_scale=7.0,
    )
    ours = (run_inpaint(engines, request, tiny.scheduler_config) / 2 + 0.5).clamp(0, 1)
    assert (ours - expected).abs().max().item() <= 1e-5
    # The controls matter: dropping the colour net changes the result, so the check can fail.
    request.controls = list(request.controls)[:2]
    request.generator = torch.Generator().manual_seed(42)
    other = (run_inpaint(engines, request, tiny.scheduler_config) / 2 + 0.5).clamp(0, 1)
    assert (other - expected).abs().max().item() > 1e-3


def test_an_lcm_pass_equals_diffusers_with_its_scheduler(
    tiny: ModelFamily, engines: Engines, inputs: dict[str, torch.Tensor]
) -> None:
    """The LCM fast path's first pass (12 steps, strength 0.5, CFG 2): LCM's own timesteps, and a
    fresh noise draw after every step from the pass's generator, in diffusers' order."""
    lcm = {"steps": 12, "strength": 0.5, "guidance_scale": 2.0}
    pipe = baseline_pipeline(tiny, list(SCALES), scheduler="lcm")
    expected = _run_diffusers(pipe, inputs, steps=12, strength=0.5, guidance_scale=2.0)
    controls = [ControlInput(k, inputs[k], s) for k, s in SCALES.items()]
    request = _inpaint_pass(engines, inputs, controls=controls, scheduler="lcm", **lcm)
    ours = (run_inpaint(engines, request, tiny.scheduler_config) / 2 + 0.5).clamp(0, 1)
    assert (ours - expected).abs().max().item() <= 1e-5
    # Another scheduler on the same settings differs, so the check can fail.
    request = _inpaint_pass(engines, inputs, controls=controls, scheduler="euler_a", **lcm)
    other = (run_inpaint(engines, request, tiny.scheduler_config) / 2 + 0.5).clamp(0, 1)
    assert (other - expected).abs().max().item() > 1e-3


def _cancel_after(count: int, steps: list[int]) -> None:
    from easyphoto.rpc.errors import Cancelled

    if len(steps) >= count:
        raise Cancelled(f"cancelled after {count} steps")


def test_pass_stops_when_asked(engines: Engines, inputs: dict[str, torch.Tensor], tiny: ModelFamily) -> None:
    from easyphoto.rpc.errors import Cancelled

    calls = []
    request = _inpaint_pass(
        engines,
        inputs,
        steps=20,
        on_step=lambda event: calls.append(event.step),
        raise_if_stopped=lambda: _cancel_after(3, calls),
    )
    with pytest.raises(Cancelled):
        run_inpaint(engines, request, tiny.scheduler_config)
    assert calls == [1, 2, 3]
