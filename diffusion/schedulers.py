"""The schedulers a pass may name, built fresh per run from the family's scheduler config, and
how a pass of some strength picks its timesteps (diffusers' img2img rule).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    LCMScheduler,
    SchedulerMixin,
)

from easyphoto.rpc.errors import InvalidArgument

SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "dpmpp_2m_sde_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True, "solver_order": 2},
    ),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True, "solver_order": 2},
    ),
    "dpm_solver": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "ddim": (DDIMScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    # Latent consistency: a few steps picked from a 50-step skipping schedule, fresh noise drawn
    # after each; for a UNet distilled to it (an LCM-LoRA fused in), at low guidance.
    "lcm": (LCMScheduler, {}),
}


def make_scheduler(name: str, base_config: dict[str, Any]) -> SchedulerMixin:
    """A fresh diffusers scheduler (schedulers hold per-run state: never share one across runs)."""
    if name not in SCHEDULERS:
        raise InvalidArgument(f"unknown scheduler {name!r}; known: {sorted(SCHEDULERS)}", field="scheduler")
    cls, overrides = SCHEDULERS[name]
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    return cls.from_config({**config, **overrides})


def strength_steps(steps: int, strength: float) -> int:
    """How many of ``steps`` a pass of ``strength`` runs (diffusers' rule; the last ones).

    A strength set in a request arrives as a 32-bit float (0.35 is 0.34999999...), and 20 x that
    would floor to 6 where diffusers, given the decimal, runs 7: the product is rounded to 1e-6
    before it is floored, so a value set explicitly runs the same steps as its default."""
    return min(math.floor(round(steps * strength, 6)), steps)


def strength_timesteps(scheduler: SchedulerMixin, steps: int, strength: float) -> torch.Tensor:
    """The timesteps a pass of ``strength`` runs, with the scheduler told where it begins."""
    scheduler.set_timesteps(steps)
    start = steps - strength_steps(steps, strength)
    order = int(getattr(scheduler, "order", 1))
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * order)
    return scheduler.timesteps[start * order :]
