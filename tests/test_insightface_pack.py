"""An insightface pack directory (ONNX files with the packs' signatures, random weights) loads
through the same roles as the default face models; SCRFD decoding is checked on known outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from easyphoto.engines.backends.torch_backend import TorchBackend
from easyphoto.engines.faces.insightface_pack import SCRFD_SIZE, ScrfdDetector, find_pack_files
from easyphoto.engines.faces.models import load_face_models
from easyphoto.fixtures.photos import sample_photo
from easyphoto.rpc.errors import EngineUnavailable

STRIDES = (8, 16, 32)


class FakeScrfd(nn.Module):
    """SCRFD's signature: one image in; per stride, scores (N,1), box distances (N,4), landmark
    offsets (N,10) with N = (H/s)(W/s)*2 anchors, rows ordered (y, x, anchor)."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Conv2d(3, 2 * 15, 1) for _ in STRIDES)
        self.pools = nn.ModuleList(nn.AvgPool2d(s) for s in STRIDES)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        groups: list[list[torch.Tensor]] = [[], [], []]
        for pool, head in zip(self.pools, self.heads, strict=True):
            rows = head(pool(image)).permute(0, 2, 3, 1).reshape(-1, 15)
            groups[0].append(torch.sigmoid(rows[:, :1]))
            groups[1].append(rows[:, 1:5])
            groups[2].append(rows[:, 5:15])
        return tuple(t for group in groups for t in group)


class FakeArcFace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(8)
        self.fc = nn.Linear(3 * 64, 512)

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(faces).flatten(1))


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("buffalo_fake")
    torch.manual_seed(0)
    names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in STRIDES]
    torch.onnx.export(
        FakeScrfd(),
        (torch.zeros(1, 3, SCRFD_SIZE, SCRFD_SIZE),),
        str(directory / "det_10g.onnx"),
        input_names=["input.1"],
        output_names=names,
        dynamic_axes={"input.1": {2: "h", 3: "w"}, **{n: {0: "n"} for n in names}},
        opset_version=17,
        dynamo=False,
    )
    torch.onnx.export(
        FakeArcFace(),
        (torch.zeros(1, 3, 112, 112),),
        str(directory / "w600k_r50.onnx"),
        input_names=["input.1"],
        output_names=["embedding"],
        dynamic_axes={"input.1": {0: "None"}, "embedding": {0: "None"}},
        opset_version=17,
        dynamo=False,
    )
    _rename_output(directory / "w600k_r50.onnx", "embedding", "683")  # the pack's numeric name
    return directory


def _rename_output(path: Path, old: str, new: str) -> None:
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        node.output[:] = [new if name == old else name for name in node.output]
    for output in model.graph.output:
        if output.name == old:
            output.name = new
    onnx.save(model, str(path))


def test_pack_files_are_recognised_by_signature(pack: Path) -> None:
    files = find_pack_files(pack)
    assert files.detector.name == "det_10g.onnx" and files.recognizer.name == "w600k_r50.onnx"
    with pytest.raises(EngineUnavailable):
        find_pack_files(pack / "missing")


def test_pack_loads_through_the_same_roles(pack: Path) -> None:
    models = load_face_models(pack)
    backend = TorchBackend(faces=models, device="cpu")
    assert {"face_detector", "face_embedder"} <= set(backend.roles)
    detector = backend.roles["face_detector"]
    assert detector.inputs[0].name == "input.1"
    shapes = detector.shapes("opt")
    assert shapes["score_8"] == ((SCRFD_SIZE // 8) ** 2 * 2, 1)
    assert shapes["kps_32"] == ((SCRFD_SIZE // 32) ** 2 * 2, 10)
    analyzer = models.analyzer(backend)
    image = sample_photo("astronaut")
    faces = analyzer.detect(image)  # random weights: any number of faces, all inside the image
    assert all(0 <= f.box[0] <= f.box[2] <= 512 and f.landmarks.shape == (5, 2) for f in faces)
    from easyphoto.imaging.geometry import Face

    face = Face(
        (180, 60, 270, 175),
        1.0,
        np.array([[203, 100], [246, 103], [224, 127], [200, 138], [244, 142]], np.float32),
    )
    embedding = analyzer.embed(image, [face])
    assert embedding.shape == (1, 512)
    assert np.isclose(np.linalg.norm(embedding[0]), 1.0, atol=1e-5)


class KnownOutputs:
    """A backend whose detector returns one confident anchor at a known place."""

    def __init__(self, roles: dict) -> None:
        self.roles = roles

    def infer(self, role: str, inputs: dict) -> dict:
        description = self.roles[role]
        shapes = description.shapes("opt")
        out = {spec.name: torch.zeros(shapes[spec.name]) for spec in description.outputs}
        grid = SCRFD_SIZE // 8
        row = (20 * grid + 10) * 2  # cell x=10, y=20, first anchor
        out["score_8"][row, 0] = 0.9
        out["bbox_8"][row] = torch.tensor([2.0, 3.0, 4.0, 5.0])
        out["kps_8"][row] = torch.arange(10, dtype=torch.float32) / 10
        return out


def test_scrfd_decoding_of_known_outputs(pack: Path) -> None:
    roles = load_face_models(pack).roles
    image = np.zeros((320, 320, 3), np.uint8)  # scaled x2 into the 640 canvas
    faces = ScrfdDetector(KnownOutputs(roles))(image)  # type: ignore[arg-type]
    assert len(faces) == 1
    cx, cy = 10 * 8, 20 * 8
    expected = np.array([cx - 16, cy - 24, cx + 32, cy + 40]) / 2
    assert np.allclose(faces[0].box, expected)
    assert faces[0].score == pytest.approx(0.9)
    offsets = (np.arange(10, dtype=np.float32) / 10 * 8).reshape(5, 2)
    assert np.allclose(faces[0].landmarks, (np.array([cx, cy]) + offsets) / 2)


def test_each_face_model_option_sets_its_own_field() -> None:
    """The options users pass (their names are the interface) land in the field each names."""
    from easyphoto.cli.main import build_parser
    from easyphoto.cli.service_args import service_settings
    from easyphoto.engines.faces.paths import FaceModelPaths

    fields = {
        "--face-models": "pack", "--face-parsing": "parsing", "--face-saliency": "saliency",
        "--face-enhancer": "enhancer", "--face-swapper": "swapper", "--pose-model": "pose",
        "--skin-retoucher": "retoucher",
    }  # fmt: skip
    argv = ["trainer", *(part for option in fields for part in (option, f"{option[2:]}.onnx"))]
    given = FaceModelPaths(**{field: Path(f"{option[2:]}.onnx") for option, field in fields.items()})
    assert service_settings(build_parser().parse_args(argv))["faces"] == given


def test_both_services_take_the_same_face_model_options(pack: Path, tmp_path: Path) -> None:
    from easyphoto.cli.main import build_parser
    from easyphoto.cli.service_args import service_settings
    from easyphoto.engines.faces.paths import FaceModelPaths
    from easyphoto.server.app import EngineHolder, ServerConfig
    from easyphoto.trainer.app import TrainerConfig, build_trainer

    for command in ("serve", "trainer"):
        args = build_parser().parse_args([command, "--face-models", str(pack), "--face-enhancer", "up.onnx"])
        assert service_settings(args)["faces"] == FaceModelPaths(pack=pack, enhancer=Path("up.onnx"))
    faces = FaceModelPaths(pack=pack)
    orchestrator = EngineHolder(ServerConfig(data=tmp_path, faces=faces)).load()
    trainer = build_trainer(TrainerConfig(port=0, data=tmp_path, faces=faces, metrics_port=None))
    try:
        assert orchestrator.face_models.name == f"insightface:{pack}"
        assert trainer.runner.config.face_models.name == f"insightface:{pack}"
        assert "face_detector" in orchestrator.engines.roles  # SCRFD, in place of MTCNN's three nets
    finally:
        trainer.store.close()
