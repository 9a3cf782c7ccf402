"""``easyphoto bench --only lcm``: the LCM fast path against the default passes, faces per second.

One orchestrator (the torch backend, in process, its step engine batching concurrent requests)
is given a random LCM-LoRA-shaped file, and the same Generate (one face of the astronaut, painted
as a user with a random LoRA) runs with and without ``lcm_accelerate``, the two paths interleaved
at each concurrency so that drift in the machine's load hits both alike. Random weights: the
numbers are speed, never quality. The section goes into ``docs/benchmarks.md``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from easyphoto.engines.models.loading import resolve_family
from easyphoto.engines.models.variants import LCM_LORA_WEIGHT
from easyphoto.fixtures.lcm import write_lcm_lora
from easyphoto.fixtures.photos import astronaut_face, sample_photo
from easyphoto.fixtures.users import publish_photo_user, random_lora
from easyphoto.users.store import UserStore
from easyphoto.v1 import generator_pb2

from .app import EngineHolder, ServerConfig
from .bench import device_name, run_concurrently
from .options import GenerateOptions, resolve_options
from .pipeline import Orchestrator, planned_steps

PATHS = {"default": False, "lcm": True}
USER_RANK = 8
LCM_RANK = 4


def lcm_section(models: str = "tiny", requests: int = 4, concurrency: tuple[int, ...] = (1, 4)) -> str:
    with tempfile.TemporaryDirectory(prefix="easyphoto-lcm-bench-") as folder:
        data = Path(folder) / "data"
        family = resolve_family(models)
        publish_photo_user(
            UserStore(data), "user0", astronaut_face(), random_lora(family, "user0", USER_RANK, 0)
        )
        lcm_file = write_lcm_lora(family, Path(folder) / "lcm.safetensors", rank=LCM_RANK)
        del family  # the orchestrator loads its own
        holder = EngineHolder(ServerConfig(models=models, data=data, lcm_lora=lcm_file))
        orchestrator = holder.load()
        try:
            options = {
                path: resolve_options(generator_pb2.GenerateRequest(lcm_accelerate=lcm))
                for path, lcm in PATHS.items()
            }
            for path in PATHS:  # warm-up: the user's adapter, the prompts, the first calls
                _generate(orchestrator, options[path])
            rows = []
            for level in concurrency:
                for path in PATHS:
                    wall, latencies = _level(orchestrator, options[path], level, requests)
                    rows.append((path, level, planned_steps(options[path], 1), requests / wall, latencies))
        finally:
            holder.close()
    return _section(models, requests, rows)


def _generate(orchestrator: Orchestrator, options: GenerateOptions) -> float:
    started = time.perf_counter()
    result = orchestrator.generate(sample_photo("astronaut"), ["user0"], options, seed=1)
    assert result.faces[0].user_id == "user0"
    return time.perf_counter() - started


def _level(
    orchestrator: Orchestrator, options: GenerateOptions, concurrency: int, requests: int
) -> tuple[float, list[float]]:
    """``requests`` Generates from ``concurrency`` threads: the wall time and each one's seconds."""
    return run_concurrently(requests, concurrency, lambda _: _generate(orchestrator, options))


def _section(models: str, requests: int, rows: list[tuple[str, int, int, float, list[float]]]) -> str:
    speed = {(path, level): faces for path, level, _, faces, _ in rows}
    ratios = ", ".join(
        f"{speed[('lcm', level)] / speed[('default', level)]:.2f}x at concurrency {level}"
        for level in sorted({level for _, level, *_ in rows})
    )
    lines = [
        f"<!-- bench:lcm:{models}:begin -->",
        f"### LCM fast path against the default passes ({models}, {device_name()})",
        "",
        f"`easyphoto bench --only lcm --models {models}`: one face of the astronaut per Generate, as a"
        f" user with a random rank-{USER_RANK} LoRA, on the torch backend in process (torch"
        f" {torch.__version__}, {torch.get_num_threads()} threads); a random LCM-LoRA-shaped file (rank"
        f" {LCM_RANK} on every UNet layer) fused at {LCM_LORA_WEIGHT}; {requests} requests per row. Random"
        " weights: speed, not quality.",
        "",
        "| path | denoising steps per face | concurrency | faces/s | p50 s |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {path} | {steps} | {level} | {faces:.3f} | {statistics.median(latencies):.2f} |"
            for path, level, steps, faces, latencies in rows
        ),
        "",
        f"LCM / default faces/s: **{ratios}**.",
        f"<!-- bench:lcm:{models}:end -->",
    ]
    return "\n".join(lines)
