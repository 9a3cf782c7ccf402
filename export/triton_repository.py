"""The Triton model repository: one model per exported role, its ``config.pbtxt`` generated from the
role's description, in versioned directories (``<repo>/<role>/<version>/``).

Two targets share the layout and the tensor declarations:

* ``gpu``: ``platform: "tensorrt_plan"`` serving the engine built from ``plans.json`` on the deploy
  host (``model.plan``), instances on the GPU.
* ``cpu``: a python-backend model (``export/triton_python_model.py``) running the role's ONNX graph in
  onnxruntime, for the CPU ``tritonserver`` that has no other backend; used by the tests here.

dlib's face embedder has no graph on either target: it is the same python-backend model over
dlib (:func:`write_dlib_embedder`), on CPU instances beside the GPU engines.

Roles whose every tensor starts with the ``batch`` axis get Triton's implicit batch dimension
(``max_batch_size`` from the profile, dims without the batch axis) and dynamic batching, so
requests from different users at the same step can be merged into one engine call.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Collection
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from easyphoto.engines.backends.triton_backend import ADAPTER_INPUTS
from easyphoto.engines.faces.models import DlibEmbedder
from easyphoto.engines.roles.description import RoleDescription
from easyphoto.engines.roles.lora_inputs import lora_role_name
from easyphoto.engines.shapes import DTYPES, TensorSpec

from .onnx_export import LORA_SPEC
from .onnx_files import copy_graph, data_files
from .tensorrt_plan import read_plans
from .triton_server import MEMORY_RESOURCE

log = logging.getLogger(__name__)

Target = Literal["cpu", "gpu"]
# A row's user adapter (its name, user@vN; "" for none) and weight, each [1] per sample: optional, so
# a call without them is the base model.
ADAPTER_INPUT, ADAPTER_WEIGHT_INPUT = (
    f'  {{\n    name: "{name}"\n    data_type: {datatype}\n    dims: [ 1 ]\n    optional: true\n  }}'
    for name, datatype in zip(ADAPTER_INPUTS, ("TYPE_STRING", "TYPE_FP32"), strict=True)
)


@dataclass(frozen=True)
class ServingSettings:
    instances: int = 1
    max_queue_delay_microseconds: int = 500
    version: int = 1
    # Models whose weights take at least this many MB need one unit of the MEMORY_RESOURCE to run:
    # under `tritonserver --rate-limit=execution_count` (start_server adds it when a model needs
    # it) at most as many of them run at once as the server has units
    # (`--rate-limit-resource=memory:N`; 1 by default). onnxruntime allocates a
    # run's activations as it goes (a full-size ControlNet's are about 2 GB at 512 px), and a step's
    # ControlNets all at once do not fit a 24 GiB CPU host beside the weights. None: no limit.
    rate_limit_mb: float | None = None


def _tensor(description: RoleDescription, spec: TensorSpec) -> str:
    dims = [str(d) if isinstance(d, int) else "-1" for d in description.triton_dims(spec)]
    reshape = "\n    reshape: { shape: [ ] }" if description.per_sample_scalar(spec) else ""
    return (
        f'  {{\n    name: "{spec.name}"\n    data_type: TYPE_{DTYPES[spec.dtype].triton}\n'
        f"    dims: [ {', '.join(dims)} ]{reshape}\n  }}"
    )


def config_pbtxt(
    description: RoleDescription,
    target: Target,
    settings: ServingSettings,
    python: bool = False,
    adapter_dir: Path | None = None,
    rate_limited: bool = False,
) -> str:
    """The model configuration of one role, in Triton's protobuf text format (``python``: a
    python-backend model on CPU instances whatever the target; ``adapter_dir``: it serves users'
    adapters too, from that folder, through the optional ``adapter`` and ``adapter_weight`` inputs;
    ``rate_limited``: its instances need a unit of :data:`MEMORY_RESOURCE` to run)."""
    batched = description.batched
    max_batch = description.axes["batch"].max if batched else 0
    engine = target == "gpu" and not python
    runtime = 'platform: "tensorrt_plan"' if engine else 'backend: "python"'
    kind = "KIND_GPU" if engine else "KIND_CPU"
    inputs = [_tensor(description, s) for s in description.inputs]
    resource = f'{{ name: "{MEMORY_RESOURCE}" count: 1 }}'
    limiter = f" rate_limiter {{ resources [ {resource} ] }}" if rate_limited else ""
    if adapter_dir is not None:
        inputs += [ADAPTER_INPUT, ADAPTER_WEIGHT_INPUT]
    lines = [
        f'name: "{description.name}"',
        runtime,
        f"max_batch_size: {max_batch}",
        "input [\n" + ",\n".join(inputs) + "\n]",
        "output [\n" + ",\n".join(_tensor(description, s) for s in description.outputs) + "\n]",
        f"instance_group [ {{ count: {settings.instances} kind: {kind}{limiter} }} ]",
        "version_policy: { latest: { num_versions: 1 } }",
    ]
    if batched:
        lines.append(
            f"dynamic_batching {{ max_queue_delay_microseconds: {settings.max_queue_delay_microseconds} }}"
        )
    if adapter_dir is not None:
        lines.append(f'parameters: {{ key: "adapter_dir" value: {{ string_value: "{adapter_dir}" }} }}')
    return "\n".join(lines) + "\n"


def python_model_source() -> str:
    return resources.files("easyphoto.export").joinpath("triton_python_model.py").read_text()


def _version_dir(repository: Path, role: str, settings: ServingSettings) -> Path:
    version_dir = repository / role / str(settings.version)
    shutil.rmtree(version_dir, ignore_errors=True)
    version_dir.mkdir(parents=True)
    return version_dir


def write_dlib_embedder(
    description: RoleDescription,
    resnet: Path,
    repository: Path,
    target: Target = "cpu",
    settings: ServingSettings | None = None,
) -> str:
    """The ``face_embedder`` role as a python-backend model over dlib: the model source, the
    descriptor module it shares with the in-process embedder, and the ResNet weights."""
    settings = settings or ServingSettings()
    version_dir = _version_dir(repository, description.name, settings)
    (repository / description.name / "config.pbtxt").write_text(
        config_pbtxt(description, target, settings, python=True)
    )
    (version_dir / "model.py").write_text(python_model_source())
    descriptor = resources.files("easyphoto.engines.faces").joinpath("dlib_descriptor.py")
    (version_dir / "dlib_descriptor.py").write_text(descriptor.read_text())
    shutil.copyfile(resnet, version_dir / resnet.name)
    return description.name


def _weighs_enough(graph: Path, rate_limit_mb: float | None) -> bool:
    """Whether the graph's weights take at least ``rate_limit_mb`` MB (None: never)."""
    if rate_limit_mb is None:
        return False
    files = [graph, *data_files(graph)]
    return sum(path.stat().st_size for path in files) >= rate_limit_mb * 1e6


def write_repository(
    export_dir: Path,
    roles: dict[str, RoleDescription],
    repository: Path,
    target: Target = "cpu",
    settings: ServingSettings | None = None,
    adapter_dir: Path | None = None,
    only: Collection[str] | None = None,
) -> list[str]:
    """Writes one model per role in ``export_dir/plans.json``, and dlib's embedder when it is among
    ``roles``; returns the model names. The gpu target needs the engines built first
    (``build_all``); the cpu target serves the ONNX graphs, and with ``adapter_dir`` each role's
    graph with LoRA inputs too (users' adapters from that folder, which the orchestrator fills).
    ``only``: just these roles."""
    settings = settings or ServingSettings()
    written = []
    for plan in read_plans(export_dir):
        if only is not None and plan.role not in only:
            continue
        description = roles[plan.role]
        version_dir = _version_dir(repository, plan.role, settings)
        lora = export_dir / lora_role_name(plan.role)
        serves_adapters = target == "cpu" and adapter_dir is not None and (lora / "model.onnx").is_file()
        config = config_pbtxt(
            description,
            target,
            settings,
            adapter_dir=adapter_dir if serves_adapters else None,
            rate_limited=_weighs_enough(export_dir / plan.onnx, settings.rate_limit_mb),
        )
        (repository / plan.role / "config.pbtxt").write_text(config)
        if serves_adapters:
            copy_graph(lora / "model.onnx", version_dir / "model.lora.onnx")
            shutil.copyfile(lora / LORA_SPEC, version_dir / LORA_SPEC)
            feed = resources.files("easyphoto.engines.roles").joinpath("lora_feed.py")
            (version_dir / "lora_feed.py").write_text(feed.read_text())
        if target == "gpu":
            engine = export_dir / plan.engine
            if not engine.is_file():
                raise FileNotFoundError(
                    f"{engine} is not built; run the TensorRT build on the GPU host first"
                )
            shutil.copyfile(engine, version_dir / "model.plan")
        else:  # the graph with LoRA inputs serves base rows too: one copy of the weights
            if not serves_adapters:
                copy_graph(export_dir / plan.onnx, version_dir / "model.onnx")
            (version_dir / "model.py").write_text(python_model_source())
        written.append(plan.role)
    for description in (
        d for d in roles.values() if d.name not in written and (only is None or d.name in only)
    ):
        module = description.build_module()
        if isinstance(module, DlibEmbedder):
            written.append(write_dlib_embedder(description, module.resnet_path, repository, target, settings))
    log.info("wrote %d %s models into %s", len(written), target, repository)
    return written
