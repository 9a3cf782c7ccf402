"""Validation of a LoRA checkpoint (MISSION.md §1.8): inpaint the face of a few validation templates
with the job's current weights and a canny ControlNet, and score each output's face against the
training faces (mean dot with their embeddings)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from easyphoto.diffusion.inpaint import InpaintPass, StepEvent, run_inpaint
from easyphoto.engines.backends.torch_backend import TorchBackend
from easyphoto.engines.faces.detect import FaceAnalyzer
from easyphoto.engines.interface import ControlInput, Engines
from easyphoto.engines.models.family import ModelFamily
from easyphoto.imaging.codec import encode_png, from_model, to_model
from easyphoto.imaging.controls import canny_control
from easyphoto.imaging.geometry import Face, fit_size, grow_box, int_box, resize

from .lora_training import step_generator
from .options import TrainingOptions

SCHEDULER = "dpm_solver"


@dataclass
class ValidationImage:
    step: int
    template: int
    score: float
    path: str  # relative to the job folder

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Template:
    image: np.ndarray
    face: Face
    mask: np.ndarray


class Validator:
    def __init__(
        self,
        family: ModelFamily,
        analyzer: FaceAnalyzer,
        crops: list[np.ndarray],
        crop_faces: list[Face],
        embeddings: np.ndarray,
        options: TrainingOptions,
        seed: int,
        device: str,
    ) -> None:
        self.family = family
        self.analyzer = analyzer
        self.options = options
        self.seed = seed
        # fp32 like the training weights (autocast gives training its fp16 on CUDA).
        self.backend = TorchBackend(family, device, dtype=torch.float32)
        self.target = embeddings.mean(axis=0)  # dot with it = the mean dot with every training face
        count = options.validation_templates
        self.templates = [
            self._template(crops[k % len(crops)], crop_faces[k % len(crops)]) for k in range(count)
        ]
        self.warnings = (
            [] if "canny" in family.controlnets else ["no canny ControlNet: validating without it"]
        )

    def template_face(self, index: int) -> Face:
        """Where the face is in validation image ``index`` (the outputs keep the template's geometry)."""
        return self.templates[index].face

    def _template(self, crop: np.ndarray, face: Face) -> Template:
        low, _, high = self.family.image_sizes
        side = min(max(self.options.resolution, low), high)
        height, width = crop.shape[:2]
        size = fit_size(width, height, side, self.family.image_multiple, high)
        scale = np.array([size[0] / width, size[1] / height])
        box = np.array(face.box).reshape(2, 2) * scale
        scaled = Face(tuple(box.ravel()), face.score, face.landmarks * scale)
        mask = np.zeros((size[1], size[0]), np.uint8)
        x0, y0, x1, y1 = int_box(grow_box(scaled.box, self.options.validation_mask_scale, size[0], size[1]))
        mask[y0:y1, x0:x1] = 255
        return Template(resize(crop, *size), scaled, mask)

    def run(
        self,
        step: int,
        job_folder: Path,
        raise_if_stopped: Callable[[], None] = lambda: None,
        on_step: Callable[[StepEvent], None] | None = None,
    ) -> list[ValidationImage]:
        """Scores every template at ``step``; the outputs go to ``job_folder/validation/``."""
        engines = Engines(self.backend, self.family.tokenizer, float(self.family.vae.config.scaling_factor))
        embeds = engines.encode_prompts([self.options.caption, ""])  # a fresh cache: the encoder trains
        (job_folder / "validation").mkdir(parents=True, exist_ok=True)
        results = []
        for index, template in enumerate(self.templates):
            inpaint = InpaintPass(
                image=to_model(template.image),
                mask=to_model(template.mask, signed=False),
                prompt_embeds=embeds[:1],
                negative_prompt_embeds=embeds[1:],
                controls=self.controls(index),
                steps=self.options.validation_steps,
                strength=self.options.validation_strength,
                guidance_scale=self.options.validation_guidance_scale,
                scheduler=SCHEDULER,
                generator=step_generator(self.seed, step, 1000 + index),
                on_step=on_step,
                raise_if_stopped=raise_if_stopped,
            )
            output = from_model(run_inpaint(engines, inpaint, self.family.scheduler_config))
            name = f"validation/step-{step:06d}-{index}.png"
            (job_folder / name).write_bytes(encode_png(output))
            results.append(ValidationImage(step, index, self.score(output, index), name))
        return results

    def controls(self, index: int) -> list[ControlInput]:
        """Template ``index``'s ControlNet inputs: its canny edges at weight 1 (none without a
        canny ControlNet)."""
        if "canny" not in self.family.controlnets:
            return []
        image = self.templates[index].image
        return [ControlInput("canny", to_model(canny_control(image), signed=False), 1.0)]

    def score(self, image: np.ndarray, index: int) -> float:
        """The face of an output of template ``index`` against the training faces."""
        return self.analyzer.identity(image, self.templates[index].face, self.target)
