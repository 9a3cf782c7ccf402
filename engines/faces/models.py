"""The face models and their engine role descriptions.

Default (offline, installed by ``make setup``):
* detector: MTCNN (``facenet-pytorch`` weights, MIT) as roles ``face_pnet``, ``face_rnet``,
  ``face_onet``; the cascade around them is :mod:`engines.faces.detect`.
* embedder: dlib's ResNet face descriptor (``face-recognition-models``, CC0) as role
  ``face_embedder``, on 150x150 chips aligned by dlib's 5-point predictor (CC0). dlib is not
  PyTorch: the role is a plain callable here and a python-backend model in Triton.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from easyphoto.imaging.geometry import Face
from easyphoto.rpc.errors import ModelMissing

from ..interface import Backend
from ..packages import package_dir
from ..roles.description import RoleDescription
from ..shapes import AxisRange, Dim, TensorSpec, sym
from .detect import SAME_PERSON_THRESHOLD, Aligner, Detector, FaceAnalyzer, MtcnnDetector
from .dlib_descriptor import RESNET_FILE, describe_chips, load_descriptor
from .fusion import FaceSwapper, OnnxFaceSwapper
from .mtcnn import load_mtcnn_nets
from .parts import (
    BiSeNetParser,
    GrabCutMatte,
    LanczosUpscaler,
    LandmarkParser,
    Matte,
    OnnxSaliencyMatte,
    OnnxSkinRetoucher,
    OnnxUpscaler,
    Parser,
    Retoucher,
    SkinSmoother,
    Upscaler,
)
from .pose import OnnxPoseEstimator, PoseEstimator

DLIB_CHIP = 150
DLIB_PADDING = 0.25
MAX_CROPS = 512


def face_recognition_models_dir() -> Path:
    # Found, not imported: the package imports pkg_resources, which current setuptools lacks.
    return package_dir("face_recognition_models", "pip install face-recognition-models==0.3.0") / "models"


class DlibEmbedder:
    """dlib's 128-d ResNet descriptor on aligned chips, returned L2-normalised."""

    def __init__(self, models_dir: Path | None = None) -> None:
        import dlib

        self.models_dir = models_dir or face_recognition_models_dir()
        self.net = load_descriptor(str(self.resnet_path))
        self.predictor = dlib.shape_predictor(str(self.models_dir / "shape_predictor_5_face_landmarks.dat"))

    @property
    def resnet_path(self) -> Path:
        return self.models_dir / RESNET_FILE

    def __call__(self, faces: torch.Tensor) -> tuple[torch.Tensor]:
        chips = faces.detach().to("cpu", torch.float32).numpy()
        return (torch.from_numpy(describe_chips(self.net, chips)),)

    def chip(self, image: np.ndarray, face: Face) -> np.ndarray:
        """The 150x150 chip dlib's descriptor expects (0..255 floats), aligned by its own 5-point
        predictor inside the detected box."""
        import dlib

        image = np.ascontiguousarray(image, dtype=np.uint8)  # dlib rejects strided views
        x0, y0, x1, y1 = (round(v) for v in face.box)
        shape = self.predictor(image, dlib.rectangle(x0, y0, x1, y1))
        chip = dlib.get_face_chip(image, shape, size=DLIB_CHIP, padding=DLIB_PADDING)
        return np.asarray(chip, dtype=np.float32)


@dataclass
class FaceModels:
    """A loaded set of face models: their role descriptions, the torch modules among them (which
    a backend moves to its device), and how to detect and align with them."""

    name: str
    roles: dict[str, RoleDescription]
    torch_modules: list[nn.Module]
    make_detector: Callable[[Backend], Detector]
    aligner: Aligner
    parser: Parser = field(default_factory=LandmarkParser)
    matte: Matte = field(default_factory=GrabCutMatte)
    upscaler: Upscaler = field(default_factory=LanczosUpscaler)
    retoucher: Retoucher = field(default_factory=SkinSmoother)
    # A learned face swapper replacing the classical warp of the fusion (None: the warp).
    swapper: FaceSwapper | None = None
    # A whole-body keypoint model for the openpose control (None: drawn from the 5 landmarks).
    pose: PoseEstimator | None = None
    # Cosine at or above which two faces count as one person (depends on the embedder).
    same_person_threshold: float = SAME_PERSON_THRESHOLD

    def analyzer(self, backend: Backend) -> FaceAnalyzer:
        return FaceAnalyzer(backend, self.make_detector(backend), self.aligner, self.same_person_threshold)

    @property
    def embedding_size(self) -> int:
        return int(self.roles["face_embedder"].outputs[0].shape[-1])  # type: ignore[arg-type]


def default_face_models() -> FaceModels:
    """MTCNN + dlib ResNet: real weights from installed packages, offline."""
    nets = load_mtcnn_nets()
    embedder = DlibEmbedder()
    return FaceModels(
        name="mtcnn+dlib-resnet-v1",
        roles=describe_face_roles(nets, embedder),
        torch_modules=list(nets.values()),
        make_detector=MtcnnDetector,
        aligner=embedder.chip,
    )


def load_face_models(
    pack: Path | None = None,
    parsing: Path | None = None,
    saliency: Path | None = None,
    enhancer: Path | None = None,
    swapper: Path | None = None,
    pose: Path | None = None,
    retoucher: Path | None = None,
) -> FaceModels:
    """The default models, or an insightface pack directory when one is given; optional ONNX files
    replace the classical face parsing (BiSeNet), saliency matte, Lanczos upscaling, the fusion's
    warp (an inswapper-style swapper, which needs the pack's 512-d ArcFace embeddings), the
    landmark-drawn pose (a DWPose-style whole-body keypoint model) and the bilateral skin smoothing
    (an image-to-image retoucher)."""
    if pack is None:
        models = default_face_models()
    else:
        from .insightface_pack import (
            ARCFACE_SAME_PERSON_THRESHOLD,
            ScrfdDetector,
            arcface_chip,
            describe_pack_roles,
            find_pack_files,
        )

        models = FaceModels(
            name=f"insightface:{pack}",
            roles=describe_pack_roles(find_pack_files(pack)),
            torch_modules=[],
            make_detector=ScrfdDetector,
            aligner=arcface_chip,
            same_person_threshold=ARCFACE_SAME_PERSON_THRESHOLD,
        )
    if parsing is not None:
        models.parser = BiSeNetParser(parsing)
    if saliency is not None:
        models.matte = OnnxSaliencyMatte(saliency)
    if enhancer is not None:
        models.upscaler = OnnxUpscaler(enhancer)
    if pose is not None:
        models.pose = OnnxPoseEstimator(pose)
    if retoucher is not None:
        models.retoucher = OnnxSkinRetoucher(retoucher)
    if swapper is not None:
        models.swapper = OnnxFaceSwapper(swapper)
        if models.embedding_size != models.swapper.embedding_size:
            raise ModelMissing(
                f"the face swapper {swapper} needs {models.swapper.embedding_size}-d ArcFace embeddings;"
                f" {models.name} gives {models.embedding_size}-d: give an insightface pack too",
                field="face_swapper",
            )
    return models


def pnet_side(side: int) -> int:
    """PNet's output size for an input side: conv 3, ceil-pool 2, conv 3, conv 3."""
    return math.ceil((side - 2) / 2) - 4


def describe_face_roles(nets: dict[str, nn.Module], embedder: DlibEmbedder) -> dict[str, RoleDescription]:
    batch = sym("batch")
    height, width = sym("image_height"), sym("image_width")
    crops = {"batch": AxisRange(1, 32, MAX_CROPS)}

    def net(name: str) -> Callable[[], nn.Module]:
        return lambda: nets[name]

    def crop_role(name: str, size: int, outputs: tuple[TensorSpec, ...]) -> RoleDescription:
        return RoleDescription(
            name=f"face_{name}",
            inputs=(TensorSpec("faces", "float32", (batch, 3, size, size)),),
            outputs=outputs,
            axes=crops,
            build_module=net(name),
            fp16=False,
        )

    probs, offsets = TensorSpec("probs", "float32", (batch, 2)), TensorSpec("offsets", "float32", (batch, 4))
    pnet_h, pnet_w = Dim("pnet_height"), Dim("pnet_width")
    return {
        "face_pnet": RoleDescription(
            name="face_pnet",
            inputs=(TensorSpec("images", "float32", (batch, 3, height, width)),),
            outputs=(
                TensorSpec("probs", "float32", (batch, 2, pnet_h, pnet_w)),
                TensorSpec("offsets", "float32", (batch, 4, pnet_h, pnet_w)),
            ),
            axes={
                "batch": AxisRange(1, 1, 1),
                "image_height": AxisRange(12, 480, 4096),
                "image_width": AxisRange(12, 640, 4096),
            },
            derived={
                "pnet_height": lambda v: pnet_side(v["image_height"]),
                "pnet_width": lambda v: pnet_side(v["image_width"]),
            },
            build_module=net("pnet"),
            fp16=False,
        ),
        "face_rnet": crop_role("rnet", 24, (probs, offsets)),
        "face_onet": crop_role("onet", 48, (probs, offsets, TensorSpec("landmarks", "float32", (batch, 10)))),
        "face_embedder": RoleDescription(
            name="face_embedder",
            inputs=(TensorSpec("faces", "float32", (batch, 3, DLIB_CHIP, DLIB_CHIP)),),
            outputs=(TensorSpec("embeddings", "float32", (batch, 128)),),
            axes={"batch": AxisRange(1, 8, 64)},
            build_module=lambda: embedder,
            fp16=False,
            sample_ranges={"faces": (0.0, 255.0)},
        ),
    }
