"""The step engine: passes from several threads share batched model calls, each pass ends as it would
alone, and a pass that stops or fails takes no other pass with it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from recording_engines import random_user_lora, run_together

from easyphoto.diffusion.inpaint import InpaintPass, run_inpaint
from easyphoto.diffusion.steps import StepEngine
from easyphoto.engines.adapters import SampleAdapter
from easyphoto.engines.backends.torch_backend import TorchBackend
from easyphoto.engines.interface import ControlInput, Engines
from easyphoto.engines.models.family import ModelFamily
from easyphoto.engines.models.loading import tiny_family
from easyphoto.rpc.deadline import request_deadline
from easyphoto.rpc.errors import Cancelled, DeadlineExceeded, EngineUnavailable


@pytest.fixture(scope="module")
def engines(tiny: ModelFamily) -> Engines:
    return Engines(TorchBackend(tiny, "cpu"), tiny.tokenizer, float(tiny.vae.config.scaling_factor))


def _adapter(engines: Engines, name: str, seed: int) -> SampleAdapter:
    lora = random_user_lora(engines.backend.lora_targets(), name, seed)
    return SampleAdapter(engines.backend.adapter(name, lambda: lora), 0.8)


def _pass(engines: Engines, seed: int, size: int = 64, **options: object) -> Callable[[], InpaintPass]:
    """A pass with its own image, mask, controls and seed (fresh each call: a generator is state)."""

    def make() -> InpaintPass:
        generator = torch.Generator().manual_seed(seed)
        image = torch.rand(1, 3, size, size, generator=generator) * 2 - 1
        mask = torch.zeros(1, 1, size, size)
        mask[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
        embeds = engines.encode_prompts(["easyphoto_face", ""])
        controls = [
            ControlInput("canny", torch.rand(1, 3, size, size, generator=generator), 0.5 + seed / 10),
            ControlInput("color", torch.rand(1, 3, size, size, generator=generator), 0.85),
        ]
        values: dict[str, object] = {"steps": 10, "strength": 0.5, "guidance_scale": 7.0, **options}
        return InpaintPass(
            image=image, mask=mask, prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:],
            controls=controls, generator=torch.Generator().manual_seed(100 + seed), **values,  # type: ignore[arg-type]
        )  # fmt: skip

    return make


Call = tuple[str, int, int]  # what the step engine ran: kind, jobs, rows


def _together(
    engines: Engines, scheduler_config: dict[str, Any], makers: list[Callable[[], InpaintPass]]
) -> tuple[list[torch.Tensor | BaseException], list[Call]]:
    """The passes run at once through a step engine of their own, and the calls it made."""
    calls: list[Call] = []
    engine = StepEngine(engines, scheduler_config, on_call=lambda *call: calls.append(call))
    try:
        return run_together(engine, makers), calls
    finally:
        engine.close()


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) / 2).pow(2).mean())  # images in [-1, 1]: a range of 2
    return float("inf") if mse == 0 else -10 * torch.log10(torch.tensor(mse)).item()


def test_concurrent_passes_of_different_users_share_calls_and_end_as_alone(
    engines: Engines, tiny: ModelFamily
) -> None:
    users = [_adapter(engines, f"user{i}@v1", i) for i in range(3)]
    makers = [_pass(engines, seed, adapter=users[seed % 3]) for seed in range(4)]
    makers.append(_pass(engines, 4))  # and a pass with the base model
    together, calls = _together(engines, tiny.scheduler_config, makers)
    alone = [run_inpaint(engines, make(), tiny.scheduler_config) for make in makers]
    for index, (got, expected) in enumerate(zip(together, alone, strict=True)):
        assert isinstance(got, torch.Tensor), got
        # The issue asks 35 dB of the sequential twin. fp32 rounding, no drift: measured 53 dB and up
        # alone, and 42 dB once within the whole suite (the batch's rows are whoever joined a step).
        assert _psnr(got, expected) > 38, (index, _psnr(got, expected))
    steps = [call for call in calls if call[0] == "denoise"]
    assert max(jobs for _, jobs, _ in steps) == 5 and max(rows for *_, rows in steps) == 10
    assert len(steps) < 5 * 5  # 5 passes of 5 steps in fewer calls than one each
    assert any(call[0] == "encode" and call[1] > 1 for call in calls)  # the VAE batches too


def test_half_precision_batches_of_users_paint_what_fp32_paints(
    engines: Engines, tiny: ModelFamily, cache_dir: Path
) -> None:
    """The CUDA default, fp16 weights, factors and latents, run on this CPU: a batch of two users'
    passes and a base one ends as the fp32 passes do, so the half path holds no dtype mismatch
    before a GPU ever runs it."""
    family = tiny_family(cache_dir)  # modules of its own: the backend casts them in place
    half = Engines(TorchBackend(family, "cpu", torch.float16), family.tokenizer, engines.vae_scaling_factor)
    users = [_adapter(half, f"half{i}@v1", i) for i in range(2)]
    assert {layer.up.dtype for user in users for layer in user.adapter.layers.values()} == {torch.float16}
    makers = [_pass(half, seed, adapter=users[seed]) for seed in range(2)] + [_pass(half, 2)]
    together, calls = _together(half, family.scheduler_config, makers)
    assert any(call[0] == "denoise" and call[1] > 1 for call in calls)
    full_users = [_adapter(engines, f"half{i}@v1", i) for i in range(2)]
    full_makers = [_pass(engines, seed, adapter=full_users[seed]) for seed in range(2)] + [_pass(engines, 2)]
    for index, (got, make) in enumerate(zip(together, full_makers, strict=True)):
        assert isinstance(got, torch.Tensor), got
        expected = run_inpaint(engines, make(), tiny.scheduler_config)
        # Measured 32-35 dB (fp16 rounding over 5 steps of random weights); the same passes in fp32
        # without their users' adapters are 22 dB away.
        assert _psnr(got.float(), expected) > 28, (index, _psnr(got.float(), expected))


def test_passes_that_cannot_share_a_call_still_all_run(engines: Engines, tiny: ModelFamily) -> None:
    makers = [_pass(engines, 0, size=64), _pass(engines, 1, size=128), _pass(engines, 2, steps=6)]
    results, calls = _together(engines, tiny.scheduler_config, makers)
    assert all(isinstance(result, torch.Tensor) for result in results), results
    assert results[1].shape[-1] == 128  # type: ignore[union-attr]
    assert all(jobs <= 2 for _, jobs, _ in calls)  # the 128 px pass never joins the 64 px ones


def test_a_stopped_or_late_pass_fails_alone(engines: Engines, tiny: ModelFamily) -> None:
    steps: list[int] = []

    def cancel_after_two() -> None:
        if len(steps) >= 2:
            raise Cancelled("the client went away")

    stopped = _pass(
        engines, 0, on_step=lambda event: steps.append(event.step), raise_if_stopped=cancel_after_two
    )
    engine = StepEngine(engines, tiny.scheduler_config)
    try:
        results = run_together(engine, [stopped, _pass(engines, 1)])
        with request_deadline(0.0), pytest.raises(DeadlineExceeded):
            engine.run(_pass(engines, 2)())  # its deadline, seen by the loop thread
        assert isinstance(engine.run(_pass(engines, 3)()), torch.Tensor)  # the loop goes on
    finally:
        engine.close()
    assert isinstance(results[0], Cancelled) and steps == [1, 2]
    assert isinstance(results[1], torch.Tensor)


def test_a_pass_whose_batched_call_fails_fails_alone(engines: Engines, tiny: ModelFamily) -> None:
    def misshapen() -> InpaintPass:
        inpaint = _pass(engines, 0)()
        small = torch.rand(1, 3, 32, 32)  # a control image of the wrong size for its latents
        inpaint.controls = [ControlInput("canny", small, 0.5), inpaint.controls[1]]
        return inpaint

    makers = [misshapen, _pass(engines, 1), _pass(engines, 2)]
    results, calls = _together(engines, tiny.scheduler_config, makers)
    assert isinstance(results[0], Exception) and not isinstance(results[0], torch.Tensor)
    assert isinstance(results[1], torch.Tensor) and isinstance(results[2], torch.Tensor)
    assert any(call[0] == "denoise" and call[1] == 2 for call in calls)  # the others still share


def test_prompts_of_concurrent_requests_are_embedded_in_one_call(engines: Engines, tiny: ModelFamily) -> None:
    users = [_adapter(engines, f"text{i}@v1", 10 + i) for i in range(3)]
    ids = engines.tokenize(["easyphoto_face, easyphoto, 1person", "a negative prompt"])
    calls: list[tuple[str, int, int]] = []
    engine = StepEngine(engines, tiny.scheduler_config, on_call=lambda *call: calls.append(call))
    results: list[torch.Tensor] = [torch.empty(0)] * 3
    start = threading.Barrier(3)

    def embed(index: int) -> None:
        start.wait()
        results[index] = engine.encode_text(ids, [users[index]] * 2)

    threads = [threading.Thread(target=embed, args=(index,)) for index in range(3)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        engine.close()
    assert [call[:2] for call in calls] == [("text", 3)]  # three requests' prompts, one call
    for user, got in zip(users, results, strict=True):
        alone = engines.backend.infer("text_encoder", {"input_ids": ids}, [user] * 2)["last_hidden_state"]
        assert torch.allclose(got, alone, atol=1e-5)


def test_a_closed_engine_refuses_passes_as_unavailable(engines: Engines, tiny: ModelFamily) -> None:
    engine = StepEngine(engines, tiny.scheduler_config)
    assert engine.alive
    assert engine.close(timeout=30)
    assert not engine.alive
    with pytest.raises(EngineUnavailable, match="stopping"):
        engine.run(_pass(engines, 0)())
