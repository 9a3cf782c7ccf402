"""torch -> ONNX for every role, from its engine description alone.

Names, dtypes and dynamic axes come from the description; the sample input at the profile's
``opt`` point traces the graph. Constant folding stays off so that initializers keep the PyTorch
parameter names LoRA refit needs (``unet.down_blocks.0.attentions.0...``). Every graph is
checked with onnx's checker and run in onnxruntime against the PyTorch module on the same input.
A role is re-exported only when its inputs changed (weights hash, description, exporter version).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from easyphoto.engines.roles import RoleDescription

from .tensorrt_plan import plan_role, write_plans

log = logging.getLogger(__name__)

OPSET = 18
EXPORTER_VERSION = f"easyphoto-onnx-1/torch-{torch.__version__}/opset-{OPSET}"
META_FILE = "export.json"
# Per-role tolerance of onnxruntime against PyTorch (fp32, CPU): max |difference| over outputs.
TOLERANCES = {"default": 1e-4, "vae_decoder": 5e-4, "vae_encoder": 5e-4}
# Roles with a timestep input embed it with sin/cos of arguments up to ~1000 rad, where fp32 rounding
# differs between onnxruntime and PyTorch: measured up to 7e-4 (controlnet_color, a random sample).
TIMESTEP_TOLERANCE = 1e-3


def tolerance_for(description: RoleDescription) -> float:
    """Max |onnxruntime - PyTorch| allowed for a role (fp32, CPU)."""
    if description.name in TOLERANCES:
        return TOLERANCES[description.name]
    if any(spec.name == "timestep" for spec in description.inputs):
        return TIMESTEP_TOLERANCE
    return TOLERANCES["default"]


@dataclass
class ExportResult:
    role: str
    path: Path
    max_abs_diff: float
    tolerance: float
    seconds: float
    skipped: bool

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def weights_hash(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


def export_key(description: RoleDescription, module: nn.Module) -> str:
    payload = json.dumps([description.manifest(), weights_hash(module), EXPORTER_VERSION], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def export_role(description: RoleDescription, out_dir: Path, force: bool = False) -> ExportResult:
    module = description.build_module()
    if not isinstance(module, nn.Module):
        raise TypeError(f"{description.name} is not a torch module and has no ONNX export")
    module = module.eval().float()
    role_dir = out_dir / description.name
    path = role_dir / "model.onnx"
    key = export_key(description, module)
    meta_path = role_dir / META_FILE
    tolerance = tolerance_for(description)
    if not force and meta_path.is_file() and path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            return ExportResult(description.name, path, meta["max_abs_diff"], tolerance, 0.0, skipped=True)
    started = time.perf_counter()
    role_dir.mkdir(parents=True, exist_ok=True)
    sample = description.sample_inputs("opt")
    args = tuple(sample[spec.name] for spec in description.inputs)
    dynamic_axes = {spec.name: spec.dynamic_axes() for spec in (*description.inputs, *description.outputs)}
    with torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=[spec.name for spec in description.inputs],
            output_names=[spec.name for spec in description.outputs],
            dynamic_axes={k: v for k, v in dynamic_axes.items() if v},
            opset_version=OPSET,
            do_constant_folding=False,
            dynamo=False,
        )
    onnx.checker.check_model(str(path))
    # The opt point traced the graph; the min point checks that the dynamic axes really are dynamic.
    diff = max(
        compare_with_torch(description, module, path, description.sample_inputs(point, seed=1))
        for point in ("opt", "min")
    )
    seconds = time.perf_counter() - started
    parameters = [name for name, _ in module.named_parameters()]
    meta_path.write_text(
        json.dumps(
            {
                "key": key,
                "role": description.name,
                "exporter": EXPORTER_VERSION,
                "max_abs_diff": diff,
                "tolerance": tolerance,
                "description": description.manifest(),
                "parameters": parameters,
            },
            indent=2,
        )
    )
    log.info("exported %s in %.1fs (max |ort - torch| = %.2e)", description.name, seconds, diff)
    return ExportResult(description.name, path, diff, tolerance, seconds, skipped=False)


def compare_with_torch(
    description: RoleDescription, module: nn.Module, path: Path, sample: dict[str, torch.Tensor]
) -> float:
    """Max |onnxruntime - PyTorch| over all outputs on the description's sample input."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {spec.name: sample[spec.name].numpy() for spec in description.inputs}
    ours = session.run([spec.name for spec in description.outputs], feed)
    with torch.no_grad():
        expected = module(*(sample[spec.name] for spec in description.inputs))
    return max(float(np.max(np.abs(o - e.numpy()))) for o, e in zip(ours, expected, strict=True))


def initializer_names(path: Path) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    return {init.name for init in model.graph.initializer}


def export_all(roles: dict[str, RoleDescription], out_dir: Path, force: bool = False) -> list[ExportResult]:
    """Every role that is a torch module; writes ``manifest.json`` (the engine manifest) and
    ``plans.json`` (the TensorRT build plans) too."""
    results = []
    for description in roles.values():
        module = description.build_module()
        if not isinstance(module, nn.Module):
            log.info("skipping %s: not a torch module (served by its own runtime)", description.name)
            continue
        results.append(export_role(description, out_dir, force))
    plans = [
        plan_role(roles[r.role], str(r.path.relative_to(out_dir)), tuple(sorted(initializer_names(r.path))))
        for r in results
    ]
    write_plans(plans, out_dir)
    manifest = {
        "exporter": EXPORTER_VERSION,
        "roles": {
            r.role: {**roles[r.role].manifest(), "onnx": str(r.path.relative_to(out_dir))} for r in results
        },
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return results
