"""torch -> ONNX for every role, from its engine description alone.

Names, dtypes and dynamic axes come from the description; the sample input at the profile's
``opt`` point traces the graph. Constant folding stays off so that initializers keep the PyTorch
parameter names LoRA refit needs (``unet.down_blocks.0.attentions.0...``). Every graph is
checked with onnx's checker and run in onnxruntime against the PyTorch module on the same input
(polygraphy's comparator, :mod:`export.onnx_check`).
A role is re-exported only when its inputs changed (weights hash, description, exporter version).

Where the role allows fp16, ``model.fp16.onnx`` is written too: the fp32 graph's floats converted
to fp16 (onnxruntime's converter, inputs and outputs kept fp32 so one ``config.pbtxt`` fits both
graphs, initializer names unchanged for refit), checked the same way against the fp32 PyTorch module
with a relative tolerance. It is for runtimes that take fp16 graphs (onnxruntime on a GPU); the
TensorRT build reads the fp32 graph and lowers it with its fp16 flag, which is how NVIDIA's
diffusion demo builds too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from easyphoto.engines.lora import LoraTargets, lora_targets
from easyphoto.engines.models.family import ModelFamily
from easyphoto.engines.models.sdxl import SdxlFacts
from easyphoto.engines.roles.catalogue import RoleCatalogue
from easyphoto.engines.roles.description import RoleDescription
from easyphoto.engines.roles.lora_inputs import describe_with_lora, lora_layers
from easyphoto.engines.roles.manifest import EngineManifest
from easyphoto.engines.shapes import ProfilePoint

from .onnx_check import GraphCheck, GraphTolerance, check_graphs
from .onnx_files import DATA_SUFFIX, gather_external_data
from .refit import lora_weight_names
from .tensorrt_plan import plan_role, write_plans

log = logging.getLogger(__name__)

OPSET = 18
EXPORTER_VERSION = f"easyphoto-onnx-3/torch-{torch.__version__}/opset-{OPSET}"
FP16_FILE = "model.fp16.onnx"
# fp16 graph against the fp32 PyTorch module: max |difference| / max(1, max |PyTorch output|).
# Measured on the tiny family: 1.5e-3 (text encoder) to 7e-3 (controlnet_canny).
FP16_TOLERANCE = 2e-2
FP32_SCOPE = "/time_proj/"  # the nodes of diffusers' Timesteps module (UNet, ControlNet)
META_FILE = "export.json"
LORA_SPEC = "lora.json"  # beside a graph with LoRA inputs
# Per-role tolerance of onnxruntime against PyTorch (fp32, CPU): max |difference| over outputs.
TOLERANCES = {"default": 1e-4, "vae_decoder": 5e-4, "vae_encoder": 5e-4}
# At the tiny family's min point the UNet's and ControlNets' mid block is 1x1, so its GroupNorm
# normalises 2 values per group: ill-conditioned, it magnifies fp32 rounding differences between
# onnxruntime and PyTorch. Measured over 12 random samples (AVX-512 Xeon, 2026-12): up to 1.4e-3 at
# the min point (controlnet_tile), at most 1.5e-6 at the opt point for every denoising role.
MIN_POINT_TOLERANCE = 3e-3
POINTS: tuple[ProfilePoint, ...] = ("opt", "min")


def tolerance_for(description: RoleDescription, point: ProfilePoint = "opt") -> float:
    """Max |onnxruntime - PyTorch| allowed for a role at a profile point (fp32, CPU)."""
    tolerance = TOLERANCES.get(description.name, TOLERANCES["default"])
    denoising = any(spec.name == "timestep" for spec in description.inputs)
    return max(tolerance, MIN_POINT_TOLERANCE) if point == "min" and denoising else tolerance


@dataclass
class ExportResult:
    role: str
    path: Path
    max_abs_diff: float  # over the checked profile points, fp32
    ok: bool  # every check within its tolerance
    seconds: float
    skipped: bool
    fp16_path: Path | None = None
    fp16_rel_diff: float = 0.0
    # LoRA file module name -> ONNX initializer (and TensorRT weight) name, for refit.
    lora_weights: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_meta(cls, path: Path, meta: dict[str, Any], seconds: float, skipped: bool) -> ExportResult:
        """The result ``export.json`` (``meta``) records for the graph at ``path``."""
        fp16 = meta["checks"].get("fp16")
        return cls(
            meta["role"],
            path,
            meta["max_abs_diff"],
            meta["ok"],
            seconds,
            skipped,
            path.with_name(fp16["graph"]) if fp16 else None,
            fp16["difference"] if fp16 else 0.0,
            meta.get("lora_weights", {}),
        )


def weights_hash(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


def export_key(description: RoleDescription, module: nn.Module) -> str:
    payload = json.dumps([description.manifest(), weights_hash(module), EXPORTER_VERSION], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def export_role(
    description: RoleDescription,
    out_dir: Path,
    force: bool = False,
    lora_roots: dict[str, nn.Module] | None = None,
    fp16_graph: bool = True,
) -> ExportResult:
    """The role's graph(s) and ``export.json``; with ``lora_roots`` (the family's UNet and text
    encoder) the map of its LoRA-targeted layers to their weights, for refit. ``fp16_graph``: also
    its fp16 copy, where the role allows fp16."""
    module = description.build_module()
    if not isinstance(module, nn.Module):
        raise TypeError(f"{description.name} is not a torch module and has no ONNX export")
    module = module.eval().float()
    role_dir = out_dir / description.name
    path = role_dir / "model.onnx"
    key = export_key(description, module)
    meta_path = role_dir / META_FILE
    if not force and meta_path.is_file() and path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            return ExportResult.from_meta(path, meta, seconds=0.0, skipped=True)
    started = time.perf_counter()
    _trace(description, module, path)
    checks = _check(description, module, path, fp16_graph and description.fp16)
    lora_weights, shared = lora_weight_names(description, module, lora_roots or {}, initializer_names(path))
    if shared:
        log.warning(
            "%s: %d LoRA-targeted layers share their weight with another (not refittable alone): %s",
            description.name,
            len(shared),
            shared[:3],
        )
    meta = {
        "key": key,
        "role": description.name,
        "exporter": EXPORTER_VERSION,
        "max_abs_diff": max(checks[point].difference for point in POINTS),
        "ok": all(check.passed for check in checks.values()),
        "checks": {
            name: {"difference": c.difference, "tolerance": c.tolerance, "graph": c.graph.name}
            for name, c in checks.items()
        },
        "description": description.manifest(),
        "parameters": [name for name, _ in module.named_parameters()],
        "lora_weights": lora_weights,
        "lora_weights_shared": shared,
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    result = ExportResult.from_meta(path, meta, seconds=time.perf_counter() - started, skipped=False)
    log.info(
        "exported %s in %.1fs (max |ort - torch| = %.2e)", result.role, result.seconds, result.max_abs_diff
    )
    return result


def _trace(description: RoleDescription, module: nn.Module, path: Path) -> None:
    """The fp32 graph at ``path``, traced at the opt point, with the description's names and axes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sample = description.sample_inputs("opt")
    dynamic_axes = {spec.name: spec.dynamic_axes() for spec in (*description.inputs, *description.outputs)}
    with torch.no_grad():
        torch.onnx.export(
            module,
            tuple(sample[spec.name] for spec in description.inputs),
            str(path),
            input_names=[spec.name for spec in description.inputs],
            output_names=[spec.name for spec in description.outputs],
            dynamic_axes={k: v for k, v in dynamic_axes.items() if v},
            opset_version=OPSET,
            do_constant_folding=False,
            dynamo=False,
        )
    gather_external_data(path)  # a graph past 2 GB: its weights in one file beside it
    onnx.checker.check_model(str(path))


def _check(description: RoleDescription, module: nn.Module, path: Path, fp16: bool) -> dict[str, GraphCheck]:
    """The fp32 graph against PyTorch at the opt point (which traced it) and the min point (so the
    dynamic axes really are dynamic); with ``fp16``, the fp16 graph written from it, at the opt point
    within FP16_TOLERANCE of max(1, |output|). At the tiny family's min point the mid block is 1x1,
    so its GroupNorm normalises 2 values per group, which is ill-conditioned for any fp16 engine
    (measured 0.14 off on a ControlNet, whatever ops were kept fp32): fp16 is not checked there.
    SD 1.5's min point normalises 160 values per group."""
    samples = [description.sample_inputs(point, seed=1) for point in ("opt", "min")]
    fp32 = GraphTolerance(path, (tolerance_for(description, "opt"), tolerance_for(description, "min")))
    if not fp16:
        ((opt, low),) = check_graphs(description, module, [fp32], samples)
        return {"opt": opt, "min": low}
    halves = GraphTolerance(write_fp16(path), (FP16_TOLERANCE,), relative=True)
    (opt, low), (half,) = check_graphs(description, module, [fp32, halves], samples)
    return {"opt": opt, "min": low, "fp16": half}


def write_fp16(path: Path) -> Path:
    """``model.fp16.onnx`` beside the fp32 graph at ``path``: floats in fp16, I/O left fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(path), load_external_data=False)
    external = any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)
    if external:
        onnx.load_external_data_for_model(model, str(path.parent))
    # The sinusoidal timestep embedding stays fp32: fp16 cannot hold sin/cos arguments of up to
    # ~1000 rad (its spacing there is 0.5 rad). Measured on the tiny ControlNets: 6.3e-3 -> 4.8e-3.
    fp32_nodes = [node.name for node in model.graph.node if FP32_SCOPE in node.name]
    # Shape inference needs the whole model in one protobuf (under 2 GB): skipped for big graphs.
    converted = OnnxModel(
        convert_float_to_float16(
            model,
            keep_io_types=True,
            disable_shape_infer=external,
            node_block_list=fp32_nodes,
        )
    )
    converted.topological_sort()  # the converter appends the input casts at the end
    out = path.with_name(FP16_FILE)
    onnx.save(
        converted.model,
        str(out),
        save_as_external_data=external,
        location=FP16_FILE + DATA_SUFFIX if external else None,
    )
    onnx.checker.check_model(str(out))
    return out


def initializer_names(path: Path) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    return {init.name for init in model.graph.initializer}


def export_all(
    catalogue: RoleCatalogue,
    out_dir: Path,
    family: ModelFamily,
    force: bool = False,
    lora_graphs: bool = True,
    sdxl: SdxlFacts | None = None,
    fp16_graphs: bool = True,
) -> list[ExportResult]:
    """Every role of the catalogue that is a torch module, and with ``lora_graphs`` the variant with
    LoRA inputs (``<role>_lora``, and its ``lora.json``) of each role that takes a LoRA; writes
    ``plans.json`` (the TensorRT build plans of the roles) and the engine manifest (``manifest.json``
    with the tokenizer, and ``sdxl``'s facts and tokenizers when the catalogue has the SDXL roles:
    what serving needs to call the roles without their weights). ``fp16_graphs=False`` leaves out
    the fp16 copies (onnxruntime on a CPU never reads them)."""
    roles = catalogue.roles
    results, lora_results = [], {}
    for description in roles.values():
        module = description.build_module()
        if not isinstance(module, nn.Module):
            log.info("skipping %s: not a torch module (served by its own runtime)", description.name)
            continue
        roots = family.lora_roots(description.variant)
        results.append(export_role(description, out_dir, force, roots, fp16_graph=fp16_graphs))
        if lora_graphs and description.lora_target is not None:
            with_lora = describe_with_lora(description, family)
            # No fp16 copy: serving reads the fp32 graph with LoRA inputs (TensorRT builds its
            # fp16 engine from it); the copy cost 9 s of 29 for a tiny fused stage.
            lora_results[description.name] = export_role(with_lora, out_dir, force, fp16_graph=False)
            _write_lora_spec(out_dir / with_lora.name, description.lora_target, lora_targets(roots))
    plans = [
        plan_role(
            roles[r.role],
            str(r.path.relative_to(out_dir)),
            tuple(sorted(initializer_names(r.path))),
            lora_weights=r.lora_weights,
        )
        for r in results
    ]
    write_plans(plans, out_dir)
    manifest = EngineManifest.of_family(
        family, catalogue, EXPORTER_VERSION, sdxl=sdxl if catalogue.templates else None
    )
    lora_files = {role: str(r.path.relative_to(out_dir)) for role, r in lora_results.items()}
    manifest.files = {
        r.role: {
            "onnx": str(r.path.relative_to(out_dir)),
            "onnx_fp16": str(r.fp16_path.relative_to(out_dir)) if r.fp16_path else None,
            "onnx_lora": lora_files.get(r.role),
        }
        for r in results
    }
    manifest.write(out_dir, family.tokenizer)
    return [*results, *lora_results.values()]


def _write_lora_spec(folder: Path, target: str, targets: LoraTargets) -> None:
    """``lora.json`` beside a graph with LoRA inputs: its target, the layers its factor inputs
    follow and their weights' (out, in), for whatever feeds it factors (the Triton model)."""
    layers = lora_layers(targets, target)
    shapes = [list(targets[target][layer][:2]) for layer in layers]
    (folder / LORA_SPEC).write_text(json.dumps({"target": target, "layers": layers, "shapes": shapes}))
