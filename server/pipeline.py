"""The EasyPhoto generation loop for one template (MISSION.md §2).

For each face, left to right, matched to the requested user ids (``""`` skips a face), with the
user's LoRA active: paint the other faces white, crop the face box × 3, resize, re-detect, build the
pose source from the user's face-id image, fuse the reference face in, inpaint (pass 1), shift
colour, fuse again, repaint the ring + eyes + lips (pass 2), shift colour, bring the crop back to its
native size through the super-resolution hook and paste it back feathered. Then, without any LoRA:
the seam pass around every pasted face when several were painted, the optional background restore,
and the identity score of each face. Control images are computed once per pass; every model call
goes through the engines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from easyphoto.diffusion.inpaint import InpaintPass, StepEvent
from easyphoto.diffusion.passes import PassOptions
from easyphoto.diffusion.steps import StepEngine
from easyphoto.engines.adapters import Adapter, SampleAdapter
from easyphoto.engines.caches import HotCache
from easyphoto.engines.faces.detect import FaceAnalyzer
from easyphoto.engines.faces.fusion import AFTER_PARTS, fuse_faces, warp_reference
from easyphoto.engines.faces.models import FaceModels
from easyphoto.engines.faces.parts import LanczosUpscaler, retouch_skin, super_resolve
from easyphoto.engines.interface import ControlInput, Engines
from easyphoto.engines.lora import load_lora
from easyphoto.imaging.codec import from_model, to_model
from easyphoto.imaging.compose import paint_boxes_white, paste_back, paste_face, shift_color
from easyphoto.imaging.controls import CONTROL_IMAGES, ControlSource, Pose, draw_pose
from easyphoto.imaging.geometry import (
    Box,
    Face,
    fit_size,
    grow_box,
    int_box,
    resize,
)
from easyphoto.imaging.masks import (
    FACE_PARTS,
    border_ring,
    disc,
    feather,
    inpaint_mask,
    only_parts,
    reference_pixels,
    ring_mask,
    union,
)
from easyphoto.rpc.errors import InvalidArgument, ModelMissing
from easyphoto.users.store import UserArtifacts, UserStore, adapter_prefix, check_stored_id

from .options import GenerateOptions, TemplateOptions
from .templates import STAGE as TEMPLATE_STAGE
from .templates import TemplatePainter

log = logging.getLogger(__name__)

MAX_FACES = 16
# The last colour shift leaves the mouth and lips alone (L1777: classes 1-5 and 10).
LAST_SHIFT_PARTS = ("skin", "brows", "eyes", "nose")
COLOR_BOX_SCALE = 1.1
USER_CACHE = 32  # users whose faces, embedding and LoRA stay loaded
MIN_FACE_SIZE = 16.0
# The progress and timing stage of each pass (named as the request's options name it).
STAGES = {
    "first_pass": "first_diffusion",
    "second_pass": "second_diffusion",
    "seam_pass": "seam_pass",
    "background_restore": "background_restore",
}


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
    user_version: int | None = None  # the published version that painted the face


@dataclass
class Generation:
    image: np.ndarray
    faces: list[FaceOutcome]
    seed: int
    timings: dict[str, float] = field(default_factory=dict)
    intermediates: list[tuple[str, np.ndarray]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # stage: why it did not run


@dataclass
class _Reference:
    """A user's images with their detected faces (computed once per request and user)."""

    artifacts: UserArtifacts
    face_id_face: Face
    reference_face: Face
    embedding: np.ndarray
    lora_file: Path | None  # None: published without a LoRA (paints with the base model)


@dataclass
class _Painted:
    """Where one face was repainted: its crop box in the template and the repainted region there."""

    index: int
    face: Face
    box: tuple[int, int, int, int]
    region: np.ndarray  # uint8 mask, the size of the box


def planned_passes(options: GenerateOptions, painted: int) -> list[tuple[PassOptions, int]]:
    """The passes :meth:`Orchestrator.generate` runs for one image with ``painted`` faces (its
    non-empty user ids), each with how many times: both passes per face, the seam pass per face
    when several are painted, the background restore once."""
    passes = [
        (options.first_pass, painted),
        (options.second_pass, painted),
        (options.seam_pass, painted if painted > 1 else 0),
        (options.background_restore, 1 if painted else 0),
    ]
    return [(settings, count) for settings, count in passes if settings.enabled and count]


def planned_steps(options: GenerateOptions, painted: int) -> int:
    """Denoising steps of :func:`planned_passes`: lets progress report the whole request's steps."""
    return sum(settings.denoising_steps * count for settings, count in planned_passes(options, painted))


@dataclass(frozen=True)
class ModelRows:
    """Model rows (samples) a request evaluates: what its arithmetic scales with."""

    unet: int
    controlnet: int
    vae_encode: int
    vae_decode: int


def planned_rows(options: GenerateOptions, painted: int) -> ModelRows:
    """The rows of :func:`planned_passes`: each step evaluates the UNet and each of the pass's
    ControlNets on two rows under classifier-free guidance (one without), and each pass encodes
    its image and decodes its result once. The text encoder's few rows per pass are left out."""
    unet = controlnet = encodes = 0
    for settings, count in planned_passes(options, painted):
        rows = count * settings.denoising_steps * (2 if settings.guidance_scale > 1.0 else 1)
        unet += rows
        controlnet += rows * len(settings.control_weights())
        encodes += count
    return ModelRows(unet, controlnet, encodes, encodes)


class Orchestrator:
    def __init__(
        self,
        engines: Engines,
        scheduler_config: dict,
        face_models: FaceModels,
        analyzer: FaceAnalyzer,
        users: UserStore,
        steps: StepEngine | None = None,
        templates: TemplatePainter | None = None,
    ) -> None:
        self.engines = engines
        self.templates = templates  # paints templates from text (an SDXL model), if deployed
        # Every pass of every request runs through one loop that batches their steps, and the
        # prompts they have not yet embedded.
        self.steps = steps or StepEngine(engines, scheduler_config)
        engines.text_encoder = self.steps.encode_text
        self.scheduler_config = scheduler_config
        self.face_models = face_models
        self.analyzer = analyzer
        self.users = users
        # Users' images, faces and embeddings by (user, version); RefreshUser runs beside Generate.
        self._references: HotCache[tuple[str, int | None], _Reference] = HotCache(USER_CACHE)

    def close(self) -> bool:
        """Stops the step engine (passes still waiting fail); whether it stopped, so that the engines
        may be closed (they embed prompts themselves again)."""
        stopped = self.steps.close()
        self.engines.text_encoder = self.engines.embed_in_backend
        return stopped

    # ---- the request ----

    def paint_template(
        self,
        options: TemplateOptions,
        seed: int,
        on_progress: Callable[[Progress], None] | None = None,
        raise_if_stopped: Callable[[], None] = lambda: None,
    ) -> np.ndarray:
        """A template painted from text (``template_from_text``) by the SDXL model; ModelMissing
        when this deployment has none."""
        if self.templates is None:
            raise ModelMissing(
                "template_from_text needs an SDXL model, which this deployment was not given"
                " (easyphoto serve --sdxl FOLDER)",
                field="template_from_text",
            )
        started = time.perf_counter()

        def step(event: StepEvent) -> None:
            if on_progress is not None:
                elapsed = time.perf_counter() - started
                on_progress(Progress(TEMPLATE_STAGE, 0, event.step, event.total_steps, elapsed))

        return self.templates.paint(options, seed, step, raise_if_stopped)

    def generate(
        self,
        template: np.ndarray,
        user_ids: list[str],
        options: GenerateOptions,
        seed: int,
        on_progress: Callable[[Progress], None] | None = None,
        raise_if_stopped: Callable[[], None] = lambda: None,
        field_name: str = "templates[0]",
    ) -> Generation:
        """One image: each face of ``template`` painted as its user, left to right. Between steps
        ``raise_if_stopped`` is called (it raises to stop: the client went away, a deadline passed)."""
        started = time.perf_counter()
        self._check_unet_variant(options)
        painted_faces = [index for index, user_id in enumerate(user_ids) if user_id]
        faces = self.analyzer.detect_painted(template, painted_faces, field_name, MAX_FACES, MIN_FACE_SIZE)
        if len(user_ids) > len(faces):
            raise InvalidArgument(
                f"{len(user_ids)} user ids for {len(faces)} faces in {field_name}", field="user_ids"
            )
        self._check_controlnets(options, painted=sum(map(bool, user_ids)))
        first_asked: dict[str, int] = {}
        for index, uid in enumerate(user_ids):
            if uid:
                first_asked.setdefault(uid, index)
        references = {uid: self.prepare_user(uid, f"user_ids[{i}]") for uid, i in first_asked.items()}
        run = _Run(options, torch.Generator().manual_seed(seed), started, on_progress, raise_if_stopped)
        run.timings["detect"] = time.perf_counter() - started
        switched = time.perf_counter()
        adapters = {
            uid: self._adapter(ref, f"user_ids[{first_asked[uid]}]") for uid, ref in references.items()
        }
        run.timings["lora_switch"] = time.perf_counter() - switched
        result = template.copy()
        painted: list[_Painted] = []
        for index, face in enumerate(faces):
            user_id = user_ids[index] if index < len(user_ids) else ""
            if not user_id:
                continue
            others = [f.box for j, f in enumerate(faces) if j != index]
            adapter = adapters[user_id]
            sample = SampleAdapter(adapter, options.lora_weight) if adapter is not None else None
            ctx = run.face(index, sample)
            result, where = self._paint_face(result, others, face, references[user_id], ctx)
            painted.append(where)
        if len(painted) > 1 and options.seam_pass.enabled:
            for where in painted:
                result = self._repaint_seam(result, where, run.face(where.index))
        if painted and options.background_restore.enabled:
            result = self._restore_background(result, painted, run.face(0))
        if painted and options.skin_retouching:
            result = self._retouch(result, painted, run)
        if painted:
            result = self._enhance(result, run)
        scored = time.perf_counter()
        found = self.analyzer.detect(result) if painted else []  # once for every face's score
        outcomes = [
            FaceOutcome(
                uid,
                face,
                self.analyzer.identity(result, face, references[uid].embedding, found) if uid else None,
                references[uid].artifacts.version if uid else None,
            )
            for uid, face in zip(user_ids + [""] * (len(faces) - len(user_ids)), faces, strict=True)
        ]
        run.timings["score"] = time.perf_counter() - scored
        run.timings["total"] = time.perf_counter() - started
        return Generation(result, outcomes, seed, run.timings, run.intermediates, run.skipped)

    def _check_unet_variant(self, options: GenerateOptions) -> None:
        """ModelMissing when the request asks for the LCM fast path and no LCM-LoRA was given."""
        variant = options.unet_variant
        if variant and variant not in self.engines.unet_variants:
            raise ModelMissing(
                "lcm_accelerate needs an LCM-LoRA, which this deployment was not given"
                " (easyphoto serve --lcm-lora FILE; for Triton, easyphoto export --lcm-lora FILE)",
                field="lcm_accelerate",
            )

    def _check_controlnets(self, options: GenerateOptions, painted: int) -> None:
        """ModelMissing naming the pass and the kind when a pass that will run needs a ControlNet
        this deployment does not have (before any work is done)."""
        running = {
            "first_pass": painted > 0,
            "second_pass": painted > 0,
            "seam_pass": painted > 1,
            "background_restore": painted > 0,
        }
        have = self.engines.controlnet_kinds
        for name, runs in running.items():
            settings: PassOptions = getattr(options, name)
            missing = [kind for kind in settings.control_weights() if kind not in have] if runs else []
            if settings.enabled and missing:
                raise ModelMissing(
                    f"{name} needs the {missing[0]} ControlNet, which this deployment does not have"
                    f" (it has {sorted(have)}); set {name}.{missing[0]}_weight to 0 to run without it",
                    field=f"{name}.{missing[0]}_weight",
                )

    def prepare_user(self, user_id: str, field_name: str = "user_ids") -> _Reference:
        """The user's published version with its faces and embedding; cached per version (published
        versions never change, so a new version is a new cache entry). Its adapter is made ready
        in the backend's hot cache too (a cold user's first request loads it here)."""
        check_stored_id(user_id, field_name)
        key = (user_id, self.users.current_version(user_id))
        known = key in self._references
        reference = self._references.get(key, lambda: self._load_reference(user_id, field_name))
        if not known:  # a newer version retires the older ones: no request will ask for them again
            current = reference.artifacts.adapter_name
            self._references.discard(lambda cached: cached[0] == user_id and cached != key)
            self.engines.backend.retire_adapters(
                lambda name: name.startswith(adapter_prefix(user_id)) and name != current
            )
        self._adapter(reference, field_name)
        return reference

    def refresh_user(self, user_id: str, field_name: str = "user_id") -> _Reference:
        """What RefreshUser does for a newly published version: :meth:`prepare_user`, and the
        adapter warmed where the models keep theirs (Triton's model processes read it now)."""
        reference = self.prepare_user(user_id, field_name)
        adapter = self._adapter(reference, field_name)
        if adapter is not None:
            self.engines.backend.warm_adapter(adapter)
        return reference

    def _load_reference(self, user_id: str, field_name: str) -> _Reference:
        artifacts = self.users.load(user_id, field_name)
        face_id_face = artifacts.face("face_id") or self.analyzer.largest(
            artifacts.face_id, field=f"users/{user_id}/face_id"
        )
        reference_face = artifacts.face("reference") or self.analyzer.largest(
            artifacts.reference, field=f"users/{user_id}/reference"
        )
        embedding = self.analyzer.embed(artifacts.reference, [reference_face])[0]
        lora_file = artifacts.lora_path if artifacts.lora_path.is_file() else None
        if lora_file is None:
            log.warning(
                "user %s v%d has no LoRA file; painting with the base model", user_id, artifacts.version
            )
        return _Reference(artifacts, face_id_face, reference_face, embedding, lora_file)

    def _adapter(self, reference: _Reference, field_name: str) -> Adapter | None:
        """The user's adapter from the backend's hot cache (loaded from its file on a miss)."""
        path = reference.lora_file
        if path is None:
            return None
        artifacts = reference.artifacts
        try:
            return self.engines.backend.adapter(
                artifacts.adapter_name, lambda: load_lora(path, self.engines.backend.lora_targets())
            )
        except InvalidArgument as error:  # the user's adapter, not the request, is what is wrong
            raise InvalidArgument(
                f"user {artifacts.user_id!r} v{artifacts.version}: {error.message}",
                field=field_name,
                metadata={"user_id": artifacts.user_id, "version": str(artifacts.version)},
            ) from error

    # ---- one face ----

    def _paint_face(
        self, image: np.ndarray, other_boxes: list, face: Face, reference: _Reference, ctx: _FaceContext
    ) -> tuple[np.ndarray, _Painted]:
        options = ctx.run.options
        height, width = image.shape[:2]
        working = paint_boxes_white(image, other_boxes)
        (x0, y0, x1, y1), size = face_crop(
            face.box, width, height, options, self.engines.image_multiple, self.engines.max_image_side
        )
        crop = resize(working[y0:y1, x0:x1], *size)
        # Detected once, in the template: the crop's transform carries the face into it.
        crop_face = face.in_crop((x0, y0, x1, y1), size)
        # L1347-1349: the 1.1x face box sizes the mask kernels and holds the colour statistics.
        color_box = int_box(grow_box(crop_face.box, COLOR_BOX_SCALE, crop.shape[1], crop.shape[0]))
        ctx.keep("crop", crop)

        pose_source = self._pose_source(crop, crop_face, reference)
        ctx.keep("pose_source", pose_source)
        pose = [self._pose(pose_source, crop_face, reference)]
        ctx.keep("openpose", draw_pose(crop.shape[:2], pose))
        fused = crop
        if options.fusion_before:
            moved = self._moved_face(crop, crop_face, reference)
            fused = fuse_faces(crop, crop_face, moved, self.face_models.parser, options.fusion_before_ratio)
        ctx.keep("fusion_before", fused)
        mask = inpaint_mask(self.face_models.parser(fused, crop_face), color_box[2] - color_box[0])
        ctx.keep("inpaint_mask", mask)
        painted = fused
        if options.first_pass.enabled:
            painted = self._diffuse("first_pass", fused, pose, mask, ctx)
            ctx.keep("first_diffusion", painted)
        if options.color_shift:
            painted = self._shift_color(painted, crop, crop_face, color_box, FACE_PARTS)
        if options.fusion_after:
            moved = self._moved_face(painted, crop_face, reference)
            ratio = options.fusion_after_ratio
            painted = fuse_faces(painted, crop_face, moved, self.face_models.parser, ratio, AFTER_PARTS)
        repainted = mask
        if options.second_pass.enabled:
            ring = ring_mask(self.face_models.parser(painted, crop_face))
            repainted = union([mask, ring])  # the ring reaches past the first mask's edge
            ctx.keep("second_mask", ring)
            painted = self._diffuse("second_pass", painted, pose, ring, ctx)
            ctx.keep("second_diffusion", painted)
        if options.color_shift:
            painted = self._shift_color(painted, crop, crop_face, color_box, LAST_SHIFT_PARTS)
        back = self._native_size(painted, x1 - x0, y1 - y0)
        # Only what a pass repainted changes: blend through its feathered mask, then into the template.
        region = resize(cv2.dilate(repainted, np.ones((3, 3), np.uint8)), x1 - x0, y1 - y0)
        where = _Painted(ctx.index, face, (x0, y0, x1, y1), region)
        return _blend_into(image, back, region, where.box, max(1, round(face.width / 20))), where

    def _shift_color(
        self,
        image: np.ndarray,
        template: np.ndarray,
        face: Face,
        box: tuple[int, int, int, int],
        parts: tuple[str, ...],
    ) -> np.ndarray:
        """``image``'s colours over the face box moved to the template crop's, through the named
        parts of ``image`` blurred by the reference's 32 px (L1615-1648, L1757-1786)."""
        mask = only_parts(self.face_models.parser(image, face), parts)
        return shift_color(image, template, box, mask, reference_pixels(32, image.shape))

    def _moved_face(self, target: np.ndarray, target_face: Face, reference: _Reference) -> np.ndarray:
        """The user's face on the target face's landmarks: swapped in by the learned swapper when
        one is loaded, else the user's reference photo warped there."""
        if self.face_models.swapper is not None:
            return self.face_models.swapper(target, target_face, reference.embedding)
        user = reference.artifacts.reference
        return warp_reference(user, reference.reference_face, target_face, target.shape[:2])

    def _model_size(self, width: int, height: int, options: GenerateOptions) -> tuple[int, int]:
        return model_size(width, height, options, self.engines.image_multiple, self.engines.max_image_side)

    def _native_size(self, image: np.ndarray, width: int, height: int) -> np.ndarray:
        """Back to the crop's size in the template; growing goes through the enhancer (Lanczos
        when none is loaded), MISSION.md §2.11."""
        while image.shape[1] < width or image.shape[0] < height:
            image = self.face_models.upscaler(image)
        return resize(image, width, height)

    def _retouch(self, image: np.ndarray, painted: list[_Painted], run: _Run) -> np.ndarray:
        """The skin of each painted face retouched (L2007-2016, where a retouching model runs on
        the whole output; here the face models' retoucher inside each face's skin mask)."""
        started = time.perf_counter()
        for where in painted:
            image = retouch_skin(image, where.face, self.face_models.parser, self.face_models.retoucher)
        run.keep("skin_retouching", image)
        run.timings["skin_retouching"] = time.perf_counter() - started
        return image

    def _enhance(self, image: np.ndarray, run: _Run) -> np.ndarray:
        """The reference's last step (L2019-2040, GPEN there): the whole output through the
        enhancer, blended at ``super_resolution_ratio`` with the output enlarged to the same size.
        The response keeps the template's size (the reference returns the enhanced size). Skipped,
        and said so, without an enhancer: blending Lanczos with itself changes nothing."""
        ratio = run.options.super_resolution_ratio
        if isinstance(self.face_models.upscaler, LanczosUpscaler):
            run.skipped["super_resolution"] = "no enhancer model is loaded (--face-enhancer)"
            return image
        if ratio <= 0:
            run.skipped["super_resolution"] = "super_resolution_ratio is 0"
            return image
        started = time.perf_counter()
        enhanced = super_resolve(image, self.face_models.upscaler, ratio)
        run.keep("super_resolution", enhanced)
        out = resize(enhanced, image.shape[1], image.shape[0])
        run.timings["super_resolution"] = time.perf_counter() - started
        return out

    def _repaint_seam(self, image: np.ndarray, where: _Painted, ctx: _FaceContext) -> np.ndarray:
        """The third pass: the ring around the pasted face, base model only (MISSION.md §2.10)."""
        x0, y0, x1, y1 = where.box
        width, height = self._model_size(x1 - x0, y1 - y0, ctx.run.options)
        scale = width / (x1 - x0)
        crop = resize(image[y0:y1, x0:x1], width, height)
        radius = max(1, round(where.face.width * scale / 10))
        ring = border_ring(resize(where.region, width, height), radius)
        ctx.keep("seam_mask", ring)
        landmarks = where.face.in_crop(where.box, (width, height)).landmarks
        out = self._diffuse("seam_pass", crop, [Pose.from_landmarks(landmarks)], ring, ctx)
        ctx.keep("seam_pass", out)
        back = resize(out, x1 - x0, y1 - y0)
        native_ring = border_ring(where.region, max(1, round(where.face.width / 10)))
        return _blend_into(image, back, native_ring, where.box, max(1, round(where.face.width / 40)))

    def _restore_background(
        self, image: np.ndarray, painted: list[_Painted], ctx: _FaceContext
    ) -> np.ndarray:
        """Repaints everything but the faces at low strength, base model only (MISSION.md §2.10)."""
        height, width = image.shape[:2]
        faces = np.zeros((height, width), np.uint8)
        for where in painted:
            x0, y0, x1, y1 = where.box
            faces[y0:y1, x0:x1] = np.maximum(faces[y0:y1, x0:x1], where.region)
        widest = max(where.face.width for where in painted)
        grow = max(1, round(widest / 10))
        background = 255 - cv2.dilate(faces, disc(grow))
        size = self._model_size(width, height, ctx.run.options)
        small = resize(image, *size)
        mask = resize(background, *size)
        ctx.keep("background_mask", mask)
        poses = [
            Pose.from_landmarks(where.face.in_crop((0, 0, width, height), size).landmarks)
            for where in painted
        ]
        out = self._diffuse("background_restore", small, poses, mask, ctx)
        ctx.keep("background_restore", out)
        return _blend_into(image, resize(out, width, height), background, (0, 0, width, height), grow)

    def _pose_source(self, crop: np.ndarray, crop_face: Face, reference: _Reference) -> np.ndarray:
        """The crop with the user's face-id image pasted over the face by a similarity fit of its
        landmarks (its face box grown 1.5x, L1172-1174 and L1362-1369): what the pose is read from."""
        return paste_face(reference.artifacts.face_id, reference.face_id_face, crop, crop_face)

    def _pose(self, pose_source: np.ndarray, crop_face: Face, reference: _Reference) -> Pose:
        """The openpose control's person: read from the pose source by the whole-body keypoint
        model when one is loaded (the crop is the person box), else drawn from the face-id
        landmarks fitted onto the template face (where the pose source has them)."""
        if self.face_models.pose is not None:
            height, width = pose_source.shape[:2]
            return self.face_models.pose(pose_source, (0, 0, width, height))
        return Pose.fitted(reference.face_id_face.landmarks, crop_face.landmarks)

    def _diffuse(
        self,
        pass_name: str,
        image: np.ndarray,
        poses: list[Pose],
        mask: np.ndarray,
        ctx: _FaceContext,
    ) -> np.ndarray:
        """One diffusion pass (``pass_name`` as the request names it) repainting ``mask`` of ``image``,
        its pose control drawn from ``poses``."""
        options = ctx.run.options
        settings: PassOptions = getattr(options, pass_name)
        stage = STAGES[pass_name]
        source = ControlSource(image, poses, settings.canny_low_threshold, settings.canny_high_threshold)
        controls = []
        for kind, weight in settings.control_weights().items():
            control = CONTROL_IMAGES[kind](source)
            ctx.keep(f"{stage}_{kind}", control)
            controls.append(ControlInput(kind, to_model(control, signed=False), weight))
        started = time.perf_counter()  # the text encoder's call is the pass's model time too
        embeds = self.engines.encode_prompts([options.prompt, options.negative], ctx.adapter)
        inpaint = InpaintPass(
            image=to_model(image),
            mask=to_model(mask, signed=False),
            prompt_embeds=embeds[:1],
            negative_prompt_embeds=embeds[1:],
            controls=controls,
            steps=settings.steps,
            strength=settings.strength,
            guidance_scale=settings.guidance_scale,
            scheduler=settings.scheduler,
            generator=ctx.run.generator,
            on_step=lambda event: ctx.step(stage, event),
            raise_if_stopped=ctx.run.raise_if_stopped,
            adapter=ctx.adapter,
            unet_variant=options.unet_variant,
        )
        out = from_model(self.steps.run(inpaint))
        timings = ctx.run.timings
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - started
        return out


@dataclass
class _Run:
    """The generation of one image: its options and random generator, the caller's progress and
    stop hooks, and what it records."""

    options: GenerateOptions
    generator: torch.Generator
    started: float
    on_progress: Callable[[Progress], None] | None
    raise_if_stopped: Callable[[], None]
    timings: dict[str, float] = field(default_factory=dict)
    intermediates: list[tuple[str, np.ndarray]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # stage: why it did not run

    def face(self, index: int, adapter: SampleAdapter | None = None) -> _FaceContext:
        return _FaceContext(self, index, adapter)

    def keep(self, name: str, image: np.ndarray) -> None:
        if self.options.return_intermediates:
            self.intermediates.append((name, image))


@dataclass(frozen=True)
class _FaceContext:
    """The work on one face of a run: intermediates and progress carry its index; its user's passes
    carry the user's adapter (the seam and background passes paint with the base model)."""

    run: _Run
    index: int
    adapter: SampleAdapter | None = None

    def keep(self, name: str, image: np.ndarray) -> None:
        self.run.keep(f"face{self.index}_{name}", image)

    def step(self, stage: str, event: StepEvent) -> None:
        if self.run.on_progress is not None:
            elapsed = time.perf_counter() - self.run.started
            self.run.on_progress(Progress(stage, self.index, event.step, event.total_steps, elapsed))


def _blend_into(
    image: np.ndarray, patch: np.ndarray, mask: np.ndarray, box: tuple[int, int, int, int], radius: int
) -> np.ndarray:
    """``patch`` (the size of ``box``) blended into ``image`` through ``mask`` feathered by ``radius``;
    pixels outside the mask keep their exact values."""
    x0, y0, x1, y1 = box
    alpha = feather(mask, radius)[..., None]
    original = image[y0:y1, x0:x1]
    blended = (patch * alpha + original * (1 - alpha)).round().astype(np.uint8)
    return paste_back(image, blended, box, feather_px=0)


def face_crop(
    face_box: Box, width: int, height: int, options: GenerateOptions, multiple: int, max_side: int
) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """The box of a ``width`` x ``height`` template a face is painted in (the face box grown by
    ``crop_scale``, or the whole template), and the model size its crop is resized to."""
    box: Box = (0, 0, width, height)
    if options.crop_face:
        box = grow_box(face_box, options.crop_scale, width, height)
    x0, y0, x1, y1 = int_box(box)
    return (x0, y0, x1, y1), model_size(x1 - x0, y1 - y0, options, multiple, max_side)


def model_size(
    width: int, height: int, options: GenerateOptions, multiple: int, max_side: int
) -> tuple[int, int]:
    """Short side ``crop_short_side`` in the models' multiples, long side within their maximum."""
    return fit_size(width, height, options.crop_short_side, multiple, max_side)
