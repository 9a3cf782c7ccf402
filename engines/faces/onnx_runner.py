"""Running a role whose implementation is an ONNX file (insightface packs, BiSeNet, enhancers).

The description is read from the file's own signature, so names and shapes are the model's;
onnxruntime runs it in process (CPU), Triton serves the same file on a deploy host.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ..roles.description import RoleDescription
from ..shapes import DTYPES, AxisRange, DType, TensorSpec

# onnxruntime's type strings back to declared dtypes.
ONNX_DTYPES: dict[str, DType] = {names.onnx: dtype for dtype, names in DTYPES.items()}


class OnnxRunner:
    def __init__(self, path: Path) -> None:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feed = {name: t.detach().cpu().numpy() for name, t in zip(self.input_names, inputs, strict=True)}
        return tuple(torch.from_numpy(np.asarray(o)) for o in self.session.run(self.output_names, feed))


def signature(runner: OnnxRunner) -> tuple[list[tuple[str, str, list]], list[tuple[str, str, list]]]:
    """(name, dtype, shape) of each input and output as the file declares them."""

    def spec(items: list) -> list[tuple[str, str, list]]:
        return [(i.name, ONNX_DTYPES.get(i.type, "float32"), list(i.shape)) for i in items]

    return spec(runner.session.get_inputs()), spec(runner.session.get_outputs())


def onnx_role(
    name: str,
    runner: OnnxRunner,
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    axes: dict[str, AxisRange],
    derived: dict[str, Callable[[dict[str, int]], int]] | None = None,
) -> RoleDescription:
    return RoleDescription(
        name=name,
        inputs=inputs,
        outputs=outputs,
        axes=axes,
        build_module=lambda: runner,
        fp16=False,
        derived=derived or {},
    )
