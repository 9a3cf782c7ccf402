"""MTCNN face detection (box, score, 5 landmarks) as three engine roles plus the cascade.

Weights: the P/R/O-Net state dicts that ``facenet-pytorch`` ships (MIT licence), found on disk
without importing that package (it imports torchvision). The networks are defined here with the
parameter names of those state dicts; the cascade (image pyramid, NMS, box regression) runs in
numpy/torch around ``backend.infer`` calls, so the same code drives the torch and Triton backends.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from ..packages import package_dir

MEAN = 127.5
SCALE = 0.0078125


def facenet_weights_dir() -> Path:
    return package_dir("facenet_pytorch", "pip install --no-deps facenet-pytorch==2.6.0") / "data"


class PNet(nn.Module):
    """Proposal net: fully convolutional, 12x12 receptive field, stride 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, 3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, 3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, 3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(images)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return torch.softmax(self.conv4_1(x), dim=1), self.conv4_2(x)


def _flatten_hw(x: torch.Tensor) -> torch.Tensor:
    # The original (Caffe) weights were trained on W-major flattening.
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class RNet(nn.Module):
    """Refinement net on 24x24 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, 3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, 3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, 2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(faces)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu4(self.dense4(_flatten_hw(self.prelu3(self.conv3(x)))))
        return torch.softmax(self.dense5_1(x), dim=1), self.dense5_2(x)


class ONet(nn.Module):
    """Output net on 48x48 crops: score, box offsets and 5 landmarks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, 3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, 2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(faces)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu5(self.dense5(_flatten_hw(self.prelu4(self.conv4(x)))))
        return torch.softmax(self.dense6_1(x), dim=1), self.dense6_2(x), self.dense6_3(x)


def load_mtcnn_nets(weights_dir: Path | None = None) -> dict[str, nn.Module]:
    directory = weights_dir or facenet_weights_dir()
    nets: dict[str, nn.Module] = {"pnet": PNet(), "rnet": RNet(), "onet": ONet()}
    for name, net in nets.items():
        state = torch.load(directory / f"{name}.pt", map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        net.eval().requires_grad_(False)
    return nets


# ---- the cascade ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MtcnnOptions:
    min_face_size: int = 20
    scale_factor: float = 0.709
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    # Faces below this final score are dropped (ONet's threshold already applies).
    min_score: float = 0.9


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, best score first."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    x0, y0, x1, y1 = boxes.T
    areas = (x1 - x0 + 1) * (y1 - y0 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        w = np.maximum(0.0, np.minimum(x1[best], x1[rest]) - np.maximum(x0[best], x0[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y1[best], y1[rest]) - np.maximum(y0[best], y0[rest]) + 1)
        inter = w * h
        denom = np.minimum(areas[best], areas[rest]) if mode == "min" else areas[best] + areas[rest] - inter
        order = rest[inter / denom <= threshold]
    return np.asarray(keep, dtype=np.int64)


def square(boxes: np.ndarray) -> np.ndarray:
    """Grows each box to a square around its centre."""
    out = boxes.copy()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + w / 2 - side / 2
    out[:, 1] = boxes[:, 1] + h / 2 - side / 2
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def regress(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    return boxes + offsets * np.stack([w, h, w, h], axis=1)


def pyramid_scales(height: int, width: int, options: MtcnnOptions) -> list[float]:
    scale = 12.0 / options.min_face_size
    side = min(height, width) * scale
    scales = []
    while side >= 12:
        scales.append(scale)
        scale *= options.scale_factor
        side *= options.scale_factor
    return scales


def normalize(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 RGB to 1x3xHxW float in MTCNN's input range."""
    tensor = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
    return (tensor - MEAN) * SCALE


def crop_patches(image: np.ndarray, boxes: np.ndarray, size: int) -> torch.Tensor:
    """Square crops of ``boxes`` (zero-padded outside the image) resized to size x size."""
    height, width = image.shape[:2]
    patches = np.zeros((len(boxes), size, size, 3), np.uint8)
    for i, (x0, y0, x1, y1) in enumerate(np.round(boxes).astype(int)):
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width - 1), min(y1, height - 1)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        canvas = np.zeros((y1 - y0 + 1, x1 - x0 + 1, 3), np.uint8)
        canvas[cy0 - y0 : cy1 - y0 + 1, cx0 - x0 : cx1 - x0 + 1] = image[cy0 : cy1 + 1, cx0 : cx1 + 1]
        patches[i] = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA)
    return (torch.from_numpy(patches.astype(np.float32)).permute(0, 3, 1, 2) - MEAN) * SCALE
