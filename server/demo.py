"""``easyphoto demo``: the main job end to end on the embedded default (tiny models, CPU).

For now: detect the face of a sample photo that scikit-image ships with the real face models,
build the inpaint mask and the canny / openpose / colour control images from it, run the first
diffusion pass (MISSION.md §2.5 settings) through the engines, paste the face back, and write a
contact sheet. The tiny family has random weights: it paints noise into the face, never a face.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from skimage import data as skimage_data

from easyphoto.engines.faces.models import default_face_models
from easyphoto.engines.imaging import (
    canny_control,
    color_control,
    contact_sheet,
    draw_pose,
    encode_png,
    feather,
    from_model,
    inpaint_mask,
    resize,
    to_model,
)
from easyphoto.engines.inpaint import InpaintRequest, StepEvent, run_inpaint
from easyphoto.engines.interface import ControlInput, Engines
from easyphoto.engines.loading import resolve_family
from easyphoto.engines.torch_backend import TorchBackend

FACE_PROMPT = "easyphoto_face, easyphoto, 1person"
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
    image = resize(template, size, size)
    started = time.perf_counter()
    face_models = default_face_models()
    face = face_models.analyzer(TorchBackend(faces=face_models)).largest(image)
    parts = face_models.parser(image, face)
    mask = inpaint_mask(parts, face.width)
    canny, color = canny_control(image), color_control(image)
    pose = draw_pose(image.shape[:2], [face.landmarks])
    timings["face_preprocessing"] = time.perf_counter() - started
    started = time.perf_counter()
    embeds = engines.encode_prompts([FACE_PROMPT, ""])
    timings["encode_prompts"] = time.perf_counter() - started

    def on_step(event: StepEvent) -> None:
        if event.step % 10 == 0 or event.step == event.total_steps:
            print(f"  first diffusion: step {event.step}/{event.total_steps}", flush=True)

    started = time.perf_counter()
    request = InpaintRequest(
        image=to_model(image),
        mask=to_model(mask, signed=False),
        prompt_embeds=embeds[:1],
        negative_prompt_embeds=embeds[1:],
        controls=[
            ControlInput("canny", to_model(canny, signed=False), 0.5),
            ControlInput("openpose", to_model(pose, signed=False), 0.5),
            ControlInput("color", to_model(color, signed=False), 0.85),
        ],
        steps=steps,
        strength=0.45,
        guidance_scale=7.0,
        generator=torch.Generator().manual_seed(seed),
        on_step=on_step,
    )
    result = from_model(run_inpaint(engines, request, family.scheduler_config))
    timings["first_diffusion"] = time.perf_counter() - started

    alpha = feather(mask, max(1, round(face.width / 20)))[..., None]
    pasted = (result * alpha + image * (1 - alpha)).round().astype(np.uint8)
    banner = RANDOM_WEIGHTS_NOTE if family.is_random else f"model: {family.source}"
    sheet = contact_sheet(
        [
            ("template", image),
            ("inpaint mask", mask),
            ("canny", canny),
            ("openpose", pose),
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
