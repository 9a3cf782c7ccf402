"""The EasyPhoto generation loop for one template (MISSION.md §2 steps 1–9 per face).

For each face, left to right, matched to the requested user ids (``""`` skips a face): paint the
other faces white, crop the face box × 3, resize, re-detect, build the pose source from the user's
face-id image, fuse the reference face in, inpaint (pass 1), shift colour, fuse again, repaint the
ring + eyes + lips (pass 2), shift colour, paste back feathered, and score the identity.
Control images are computed once per pass; every model call goes through the engines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from easyphoto.engines.errors import InvalidArgument
from easyphoto.engines.faces.detect import Face, FaceAnalyzer
from easyphoto.engines.faces.models import FaceModels
from easyphoto.engines.faces.parts import fuse_faces
from easyphoto.engines.imaging import (
    FACE_PARTS,
    canny_control,
    color_control,
    draw_pose,
    feather,
    fit_size,
    from_model,
    grow_box,
    inpaint_mask,
    int_box,
    paint_boxes_white,
    paste_back,
    resize,
    ring_mask,
    similarity_transform,
    tile_control,
    to_model,
    transfer_color,
    transform_points,
    union,
)
from easyphoto.engines.inpaint import InpaintRequest, StepEvent, run_inpaint
from easyphoto.engines.interface import ControlInput, Engines
from easyphoto.engines.lora import LoraWeights, load_lora

from .options import GenerateOptions, PassOptions
from .users import UserArtifacts, UserStore

log = logging.getLogger(__name__)

MAX_FACES = 16
LORA_CACHE = 8
MIN_FACE_SIZE = 16.0


@dataclass
class Progress:
    stage: str
    face_index: int
    step: int
    total_steps: int
    elapsed: float


@dataclass
class FaceOutcome:
    user_id: str
    face: Face
    identity_score: float | None


@dataclass
class Generation:
    image: np.ndarray
    faces: list[FaceOutcome]
    seed: int
    timings: dict[str, float] = field(default_factory=dict)
    intermediates: list[tuple[str, np.ndarray]] = field(default_factory=list)


@dataclass
class _Reference:
    """A user's images with their detected faces (computed once per request and user)."""

    artifacts: UserArtifacts
    face_id_face: Face
    reference_face: Face
    embedding: np.ndarray
    lora: LoraWeights | None


class Orchestrator:
    def __init__(
        self,
        engines: Engines,
        scheduler_config: dict,
        face_models: FaceModels,
        analyzer: FaceAnalyzer,
        users: UserStore,
    ) -> None:
        self.engines = engines
        self.scheduler_config = scheduler_config
        self.face_models = face_models
        self.analyzer = analyzer
        self.users = users
        self._loras: dict[tuple[str, int], LoraWeights] = {}

    # ---- the request ----

    def generate(
        self,
        template: np.ndarray,
        user_ids: list[str],
        options: GenerateOptions,
        seed: int,
        on_progress: Callable[[Progress], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        field: str = "templates[0]",
    ) -> Generation:
        started = time.perf_counter()
        timings: dict[str, float] = {}
        faces = self.analyzer.detect_checked(template, field, MAX_FACES, MIN_FACE_SIZE)
        if len(user_ids) > len(faces):
            raise InvalidArgument(
                f"{len(user_ids)} user ids for {len(faces)} faces in {field}", field="user_ids"
            )
        references = {uid: self._reference(uid) for uid in dict.fromkeys(user_ids) if uid}
        timings["detect"] = time.perf_counter() - started
        generator = torch.Generator().manual_seed(seed)
        result = template.copy()
        outcomes: list[FaceOutcome] = []
        intermediates: list[tuple[str, np.ndarray]] = []
        for index, face in enumerate(faces):
            user_id = user_ids[index] if index < len(user_ids) else ""
            if not user_id:
                outcomes.append(FaceOutcome("", face, None))
                continue
            others = [f.box for j, f in enumerate(faces) if j != index]
            context = _FaceContext(index, on_progress, should_stop, started, timings, intermediates, options)
            switched = time.perf_counter()
            self.engines.set_lora(references[user_id].lora, options.lora_weight)
            timings["lora_switch"] = timings.get("lora_switch", 0.0) + time.perf_counter() - switched
            try:
                result = self._paint_face(
                    result, others, face, references[user_id], options, generator, context
                )
            finally:
                self.engines.set_lora(None)
            score = self._score(result, face, references[user_id])
            outcomes.append(FaceOutcome(user_id, face, score))
        timings["total"] = time.perf_counter() - started
        return Generation(result, outcomes, seed, timings, intermediates)

    def _reference(self, user_id: str) -> _Reference:
        artifacts = self.users.load(user_id)
        face_id_face = self.analyzer.largest(artifacts.face_id, field=f"users/{user_id}/face_id")
        reference_face = self.analyzer.largest(artifacts.reference, field=f"users/{user_id}/reference")
        embedding = self.analyzer.embed(artifacts.reference, [reference_face])[0]
        return _Reference(artifacts, face_id_face, reference_face, embedding, self._lora(artifacts))

    def _lora(self, artifacts: UserArtifacts) -> LoraWeights | None:
        path = artifacts.lora_path
        if not path.is_file():
            log.warning(
                "user %s v%d has no LoRA file; painting with the base model",
                artifacts.user_id,
                artifacts.version,
            )
            return None
        key = (str(path), path.stat().st_mtime_ns)
        if key not in self._loras:
            self._loras[key] = load_lora(path, self.engines.backend.lora_modules())
            while len(self._loras) > LORA_CACHE:
                self._loras.pop(next(iter(self._loras)))
        return self._loras[key]

    def _score(self, image: np.ndarray, face: Face, reference: _Reference) -> float:
        """dot(emb(output face), emb(reference)); the face is re-detected near where it was."""
        found = [f for f in self.analyzer.detect(image) if _overlap(f.box, face.box) > 0.3]
        target = max(found, key=lambda f: _overlap(f.box, face.box)) if found else face
        return float(self.analyzer.embed(image, [target])[0] @ reference.embedding)

    # ---- one face ----

    def _paint_face(
        self,
        image: np.ndarray,
        other_boxes: list,
        face: Face,
        reference: _Reference,
        options: GenerateOptions,
        generator: torch.Generator,
        ctx: _FaceContext,
    ) -> np.ndarray:
        height, width = image.shape[:2]
        working = paint_boxes_white(image, other_boxes)
        box = (
            grow_box(face.box, options.crop_scale, width, height)
            if options.crop_face
            else (0, 0, width, height)
        )
        x0, y0, x1, y1 = int_box(box)
        crop_w, crop_h = fit_size(
            x1 - x0,
            y1 - y0,
            min(options.crop_short_side, self.engines.max_image_side),
            self.engines.image_multiple,
        )
        if max(crop_w, crop_h) > self.engines.max_image_side:
            shrink = self.engines.max_image_side / max(crop_w, crop_h)
            crop_w, crop_h = fit_size(
                round(crop_w * shrink), round(crop_h * shrink), 1, self.engines.image_multiple
            )
        crop = resize(working[y0:y1, x0:x1], crop_w, crop_h)
        crop_face = self.analyzer.largest(crop, field="templates")
        parts = self.face_models.parser(crop, crop_face)
        face_mask = union([parts[p] for p in FACE_PARTS if p != "lips"])
        ctx.keep("crop", crop)

        pose = self._pose_source(crop, crop_face, reference)
        ctx.keep("openpose", pose)
        fused = crop
        if options.fusion_before:
            fused = fuse_faces(
                crop,
                crop_face,
                reference.artifacts.reference,
                reference.reference_face,
                parts,
                options.fusion_before_ratio,
            )
        ctx.keep("fusion_before", fused)
        mask = inpaint_mask(parts, crop_face.width)
        ctx.keep("inpaint_mask", mask)
        painted = fused
        if options.first_pass.enabled:
            painted = self._diffuse(
                "first_diffusion", fused, mask, options.first_pass, options, generator, ctx, pose
            )
            ctx.keep("first_diffusion", painted)
        if options.color_shift:
            painted = transfer_color(painted, crop, face_mask)
        if options.fusion_after:
            painted = fuse_faces(
                painted,
                crop_face,
                reference.artifacts.reference,
                reference.reference_face,
                parts,
                options.fusion_after_ratio,
            )
        if options.second_pass.enabled:
            ring = ring_mask(parts, crop_face.width)
            ctx.keep("second_mask", ring)
            painted = self._diffuse(
                "second_diffusion", painted, ring, options.second_pass, options, generator, ctx, pose
            )
            ctx.keep("second_diffusion", painted)
        if options.color_shift:
            without_lips = cv2.subtract(face_mask, parts["lips"])
            painted = transfer_color(painted, crop, without_lips)
        back = resize(painted, x1 - x0, y1 - y0)
        # Only the repainted face changes: blend through the feathered mask, then into the template.
        region_mask = resize(cv2.dilate(mask, np.ones((3, 3), np.uint8)), x1 - x0, y1 - y0)
        alpha = feather(region_mask, max(1, round(face.width / 20)))[..., None]
        original = image[y0:y1, x0:x1]
        blended = (back * alpha + original * (1 - alpha)).round().astype(np.uint8)
        return paste_back(image, blended, (x0, y0, x1, y1), feather_px=0)

    def _pose_source(self, crop: np.ndarray, crop_face: Face, reference: _Reference) -> np.ndarray:
        """The openpose control: keypoints of the user's face-id face warped onto the template face
        (a similarity fit keeps the user's proportions, so the geometry is theirs)."""
        matrix = similarity_transform(reference.face_id_face.landmarks, crop_face.landmarks)
        landmarks = transform_points(matrix, reference.face_id_face.landmarks)
        return draw_pose(crop.shape[:2], [landmarks])

    def _diffuse(
        self,
        stage: str,
        image: np.ndarray,
        mask: np.ndarray,
        settings: PassOptions,
        options: GenerateOptions,
        generator: torch.Generator,
        ctx: _FaceContext,
        pose: np.ndarray,
    ) -> np.ndarray:
        controls = []
        sources = {
            "canny": lambda: canny_control(
                image, settings.canny_low_threshold, settings.canny_high_threshold
            ),
            "openpose": lambda: pose,
            "color": lambda: color_control(image),
            "tile": lambda: tile_control(image),
        }
        for kind, weight in settings.control_weights().items():
            control = sources[kind]()
            ctx.keep(f"{stage}_{kind}", control)
            controls.append(ControlInput(kind, to_model(control, signed=False), weight))
        embeds = self.engines.encode_prompts([options.prompt, options.negative])
        started = time.perf_counter()
        request = InpaintRequest(
            image=to_model(image),
            mask=to_model(mask, signed=False),
            prompt_embeds=embeds[:1],
            negative_prompt_embeds=embeds[1:],
            controls=controls,
            steps=settings.steps,
            strength=settings.strength,
            guidance_scale=settings.guidance_scale,
            scheduler=settings.scheduler,
            generator=generator,
            on_step=lambda event: ctx.step(stage, event),
            should_stop=ctx.should_stop,
        )
        out = from_model(run_inpaint(self.engines, request, self.scheduler_config))
        ctx.timings[stage] = ctx.timings.get(stage, 0.0) + time.perf_counter() - started
        return out


@dataclass
class _FaceContext:
    index: int
    on_progress: Callable[[Progress], None] | None
    should_stop: Callable[[], bool]
    started: float
    timings: dict[str, float]
    intermediates: list[tuple[str, np.ndarray]]
    options: GenerateOptions

    def keep(self, name: str, image: np.ndarray) -> None:
        if self.options.return_intermediates:
            self.intermediates.append((f"face{self.index}_{name}", image))

    def step(self, stage: str, event: StepEvent) -> None:
        if self.on_progress is not None:
            elapsed = time.perf_counter() - self.started
            self.on_progress(Progress(stage, self.index, event.step, event.total_steps, elapsed))


def _overlap(a: tuple, b: tuple) -> float:
    """Intersection over union of two boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union_area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union_area if union_area > 0 else 0.0
