"""Small ONNX files with the signatures of real models the operator may give (random or known
answers, built here because no weights can be downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn


class InvertingSwapper(nn.Module):
    """inswapper's signature with a known answer: the aligned face inverted, scaled by the first
    entry of the mapped embedding (1 for the identity the test's ``emap`` maps onto axis 0)."""

    def forward(self, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        return (1.0 - target) * source[:, :1, None, None]


def write_swapper(path: Path, emap: np.ndarray) -> Path:
    """An inswapper-shaped ONNX (``target`` 1x3x128x128, ``source`` 1x512 in, 1x3x128x128 out)
    whose last initializer is ``emap``, where insightface reads the embedding map from."""
    torch.onnx.export(
        InvertingSwapper(), (torch.zeros(1, 3, 128, 128), torch.zeros(1, 512)), str(path),
        input_names=["target", "source"], output_names=["output"], opset_version=17, dynamo=False,
    )  # fmt: skip
    model = onnx.load(str(path))
    model.graph.initializer.append(onnx.numpy_helper.from_array(emap.astype(np.float32), "emap"))
    onnx.save(model, str(path))
    return path


class PeakedSimcc(nn.Module):
    """DWPose's signature with a known answer: point k peaks at x = 10 + k, y = 20 + 2k of the
    384x288 crop (split ratio 2), with the logit 1; the points in ``unseen`` peak at 0.1."""

    def __init__(self, points: int = 133, unseen: tuple[int, ...] = ()) -> None:
        super().__init__()
        x, y = torch.zeros(1, points, 576), torch.zeros(1, points, 768)
        for k in range(points):
            peak = 0.1 if k in unseen else 1.0
            x[0, k, 2 * (10 + k)], y[0, k, 2 * (20 + 2 * k)] = peak, peak
        self.register_buffer("x", x)
        self.register_buffer("y", y)

    def forward(self, crop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        touch = crop.mean() * 0  # keeps the input in the graph
        return self.x + touch, self.y + touch


def write_pose_model(path: Path, points: int = 133, unseen: tuple[int, ...] = ()) -> Path:
    torch.onnx.export(
        PeakedSimcc(points, unseen), (torch.zeros(1, 3, 384, 288),), str(path),
        input_names=["input"], output_names=["simcc_x", "simcc_y"], opset_version=17, dynamo=False,
    )  # fmt: skip
    return path
