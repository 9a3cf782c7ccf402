"""TensorRT build plans derived from the role descriptions, and the build itself.

A plan is plain data (``plans.json`` beside the ONNX files): for each role its ONNX graph, the engine
to write, one optimisation profile whose min/opt/max shapes are the description's profile points,
fp16, the refit flag LoRA switching needs, the workspace limit and the timing cache. The plan is
derived and checked anywhere, and so is the polygraphy loader that builds it
(:func:`engine_loader`); running it (:func:`build_engine`) needs the ``tensorrt`` package (the
``gpu`` extra) and a GPU, so it runs on the deploy host, inside NVIDIA's Triton container
(``deploy/README.md`` has the command). Nothing here imports tensorrt at module level.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from easyphoto.engines.roles.description import RoleDescription
from easyphoto.engines.shapes import PROFILE_POINTS

log = logging.getLogger(__name__)

PLANS_FILE = "plans.json"
DEFAULT_WORKSPACE = 8 << 30
TIMING_CACHE = "timing.cache"


@dataclass(frozen=True)
class BuildPlan:
    role: str
    onnx: str  # relative to the export directory
    engine: str  # relative to the export directory
    # input name -> {"min": shape, "opt": shape, "max": shape}
    profile: dict[str, dict[str, list[int]]]
    fp16: bool
    refittable: bool
    workspace_bytes: int
    timing_cache: str
    # ONNX initializer names the refitter will address (the PyTorch parameter names).
    weights: tuple[str, ...] = ()
    # Each LoRA-targeted layer (as LoRA files name it) -> the weight a LoRA refit writes.
    lora_weights: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        values = asdict(self)
        values["weights"] = list(self.weights)
        return values

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> BuildPlan:
        return cls(**{**values, "weights": tuple(values.get("weights", ()))})


def profile_shapes(description: RoleDescription) -> dict[str, dict[str, list[int]]]:
    """Every input's shape at the description's min, opt and max profile points."""
    points = {point: description.shapes(point) for point in PROFILE_POINTS}
    return {
        spec.name: {point: list(points[point][spec.name]) for point in PROFILE_POINTS}
        for spec in description.inputs
    }


def plan_role(
    description: RoleDescription,
    onnx: str,
    weights: tuple[str, ...] = (),
    fp16: bool = True,
    workspace_bytes: int = DEFAULT_WORKSPACE,
    lora_weights: dict[str, str] | None = None,
) -> BuildPlan:
    """The build plan of one exported role (fp16 only where the role allows it)."""
    return BuildPlan(
        role=description.name,
        onnx=onnx,
        engine=str(Path(onnx).with_name("model.plan")),
        profile=profile_shapes(description),
        fp16=fp16 and description.fp16,
        refittable=True,
        workspace_bytes=workspace_bytes,
        timing_cache=TIMING_CACHE,
        weights=weights,
        lora_weights=dict(lora_weights or {}),
    )


def write_plans(plans: list[BuildPlan], export_dir: Path) -> Path:
    path = export_dir / PLANS_FILE
    path.write_text(json.dumps({"plans": [p.to_json() for p in plans]}, indent=2))
    return path


def read_plans(export_dir: Path) -> list[BuildPlan]:
    return [BuildPlan.from_json(p) for p in json.loads((export_dir / PLANS_FILE).read_text())["plans"]]


def engine_loader(plan: BuildPlan, export_dir: Path, memory_pool_limits: dict[Any, int] | None = None) -> Any:
    """The polygraphy loader that builds ``plan``'s engine (NVIDIA's diffusion demo builds the same
    way): the ONNX graph parsed into a network, one optimisation profile, fp16 and refit as the
    plan says, the timing cache read first and written back so later builds reuse its measurements.
    Lazy: TensorRT is imported only when the loader runs (on the GPU host)."""
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile

    profile = Profile()
    for name, shapes in plan.profile.items():
        profile.add(name, min=shapes["min"], opt=shapes["opt"], max=shapes["max"])
    cache = export_dir / plan.timing_cache
    config = CreateConfig(
        fp16=plan.fp16,
        refittable=plan.refittable,
        profiles=[profile],
        memory_pool_limits=memory_pool_limits,
        load_timing_cache=str(cache) if cache.is_file() else None,
    )
    return EngineFromNetwork(
        NetworkFromOnnxPath(str(export_dir / plan.onnx)), config, save_timing_cache=str(cache)
    )


def build_engine(plan: BuildPlan, export_dir: Path) -> Path:  # pragma: no cover - needs TensorRT and a GPU
    """Builds ``plan`` (:func:`engine_loader`, the workspace limited to the plan's) and writes the
    serialized engine."""
    import tensorrt as trt
    from polygraphy.backend.trt import save_engine

    limits = {trt.MemoryPoolType.WORKSPACE: plan.workspace_bytes}
    engine = engine_loader(plan, export_dir, limits)()
    engine_path = export_dir / plan.engine
    save_engine(engine, str(engine_path))
    log.info("built %s (%d bytes)", engine_path, engine_path.stat().st_size)
    return engine_path


def build_all(export_dir: Path, roles: list[str] | None = None) -> list[Path]:  # pragma: no cover - GPU host
    return [
        build_engine(plan, export_dir) for plan in read_plans(export_dir) if not roles or plan.role in roles
    ]
