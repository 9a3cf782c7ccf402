"""The whole-body keypoint model's signature (DWPose / RTMPose: SimCC logits) decoded into
OpenPose's layout, and where the pose source comes from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fake_models import write_pose_model

from easyphoto.cli.main import build_parser
from easyphoto.cli.service_args import service_settings
from easyphoto.engines.faces.models import load_face_models
from easyphoto.engines.faces.pose import OnnxPoseEstimator


def _crop_point(k: int) -> np.ndarray:
    """Where the fake model puts COCO point ``k`` in its 288x384 crop."""
    return np.array([10.0 + k, 20.0 + 2 * k])


def test_simcc_peaks_map_back_through_the_padded_person_box(tmp_path: Path) -> None:
    estimator = OnnxPoseEstimator(write_pose_model(tmp_path / "dw-ll_ucoco_384.onnx", unseen=(3, 100)))
    image = np.zeros((500, 600, 3), np.uint8)
    # 230.4 x 307.2 grown 1.25x is the model's 288 x 384: one image pixel per crop pixel.
    box = (100.0, 50.0, 330.4, 357.2)
    pose = estimator(image, box)
    centre = np.array([215.2, 203.6])

    def expected(k: int) -> np.ndarray:
        return _crop_point(k) - np.array([144.0, 192.0]) + centre

    assert np.allclose(pose.body[0], expected(0), atol=1e-3)  # the nose
    assert np.allclose(pose.body[2], expected(6), atol=1e-3)  # right shoulder: COCO's 6
    assert np.allclose(pose.body[14], expected(2), atol=1e-3)  # right eye: COCO's 2
    assert np.allclose(pose.body[1], (expected(5) + expected(6)) / 2, atol=1e-3)  # the neck
    assert np.isnan(pose.body[17]).all()  # left ear, COCO's 3, peaked below 0.3
    assert len(pose.face) == 68 and np.allclose(pose.face[0], expected(23), atol=1e-3)
    left, right = pose.hands
    assert np.allclose(left[0], expected(91), atol=1e-3) and np.allclose(right[20], expected(132), atol=1e-3)
    assert np.isnan(left[9]).all()  # COCO's 100


def test_a_box_off_the_models_aspect_is_widened_or_heightened(tmp_path: Path) -> None:
    estimator = OnnxPoseEstimator(write_pose_model(tmp_path / "rtmpose_body.onnx", points=17))
    pose = estimator(np.zeros((300, 500, 3), np.uint8), (0.0, 0.0, 400.0, 100.0))
    # 500 x 125 after the padding, heightened to 500 x 666.7: 0.576 crop pixels per image pixel.
    expected = (_crop_point(0) - np.array([144.0, 192.0])) / 0.576 + np.array([200.0, 50.0])
    assert np.allclose(pose.body[0], expected, atol=1e-2)
    assert pose.hands == () and len(pose.face) == 0  # a body-only model


class OneOutput(torch.nn.Module):
    def forward(self, crop: torch.Tensor) -> torch.Tensor:
        return crop.mean(dim=(2, 3))


def test_a_model_without_the_signature_is_refused_and_the_flag_loads_one(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.onnx"
    torch.onnx.export(OneOutput(), (torch.zeros(1, 3, 384, 288),), str(wrong), opset_version=17, dynamo=False)
    with pytest.raises(ValueError, match="SimCC"):
        OnnxPoseEstimator(wrong)
    path = write_pose_model(tmp_path / "dw-ll_ucoco_384.onnx")
    args = build_parser().parse_args(["serve", "--pose-model", str(path)])
    faces = service_settings(args)["faces"]
    assert faces.pose == path
    assert isinstance(load_face_models(pose=faces.pose).pose, OnnxPoseEstimator)
