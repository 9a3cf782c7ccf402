"""``easyphoto bench``: our loop against a plain diffusers pipeline on the same models.

Measured side by side in one run, as a ratio, because these machines are noisy. The result is
written into ``docs/benchmarks.md`` between this benchmark's markers (other sections are kept).
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from diffusers import MultiControlNetModel, StableDiffusionControlNetInpaintPipeline

from easyphoto.diffusion.inpaint import InpaintPass, run_inpaint
from easyphoto.diffusion.schedulers import make_scheduler
from easyphoto.engines.backends.torch_backend import TorchBackend
from easyphoto.engines.interface import ControlInput, Engines
from easyphoto.engines.lora import LoraWeights, save_lora
from easyphoto.engines.models.family import ModelFamily
from easyphoto.engines.models.loading import resolve_family

PROMPT = "easyphoto_face, easyphoto, 1person"
CONTROL_SCALES = {"canny": 0.5, "openpose": 0.5, "color": 0.85}
T = TypeVar("T")
MARK_BEGIN = "<!-- bench:first-pass:begin -->"
MARK_END = "<!-- bench:first-pass:end -->"


@dataclass
class PassTiming:
    ours: list[float]
    diffusers: list[float]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ours) / statistics.median(self.diffusers)


def baseline_pipeline(
    family: ModelFamily, kinds: list[str], scheduler: str = "dpmpp_2m_sde_karras"
) -> StableDiffusionControlNetInpaintPipeline:
    """The plain diffusers pipeline on the family's own modules: the reference we are measured
    and tested against."""
    pipe = StableDiffusionControlNetInpaintPipeline(
        vae=family.vae,
        text_encoder=family.text_encoder,
        tokenizer=family.tokenizer,
        unet=family.unet,
        controlnet=MultiControlNetModel([family.controlnets[k] for k in kinds]),
        scheduler=make_scheduler(scheduler, family.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def lora_loaded(pipe: StableDiffusionControlNetInpaintPipeline, lora: LoraWeights) -> Iterator[None]:
    """``lora`` in the pipeline's UNet and text encoder (and so in every pipeline sharing them) as
    diffusers serves a user's LoRA: peft layers beside the weights, not fused; removed after."""
    try:  # a load that fails part way leaves peft layers behind: unloaded too
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "lora.safetensors"
            save_lora(lora, path, alpha_tensors=False)
            pipe.load_lora_weights(str(path), adapter_name=lora.name)
        yield
    finally:
        pipe.unload_lora_weights()


def baseline_inpaint(
    pipe: StableDiffusionControlNetInpaintPipeline,
    prompt: str,
    negative_prompt: str,
    image: torch.Tensor,
    mask: torch.Tensor,
    controls: list[ControlInput],
    steps: int,
    seed: int,
    strength: float = 0.45,
    guidance_scale: float = 7.0,
) -> torch.Tensor:
    """The same pass as :func:`diffusion.inpaint.run_inpaint`, through diffusers: ``image`` and the
    result in [0, 1] (NCHW), ``mask`` 1 where repainted."""
    return pipe(
        prompt=prompt,
        negative_prompt=negative_prompt,
        image=image,
        mask_image=mask,
        control_image=[c.image for c in controls],
        height=image.shape[-2],
        width=image.shape[-1],
        num_inference_steps=steps,
        strength=strength,
        guidance_scale=guidance_scale,
        controlnet_conditioning_scale=[c.scale for c in controls],
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images


def run_concurrently(requests: int, concurrency: int, call: Callable[[int], T]) -> tuple[float, list[T]]:
    """``call(0)`` ... ``call(requests - 1)`` from ``concurrency`` threads, each taking the next
    index as it is free (clients sending back to back); the wall time and the results as they
    finished. The first call that raises ends the run: no call starts after it, and it is raised
    once those in flight are done."""
    todo = list(range(requests))
    done: list[T] = []
    failed: list[BaseException] = []
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if not todo or failed:
                    return
                index = todo.pop(0)
            try:
                result = call(index)
            except BaseException as error:
                with lock:
                    failed.append(error)
                return
            with lock:
                done.append(result)

    started = time.perf_counter()
    # Daemons: a Ctrl-C in the joins below ends the process without waiting for the calls in flight.
    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failed:
        raise failed[0]
    return time.perf_counter() - started, done


def _timed(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def time_first_pass(family: ModelFamily, size: int, steps: int, repeats: int) -> PassTiming:
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, size, size, generator=generator)
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    controls = {kind: torch.rand(1, 3, size, size, generator=generator) for kind in CONTROL_SCALES}
    backend = TorchBackend(family)
    engines = Engines(backend, family.tokenizer, float(family.vae.config.scaling_factor))
    pipe = baseline_pipeline(family, list(CONTROL_SCALES))

    def baseline() -> object:
        return baseline_inpaint(
            pipe,
            PROMPT,
            "",
            image,
            mask,
            [ControlInput(k, controls[k], s) for k, s in CONTROL_SCALES.items()],
            steps=steps,
            seed=1,
        )

    def ours() -> object:
        # Prompt encoding is part of the request (the cache makes repeats cheap, as in serving).
        embeds = engines.encode_prompts([PROMPT, ""])
        inpaint = InpaintPass(
            image=image * 2 - 1,
            mask=mask,
            prompt_embeds=embeds[:1],
            negative_prompt_embeds=embeds[1:],
            controls=[ControlInput(k, controls[k], s) for k, s in CONTROL_SCALES.items()],
            steps=steps,
            strength=0.45,
            guidance_scale=7.0,
            generator=torch.Generator().manual_seed(1),
        )
        return run_inpaint(engines, inpaint, family.scheduler_config)

    # Interleave so drift in machine load hits both sides alike.
    ours_times: list[float] = []
    base_times: list[float] = []
    for _ in range(repeats):
        ours_times += _timed(ours, 1)
        base_times += _timed(baseline, 1)
    return PassTiming(ours_times, base_times)


def run_bench(out: Path, models: str = "tiny", size: int = 256, steps: int = 50, repeats: int = 3) -> str:
    family = resolve_family(models)
    timing = time_first_pass(family, size, steps, repeats)
    device = device_name()
    lines = [
        MARK_BEGIN,
        f"### First diffusion pass: ours vs diffusers ({models}, {size}², {steps} steps × strength 0.45,"
        " 3 ControlNets, CFG 7)",
        "",
        f"Device: {device}, torch {torch.__version__}, {torch.get_num_threads()} threads,"
        f" median of {repeats}.",
        "",
        "| loop | median s | min s | max s |",
        "| --- | --- | --- | --- |",
        _row("easyphoto engines", timing.ours),
        _row("diffusers StableDiffusionControlNetInpaintPipeline", timing.diffusers),
        "",
        f"Ratio ours / diffusers: **{timing.ratio:.3f}** (target ≤ 1.05).",
        MARK_END,
    ]
    section = "\n".join(lines)
    write_section(out, section)
    return section


def device_name() -> str:
    """What benchmarks name the device by: the GPU torch would take, else the CPU's model (from
    /proc/cpuinfo, else its architecture) and its core count."""
    if torch.cuda.is_available():
        return "cuda: " + torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.is_file() else ""
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return f"cpu ({found.group(1).strip() if found else platform.machine()}, {os.cpu_count()} cores)"


def _row(name: str, times: list[float]) -> str:
    return f"| {name} | {statistics.median(times):.3f} | {min(times):.3f} | {max(times):.3f} |"


def write_section(path: Path, section: str) -> None:
    """Replaces the section between its own markers (its first and last lines), or appends it."""
    begin, end = section.splitlines()[0], section.splitlines()[-1]
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
