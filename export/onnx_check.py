"""An exported graph checked against its PyTorch module, with polygraphy's comparator (as NVIDIA's
diffusion demo checks its engines): onnxruntime (polygraphy's runner, CPU) and the role's module (a
runner of ours: polygraphy's own PyTorch runner moves every input to CUDA) on the same feed, each
output compared with an absolute tolerance.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator
from polygraphy.logger import G_LOGGER

from easyphoto.engines.roles.description import RoleDescription
from easyphoto.engines.shapes import DTYPES


class TorchRoleRunner(BaseRunner):
    """A polygraphy runner over a role's module: CPU, fp32, inputs positional in declared order."""

    def __init__(self, description: RoleDescription, module: Callable[..., tuple[torch.Tensor, ...]]) -> None:
        super().__init__(name=f"torch-{description.name}")
        self.description = description
        self.module = module

    def activate_impl(self) -> None:
        """Nothing to load: the module is in memory."""

    def deactivate_impl(self) -> None:
        """Nothing to release."""

    def get_input_metadata_impl(self) -> TensorMetadata:
        metadata = TensorMetadata()
        for spec in self.description.inputs:
            shape = [d if isinstance(d, int) else d.name for d in spec.shape]
            metadata.add(spec.name, DTYPES[spec.dtype].numpy, shape)
        return metadata

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        inputs = [torch.from_numpy(feed_dict[spec.name]) for spec in self.description.inputs]
        started = time.perf_counter()
        with torch.no_grad():
            outputs = self.module(*inputs)
        self.inference_time = time.perf_counter() - started  # read by polygraphy's comparator
        names = (spec.name for spec in self.description.outputs)
        return OrderedDict((name, out.numpy()) for name, out in zip(names, outputs, strict=True))


@dataclass(frozen=True)
class GraphTolerance:
    """A graph to check, and within what on each feed (in the feeds' order; a graph with fewer
    tolerances than feeds is not checked on the rest): the largest |difference| over its outputs,
    or that divided by max(1, max |PyTorch output|) of each output when ``relative`` (fp16)."""

    graph: Path
    tolerances: tuple[float, ...]
    relative: bool = False


@dataclass(frozen=True)
class GraphCheck:
    graph: Path
    difference: float
    tolerance: float
    passed: bool


def check_graphs(
    description: RoleDescription,
    module: Callable[..., tuple[torch.Tensor, ...]],
    graphs: list[GraphTolerance],
    samples: list[dict[str, torch.Tensor]],
) -> list[list[GraphCheck]]:
    """Runs each graph in onnxruntime and the module in PyTorch on every sample (one onnxruntime
    session a graph: building one takes seconds on a UNet-sized graph), and compares each graph's
    outputs with PyTorch's within its tolerance for that sample; per graph, a check per tolerance."""
    feeds = [{spec.name: sample[spec.name].numpy() for spec in description.inputs} for sample in samples]
    runners = [
        OnnxrtRunner(SessionFromOnnx(str(g.graph), providers=["CPUExecutionProvider"])) for g in graphs
    ]
    runners.append(TorchRoleRunner(description, module))
    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        results = Comparator.run(runners, data_loader=feeds)
    expected = results[-1][1]  # the PyTorch runner's outputs, one per feed
    checks = []
    for index, graph in enumerate(graphs):
        outputs = results[index][1]
        per_feed = []
        for feed, tolerance in enumerate(graph.tolerances):
            difference = max(
                float(np.max(np.abs(outputs[feed][name].astype(np.float64) - value)))
                / (max(1.0, float(np.max(np.abs(value)))) if graph.relative else 1.0)
                for name, value in expected[feed].items()
            )
            per_feed.append(GraphCheck(graph.graph, difference, tolerance, difference <= tolerance))
        checks.append(per_feed)
    return checks
