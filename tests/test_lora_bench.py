"""``easyphoto bench --only lora`` on the tiny family: the adapters it times are active, the
merge it times is undone, and its section holds what it measured."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from easyphoto.engines.lora import lora_targets
from easyphoto.engines.models.loading import resolve_family
from easyphoto.server.lora_bench import LoraTimes, StepTimes, _check_adapters_apply, _section, time_lora


def test_the_bench_times_each_batch_with_adapters_that_change_the_step() -> None:
    family = resolve_family("tiny")
    before = {name: p.detach().clone() for name, p in family.unet.named_parameters()}
    times = time_lora(family, (2, 4), 1)
    assert [step.batch for step in times.steps] == [2, 4]
    assert all(s.base > 0 and s.one_user > 0 and s.mixed > 0 for s in times.steps)
    assert times.layers == len(lora_targets(family.lora_roots())["unet"])
    assert times.parameters > 0 and times.switch > 0 and times.cold_load > 0
    after = dict(family.unet.named_parameters())
    for name, value in before.items():  # merged in and taken out again: the weights as they were
        torch.testing.assert_close(after[name], value, rtol=0, atol=1e-5)


def test_hooks_that_change_nothing_are_refused_rather_than_timed() -> None:
    out = torch.ones(2, 4)
    with pytest.raises(RuntimeError, match="hooks are not active"):
        _check_adapters_apply(out, out.clone())
    _check_adapters_apply(out, out + 1e-3)


def test_the_section_reports_each_batch_against_the_base_weights() -> None:
    step = StepTimes(2, 0.100, 0.120, 0.125)
    times = LoraTimes([step], switch=0.5, cold_load=0.01, layers=3, parameters=2_000_000, device="cpu")
    text = _section("tiny", times, repeats=3, dtype=torch.float32)
    assert text.startswith("<!-- bench:lora:tiny:cpu:begin -->") and text.endswith(
        "<!-- bench:lora:tiny:cpu:end -->"
    )
    assert "| 2 | 100.0 | 120.0 | 125.0 | +20% | +25% |" in text
    assert "500.0 ms" in text and "10.0 ms" in text and "all 3 LoRA-targeted" in text
    assert "fp32, median of 3" in text
    on_gpu = _section("tiny", replace(times, device="cuda"), repeats=3, dtype=torch.float16)
    assert on_gpu.startswith("<!-- bench:lora:tiny:cuda:begin -->") and "fp16, median of 3" in on_gpu
