"""``easyphoto demo``: the main job end to end on the embedded default (tiny models, CPU).

For now it runs one ControlNet inpainting pass (the first-diffusion settings of MISSION.md §2.5)
through the engines on a sample photo that scikit-image ships, and writes a contact sheet. The
tiny family has random weights: it paints noise into the masked region, never a face.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from skimage import data as skimage_data

from easyphoto.engines.imaging import (
    canny_control,
    color_control,
    contact_sheet,
    ellipse_mask,
    encode_png,
    from_model,
    resize,
    to_model,
)
from easyphoto.engines.inpaint import InpaintRequest, StepEvent, run_inpaint
from easyphoto.engines.interface import ControlInput, Engines
from easyphoto.engines.loading import resolve_family
from easyphoto.engines.torch_backend import TorchBackend

FACE_PROMPT = "easyphoto_face, easyphoto, 1person"
# The astronaut's face in scikit-image's 512x512 sample (a fixed box until the face stack lands).
ASTRONAUT_FACE = (170.0, 40.0, 300.0, 210.0)
RANDOM_WEIGHTS_NOTE = "tiny RANDOM weights: the masked face is painted with noise, not a face"


@dataclass
class DemoResult:
    sheet: Path
    seconds: dict[str, float]
    model: str
    is_random: bool


def run_demo(
    out_dir: Path, models: str = "tiny", size: int = 256, steps: int = 50, seed: int = 0
) -> DemoResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    family = resolve_family(models)
    backend = TorchBackend(family)
    engines = Engines(backend, family.tokenizer, float(family.vae.config.scaling_factor))
    timings["load_models"] = time.perf_counter() - started

    template = skimage_data.astronaut()
    scale = size / template.shape[0]
    image = resize(template, size, size)
    mask = ellipse_mask(size, size, tuple(v * scale for v in ASTRONAUT_FACE))
    canny, color = canny_control(image), color_control(image)
    started = time.perf_counter()
    embeds = engines.encode_prompts([FACE_PROMPT, ""])
    timings["encode_prompts"] = time.perf_counter() - started

    def on_step(event: StepEvent) -> None:
        print(f"\r  first diffusion: step {event.step}/{event.total_steps}", end="", flush=True)

    started = time.perf_counter()
    request = InpaintRequest(
        image=to_model(image),
        mask=to_model(mask, signed=False),
        prompt_embeds=embeds[:1],
        negative_prompt_embeds=embeds[1:],
        controls=[
            ControlInput("canny", to_model(canny, signed=False), 0.5),
            ControlInput("color", to_model(color, signed=False), 0.85),
        ],
        steps=steps,
        strength=0.45,
        guidance_scale=7.0,
        generator=torch.Generator().manual_seed(seed),
        on_step=on_step,
    )
    result = from_model(run_inpaint(engines, request, family.scheduler_config))
    print()
    timings["first_diffusion"] = time.perf_counter() - started

    alpha = (mask.astype(np.float32) / 255.0)[..., None]
    pasted = (result * alpha + image * (1 - alpha)).round().astype(np.uint8)
    banner = RANDOM_WEIGHTS_NOTE if family.is_random else f"model: {family.source}"
    sheet = contact_sheet(
        [
            ("template", image),
            ("inpaint mask", mask),
            ("canny", canny),
            ("color", color),
            ("pass 1", result),
            ("pasted", pasted),
        ],
        banner=banner,
    )
    sheet_path = out_dir / "demo.png"
    sheet_path.write_bytes(encode_png(sheet))
    (out_dir / "pass1.png").write_bytes(encode_png(result))
    summary = {"model": family.name, "is_random": family.is_random, "seconds": timings}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return DemoResult(sheet_path, timings, family.name, family.is_random)
