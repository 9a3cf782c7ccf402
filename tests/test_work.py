"""The arithmetic of a face (``easyphoto work``): FLOPs counted on the meta device are those of the
real modules, and the command's table adds up. That a template's planned rows are the rows a
Generate runs is checked where Generates are recorded (``tests/test_pipeline.py``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from easyphoto.cli.main import main
from easyphoto.cli.work import face_work
from easyphoto.engines.models.builders import build_tiny_family
from easyphoto.engines.models.work import TEXT_TOKENS, RowFlops, counted_flops, row_flops


def test_meta_modules_count_what_the_real_modules_compute(cache_dir: Path) -> None:
    # Built here, not the suite's shared family (its modules carry the backend's adapter hooks),
    # with attention as plain matrix products: FlopCounterMode does not count torch's fused CPU
    # attention kernel (on the meta device attention decomposes into counted products).
    family = build_tiny_family(cache_dir=cache_dir)
    unet, controlnet, vae = family.unet, family.controlnets["canny"], family.vae
    for module in (unet, controlnet, vae):
        module.set_attn_processor(AttnProcessor())
    side = 64
    image = torch.rand(1, 3, side, side)
    latents = torch.randn(1, 4, side // 8, side // 8)
    text = torch.randn(1, TEXT_TOKENS, int(unet.config.cross_attention_dim))
    timestep = torch.full((1,), 500.0)
    with torch.no_grad():
        real = RowFlops(
            side,
            unet=counted_flops(lambda: unet(latents, timestep, text)),
            controlnet=counted_flops(lambda: controlnet(latents, timestep, text, controlnet_cond=image)),
            vae_encode=counted_flops(lambda: vae.encode(image)),
            vae_decode=counted_flops(lambda: vae.decode(latents)),
        )
    assert row_flops("tiny", side) == real
    assert min(real.unet, real.controlnet, real.vae_encode, real.vae_decode) > 0
    # Convolutions grow with the pixels and self-attention with their square: 4x to 16x.
    assert 4 < row_flops("tiny", 2 * side).unet / real.unet < 16


def test_the_work_table_adds_each_models_rows_times_their_flops(capsys: pytest.CaptureFixture[str]) -> None:
    work = face_work("tiny", faces=2, side=64)
    parts = work.parts()
    assert work.flops_per_face == pytest.approx(sum(r * f for r, f in parts.values()) / 2)
    assert parts["unet"][0] == work.rows.unet > 0 and parts["controlnet"][0] > parts["unet"][0]
    assert main(["work", "--models", "tiny", "--faces", "2", "--side", "64", "--peak-tflops", "1"]) == 0
    out = capsys.readouterr().out
    total = re.search(r"^\| all \| \| \| ([0-9.e+-]+) \|$", out, flags=re.MULTILINE)
    assert total is not None and float(total.group(1)) == pytest.approx(work.flops_per_face / 1e12, rel=1e-3)
    rate = re.search(r"^- 50% of it: ([0-9.e+-]+) faces/s", out, flags=re.MULTILINE)
    assert rate is not None and float(rate.group(1)) == pytest.approx(0.5e12 / work.flops_per_face, rel=1e-3)
