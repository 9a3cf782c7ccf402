"""Where a service finds its face models, and the command-line option of each (light to import:
the command line builds its options from it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from easyphoto.rpc.errors import ModelMissing

if TYPE_CHECKING:
    from .models import FaceModels


@dataclass(frozen=True)
class FaceModelPaths:
    """Where a service finds its face models: an insightface pack instead of MTCNN + dlib, and
    ONNX files that replace the classical face parsing, saliency matte, upscaling and skin
    smoothing. The trainer and the orchestrator should be given the same ones, so that both score
    identity alike."""

    pack: Path | None = None
    parsing: Path | None = None
    saliency: Path | None = None
    enhancer: Path | None = None
    swapper: Path | None = None
    pose: Path | None = None
    retoucher: Path | None = None

    # The command-line option that sets each field: cli/service_args.py makes them from this.
    OPTIONS: ClassVar[dict[str, str]] = {
        "pack": "--face-models",
        "parsing": "--face-parsing",
        "saliency": "--face-saliency",
        "enhancer": "--face-enhancer",
        "swapper": "--face-swapper",
        "pose": "--pose-model",
        "retoucher": "--skin-retoucher",
    }

    def load(self) -> FaceModels:
        """The models; ModelMissing naming the option and the file when a given path is not there."""
        for name, option in self.OPTIONS.items():
            path = getattr(self, name)
            if path is not None and not path.exists():
                raise ModelMissing(f"{option}: {path} does not exist", field=option.lstrip("-"))
        from .models import load_face_models  # torch and the models: not at a command's start

        return load_face_models(
            self.pack, self.parsing, self.saliency, self.enhancer, self.swapper, self.pose, self.retoucher
        )
