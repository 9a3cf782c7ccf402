"""The per-face generation loop on the tiny models and the real face models."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from recording_engines import RecordingEngines

from easyphoto.diffusion.passes import BACKGROUND_PASS, SEAM_PASS, PassOptions
from easyphoto.engines.backends.torch_backend import TorchBackend
from easyphoto.engines.faces.detect import FaceAnalyzer
from easyphoto.engines.faces.models import default_face_models
from easyphoto.engines.faces.parts import LandmarkParser
from easyphoto.engines.lora import LoraLayer, LoraWeights, save_lora
from easyphoto.engines.models.family import ModelFamily
from easyphoto.fixtures.photos import sample_photo
from easyphoto.imaging.codec import encode_png
from easyphoto.imaging.controls import Pose, draw_pose
from easyphoto.imaging.geometry import grow_box, int_box, similarity_transform, transform_points
from easyphoto.imaging.masks import only_parts, union
from easyphoto.rpc.errors import (
    Cancelled,
    FaceTooSmall,
    InvalidArgument,
    ModelMissing,
    UnknownUser,
    UserNotReady,
)
from easyphoto.server.options import GenerateOptions
from easyphoto.server.pipeline import Orchestrator, face_crop, planned_rows
from easyphoto.users.store import UserStore

FAST = PassOptions(True, 4, 0.5, 7.0, canny_weight=0.5, color_weight=0.85)


def _publish(root: Path, user_id: str, face: np.ndarray, version: int = 1) -> None:
    folder = root / "users" / user_id / f"v{version}"
    folder.mkdir(parents=True)
    (folder / "face_id.png").write_bytes(encode_png(face))
    (folder / "reference.png").write_bytes(encode_png(face))
    (root / "users" / user_id / "CURRENT").write_text(str(version))


DAVE_LORA_TARGET = "mid_block.attentions.0.transformer_blocks.0.attn1.to_v"


def _save_random_lora(tiny: ModelFamily, path: Path, seed: int = 1) -> None:
    weight = tiny.unet.get_submodule(DAVE_LORA_TARGET).weight
    generator = torch.Generator().manual_seed(seed)
    layer = LoraLayer(
        "unet", DAVE_LORA_TARGET, torch.randn(4, weight.shape[1], generator=generator),
        torch.randn(weight.shape[0], 4, generator=generator), alpha=4.0,
    )  # fmt: skip
    save_lora(LoraWeights("dave", [layer]), path)


@pytest.fixture(scope="module")
def orchestrator(
    tiny: ModelFamily, faces: FaceAnalyzer, tmp_path_factory: pytest.TempPathFactory
) -> Orchestrator:
    root = tmp_path_factory.mktemp("data")
    group = sample_photo("group")
    face = faces.detect(group)[1]
    x0, y0, x1, y1 = int_box(grow_box(face.box, 1.8, group.shape[1], group.shape[0]))
    _publish(root, "alice", group[y0:y1, x0:x1])
    _publish(root, "dave", group[y0:y1, x0:x1])
    _save_random_lora(tiny, root / "users" / "dave" / "v1" / "lora.safetensors")
    (root / "users" / "bob").mkdir(parents=True)  # training, nothing published
    engines = RecordingEngines(
        TorchBackend(tiny, "cpu"), tiny.tokenizer, float(tiny.vae.config.scaling_factor)
    )
    return Orchestrator(engines, tiny.scheduler_config, default_face_models(), faces, UserStore(root))


def _calls(orchestrator: Orchestrator) -> list[dict[str, float]]:
    return orchestrator.engines.calls  # type: ignore[attr-defined]


def test_every_default_reaches_the_engines(orchestrator: Orchestrator) -> None:
    _calls(orchestrator).clear()
    template = sample_photo("astronaut")
    result = orchestrator.generate(template, ["alice"], GenerateOptions(), seed=3)
    calls = _calls(orchestrator)
    first, second = calls[: int(50 * 0.45)], calls[int(50 * 0.45) :]
    assert len(first) == 22 and len(second) == int(20 * 0.35)
    assert all(c == {"canny": 0.5, "openpose": 0.5, "color": 0.85} for c in first)
    assert all(c == {"canny": 1.0, "tile": 1.0} for c in second)
    outcome = result.faces[0]
    assert outcome.user_id == "alice" and -1.0 <= outcome.identity_score <= 1.0  # type: ignore[operator]
    x0, y0, x1, y1 = int_box(grow_box(outcome.face.box, 3.0, 512, 512))
    outside = np.ones(template.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    assert np.array_equal(result.image[outside], template[outside])
    assert not np.array_equal(result.image[y0:y1, x0:x1], template[y0:y1, x0:x1])
    assert {"detect", "first_diffusion", "second_diffusion", "total"} <= set(result.timings)


def test_faces_are_matched_left_to_right_and_empty_ids_skip(orchestrator: Orchestrator) -> None:
    group = sample_photo("group")
    options = GenerateOptions(first_pass=FAST, second_pass=FAST, return_intermediates=True)
    result = orchestrator.generate(group, ["", "alice"], options, seed=1)
    assert [o.user_id for o in result.faces] == ["", "alice", "", "", "", ""]
    assert result.faces[0].identity_score is None and result.faces[1].identity_score is not None
    skipped = int_box(result.faces[0].face.box)
    painted = int_box(result.faces[1].face.box)
    assert np.array_equal(result.image[skipped[1] : skipped[3], skipped[0] : skipped[2]],
                          group[skipped[1] : skipped[3], skipped[0] : skipped[2]])  # fmt: skip
    assert not np.array_equal(result.image[painted[1] : painted[3], painted[0] : painted[2]],
                              group[painted[1] : painted[3], painted[0] : painted[2]])  # fmt: skip
    names = {name for name, _ in result.intermediates}
    assert {"face1_crop", "face1_inpaint_mask", "face1_first_diffusion", "face1_second_mask"} <= names
    crop = dict(result.intermediates)["face1_crop"]  # as large as the models allow
    assert max(crop.shape[:2]) == orchestrator.engines.max_image_side and min(crop.shape[:2]) >= 192


def _astronaut_with_a_small_crowd() -> np.ndarray:
    """The astronaut (face 0, 89 px) and the group photo at a sixth of its size in a corner: six
    more faces, left to right, of which faces 2 and 6 are 15 px a side, under the 16 px limit."""
    template = sample_photo("astronaut").copy()
    group = sample_photo("group")
    crowd = cv2.resize(group, (group.shape[1] // 6, group.shape[0] // 6), interpolation=cv2.INTER_AREA)
    template[-crowd.shape[0] :, -crowd.shape[1] :] = crowd
    return template


def test_faces_are_detected_once_in_the_template_and_once_in_the_output(
    orchestrator: Orchestrator, monkeypatch: pytest.MonkeyPatch
) -> None:
    orchestrator.prepare_user("alice")  # her own images' faces are found once per version
    images: list[tuple[int, ...]] = []
    detect = orchestrator.analyzer.detect

    def counting(image: np.ndarray, *args: object, **kwargs: object) -> list:
        images.append(image.shape)
        return detect(image, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(orchestrator.analyzer, "detect", counting)
    off = replace(FAST, enabled=False)
    group = sample_photo("group")
    options = GenerateOptions(first_pass=off, second_pass=off, seam_pass=off)
    orchestrator.generate(group, ["alice", "alice", "alice"], options, seed=1)
    assert images == [group.shape, group.shape]  # the template's faces, then the scores' faces


def test_faces_a_request_skips_never_fail_it_and_keep_their_places(orchestrator: Orchestrator) -> None:
    template = _astronaut_with_a_small_crowd()
    off = replace(FAST, enabled=False)
    options = GenerateOptions(first_pass=FAST, second_pass=off, seam_pass=off)
    result = orchestrator.generate(template, ["alice"], options, seed=1)
    assert [o.user_id for o in result.faces] == ["alice"] + [""] * 6
    small = [o.face for o in result.faces if min(o.face.width, o.face.height) < 16]
    assert len(small) == 2
    for face in small:
        x0, y0, x1, y1 = int_box(face.box)
        assert np.array_equal(result.image[y0:y1, x0:x1], template[y0:y1, x0:x1])
    with pytest.raises(FaceTooSmall, match=r"face 2 \(left to right"):
        orchestrator.generate(template, ["", "", "alice"], options, seed=1)
    with pytest.raises(FaceTooSmall, match=r"face 6 \(left to right"):
        orchestrator.generate(template, ["", "", "", "", "", "", "alice"], options, seed=1)


def test_request_errors_are_typed(orchestrator: Orchestrator) -> None:
    astronaut = sample_photo("astronaut")
    _calls(orchestrator).clear()
    with pytest.raises(InvalidArgument) as info:
        orchestrator.generate(astronaut, ["alice", "alice"], GenerateOptions(), seed=0)
    assert info.value.field == "user_ids"
    with pytest.raises(UnknownUser):
        orchestrator.generate(astronaut, ["carol"], GenerateOptions(), seed=0)
    with pytest.raises(UserNotReady):
        orchestrator.generate(astronaut, ["bob"], GenerateOptions(), seed=0)
    with pytest.raises(InvalidArgument):
        orchestrator.generate(astronaut, ["../etc"], GenerateOptions(), seed=0)
    assert _calls(orchestrator) == []  # nothing reached the models


def _cancel_after(count: int, steps: list[int]) -> None:
    if len(steps) >= count:
        raise Cancelled(f"cancelled after {count} steps")


def test_a_cancelled_request_stops_calling_engines(orchestrator: Orchestrator) -> None:
    _calls(orchestrator).clear()
    steps: list[int] = []
    with pytest.raises(Cancelled):
        orchestrator.generate(
            sample_photo("astronaut"),
            ["alice"],
            GenerateOptions(),
            seed=0,
            on_progress=lambda p: steps.append(p.step),
            raise_if_stopped=lambda: _cancel_after(3, steps),
        )
    assert len(_calls(orchestrator)) == 3


def test_same_seed_same_image(orchestrator: Orchestrator) -> None:
    options = GenerateOptions(first_pass=FAST, second_pass=FAST)
    astronaut = sample_photo("astronaut")
    a = orchestrator.generate(astronaut, ["alice"], options, seed=5).image
    b = orchestrator.generate(astronaut, ["alice"], options, seed=5).image
    c = orchestrator.generate(astronaut, ["alice"], options, seed=6).image
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_the_users_lora_is_applied_at_its_weight_and_removed_after(
    orchestrator: Orchestrator, tiny: ModelFamily
) -> None:
    weight = tiny.unet.get_submodule(DAVE_LORA_TARGET).weight
    before = weight.clone()
    options = GenerateOptions(first_pass=FAST, second_pass=FAST)
    astronaut = sample_photo("astronaut")
    plain = orchestrator.generate(astronaut, ["dave"], replace(options, lora_weight=0.0), seed=2)
    with_lora = orchestrator.generate(astronaut, ["dave"], options, seed=2)
    assert not np.array_equal(plain.image, with_lora.image)
    assert torch.equal(tiny.unet.get_submodule(DAVE_LORA_TARGET).weight, before)
    assert "lora_switch" in with_lora.timings


def test_a_new_version_is_warmed_and_served_without_a_restart(
    orchestrator: Orchestrator, tiny: ModelFamily
) -> None:
    root, face = orchestrator.users.root, orchestrator.users.load("alice").face_id
    options = GenerateOptions(first_pass=FAST, second_pass=FAST)
    astronaut = sample_photo("astronaut")
    adapters = orchestrator.engines.backend.adapters  # type: ignore[attr-defined]
    _publish(root, "frank", face)
    _save_random_lora(tiny, root / "users" / "frank" / "v1" / "lora.safetensors", seed=3)
    orchestrator.refresh_user("frank")  # what RefreshUser does
    assert "frank@v1" in adapters
    first = orchestrator.generate(astronaut, ["frank"], options, seed=2).image
    _publish(root, "frank", face, version=2)
    _save_random_lora(tiny, root / "users" / "frank" / "v2" / "lora.safetensors", seed=4)
    orchestrator.refresh_user("frank")
    assert "frank@v2" in adapters and "frank@v1" not in adapters  # v1 retired: nobody asks for it
    assert [key for key in orchestrator._references.keys if key[0] == "frank"] == [("frank", 2)]
    second = orchestrator.generate(astronaut, ["frank"], options, seed=2).image
    assert orchestrator.engines.loras[-1] == ("frank@v2", options.lora_weight)  # type: ignore[attr-defined]
    assert not np.array_equal(first, second)


def test_a_user_whose_lora_does_not_fit_is_refused_naming_the_user(
    orchestrator: Orchestrator, tiny: ModelFamily
) -> None:
    _publish(orchestrator.users.root, "erin", orchestrator.users.load("alice").face_id)
    weight = tiny.unet.get_submodule(DAVE_LORA_TARGET).weight
    wide = LoraLayer(
        "unet", DAVE_LORA_TARGET, torch.ones(4, weight.shape[1] * 2), torch.ones(weight.shape[0], 4), 4.0
    )
    save_lora(
        LoraWeights("erin", [wide]), orchestrator.users.root / "users" / "erin" / "v1" / "lora.safetensors"
    )
    with pytest.raises(InvalidArgument, match=r"user 'erin' v1: LoRA layer unet\.mid_block") as refused:
        orchestrator.generate(sample_photo("astronaut"), ["erin"], GenerateOptions(), seed=2)
    assert refused.value.field == "user_ids[0]" and refused.value.metadata["user_id"] == "erin"


def test_a_pass_needing_a_controlnet_the_deployment_lacks_is_refused_before_any_work(
    orchestrator: Orchestrator, tiny: ModelFamily
) -> None:
    without_openpose = replace(
        tiny, controlnets={k: v for k, v in tiny.controlnets.items() if k != "openpose"}
    )
    engines = RecordingEngines(TorchBackend(without_openpose, "cpu"), tiny.tokenizer, 1.0)
    lacking = Orchestrator(
        engines, tiny.scheduler_config, orchestrator.face_models, orchestrator.analyzer, orchestrator.users
    )
    with pytest.raises(ModelMissing, match="first_pass needs the openpose ControlNet") as refused:
        lacking.generate(sample_photo("astronaut"), ["alice"], GenerateOptions(), seed=1)
    assert refused.value.code == "FAILED_PRECONDITION" and refused.value.field == "first_pass.openpose_weight"
    assert engines.calls == []  # refused before any model ran
    options = GenerateOptions(first_pass=FAST, second_pass=FAST)  # canny and colour only
    assert lacking.generate(sample_photo("astronaut"), ["alice"], options, seed=1).faces[0].user_id == "alice"


def test_two_people_get_a_seam_pass_without_lora_and_the_background_restore(
    orchestrator: Orchestrator,
) -> None:
    engines: RecordingEngines = orchestrator.engines  # type: ignore[assignment]
    group = sample_photo("group")
    seam = replace(SEAM_PASS, steps=10)  # 3 steps at strength 0.3
    background = replace(BACKGROUND_PASS, enabled=True, steps=6)
    options = GenerateOptions(
        first_pass=FAST, second_pass=FAST, seam_pass=seam, background_restore=background,
        return_intermediates=True,
    )  # fmt: skip
    engines.calls.clear()
    engines.loras.clear()
    engines.rows.clear()
    result = orchestrator.generate(group, ["alice", "dave"], options, seed=4)
    per_face = 2 * 2  # FAST: 4 steps at strength 0.5, two passes
    assert len(engines.calls) == 2 * per_face + 2 * 3 + 2
    assert engines.rows == asdict(planned_rows(options, 2))  # what the capacity arithmetic counts
    users, seams, restore = (
        engines.loras[: 2 * per_face], engines.calls[2 * per_face : -2], engines.calls[-2:]
    )  # fmt: skip
    assert users[0] is None and users[per_face] is not None  # alice has no LoRA file, dave has one
    assert engines.loras[2 * per_face :] == [None] * 8
    assert all(c == {"canny": 1.0, "color": 1.0} for c in seams + restore)
    names = {name for name, _ in result.intermediates}
    assert {"face0_seam_mask", "face1_seam_pass", "face0_background_mask"} <= names
    assert [o.user_id for o in result.faces][:2] == ["alice", "dave"]
    assert all(o.identity_score is not None for o in result.faces[:2])
    assert result.image.shape == group.shape


def test_one_person_gets_no_seam_pass(orchestrator: Orchestrator) -> None:
    engines: RecordingEngines = orchestrator.engines  # type: ignore[assignment]
    engines.calls.clear()
    engines.rows.clear()
    options = GenerateOptions(first_pass=FAST, second_pass=FAST)
    orchestrator.generate(sample_photo("astronaut"), ["alice"], options, seed=4)
    assert len(engines.calls) == 4
    assert engines.rows == asdict(planned_rows(options, 1))


def test_the_whole_second_pass_ring_reaches_the_template(orchestrator: Orchestrator) -> None:
    """The ring reaches past the first pass's mask; what the second pass paints there is kept."""
    only_second = GenerateOptions(
        first_pass=replace(FAST, enabled=False), second_pass=FAST, fusion_before=False,
        fusion_after=False, color_shift=False, return_intermediates=True,
    )  # fmt: skip
    template = sample_photo("astronaut")
    result = orchestrator.generate(template, ["alice"], only_second, seed=7)
    kept = dict(result.intermediates)
    x0, y0, x1, y1 = int_box(grow_box(result.faces[0].face.box, 3.0, 512, 512))
    size = (x1 - x0, y1 - y0)
    ring = cv2.resize(kept["face0_second_mask"], size, interpolation=cv2.INTER_NEAREST) > 127
    first = cv2.resize(kept["face0_inpaint_mask"], size, interpolation=cv2.INTER_NEAREST)
    beyond = ring & (cv2.dilate(first, np.ones((5, 5), np.uint8)) <= 127)
    changed = np.any(result.image[y0:y1, x0:x1] != template[y0:y1, x0:x1], axis=-1)
    assert beyond.sum() > 100
    assert changed[beyond].mean() > 0.3


def _with_face_models(orchestrator: Orchestrator, **changes: object) -> Orchestrator:
    """An orchestrator sharing ``orchestrator``'s engines, users and step loop, its face models
    the defaults with ``changes``."""
    return Orchestrator(
        orchestrator.engines, orchestrator.scheduler_config,
        replace(default_face_models(), **changes), orchestrator.analyzer, orchestrator.users,
        steps=orchestrator.steps,
    )  # fmt: skip


class InvertingSwapper:
    """A face swapper with a known answer (the target inverted), recording the embeddings given."""

    def __init__(self) -> None:
        self.embeddings: list[np.ndarray] = []

    def __call__(self, target: np.ndarray, target_face: object, embedding: np.ndarray) -> np.ndarray:
        self.embeddings.append(embedding)
        return 255 - target


def test_a_loaded_face_swapper_replaces_the_warp_in_both_fusions(orchestrator: Orchestrator) -> None:
    swapper = InvertingSwapper()
    swapping = _with_face_models(orchestrator, swapper=swapper)
    off = replace(FAST, enabled=False)
    options = GenerateOptions(
        first_pass=off, second_pass=off, seam_pass=off, color_shift=False, return_intermediates=True
    )
    template = sample_photo("astronaut")
    warped = dict(orchestrator.generate(template, ["alice"], options, seed=1).intermediates)
    swapped = dict(swapping.generate(template, ["alice"], options, seed=1).intermediates)
    alice = swapping.prepare_user("alice")
    assert len(swapper.embeddings) == 2  # before the first pass and after it
    assert all(np.array_equal(e, alice.embedding) for e in swapper.embeddings)
    inverted = 255 - warped["face0_crop"].astype(int)
    fused = swapped["face0_fusion_before"].astype(int)
    assert np.abs(fused - inverted).sum() < np.abs(warped["face0_fusion_before"].astype(int) - inverted).sum()


class RecordingPose:
    """A pose model with a known answer (one arm), recording the images it was shown."""

    def __init__(self) -> None:
        self.images: list[np.ndarray] = []

    def __call__(self, image: np.ndarray, box: tuple[float, float, float, float]) -> Pose:
        self.images.append(image)
        body = np.full((18, 2), np.nan, np.float32)
        body[1], body[2], body[3] = (100, 200), (40, 220), (30, 300)
        return Pose(body)


def test_the_pose_is_read_from_the_face_id_image_pasted_on_the_template(orchestrator: Orchestrator) -> None:
    off = replace(FAST, enabled=False)
    options = GenerateOptions(first_pass=off, second_pass=off, seam_pass=off, return_intermediates=True)
    template = sample_photo("astronaut")
    kept = dict(orchestrator.generate(template, ["alice"], options, seed=1).intermediates)
    crop, source = kept["face0_crop"], kept["face0_pose_source"]
    crop_face, pasted_face = orchestrator.analyzer.largest(crop), orchestrator.analyzer.largest(source)
    alice = orchestrator.prepare_user("alice")
    user = alice.face_id_face.landmarks  # fitted onto the template's by a similarity (her proportions)
    fitted = transform_points(similarity_transform(user, crop_face.landmarks), user)
    assert np.abs(pasted_face.landmarks - fitted).max() < 0.1 * crop_face.width  # detection noise
    embed = orchestrator.analyzer.embed
    to_alice = float(embed(source, [pasted_face])[0] @ alice.embedding)
    to_template = float(embed(crop, [crop_face])[0] @ alice.embedding)
    assert to_alice > 0.95 and to_template < 0.9  # the face there is alice's (measured 0.996, 0.847)
    assert np.array_equal(source[:10, :10], crop[:10, :10])  # the rest is the template

    estimator = RecordingPose()
    posing = _with_face_models(orchestrator, pose=estimator)
    kept = dict(posing.generate(template, ["alice"], options, seed=1).intermediates)
    assert len(estimator.images) == 1 and np.array_equal(estimator.images[0], kept["face0_pose_source"])
    drawn = draw_pose(crop.shape[:2], [estimator(source, (0, 0, 1, 1))])
    assert np.array_equal(kept["face0_openpose"], drawn)


class GreyEnhancer:
    """A x2 enhancer with a known answer (flat grey), recording the sizes it was given."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, image: np.ndarray) -> np.ndarray:
        self.shapes.append(image.shape)
        return np.full((image.shape[0] * 2, image.shape[1] * 2, 3), 200, np.uint8)


def test_super_resolution_runs_on_the_whole_output_only_with_an_enhancer(orchestrator: Orchestrator) -> None:
    off = replace(FAST, enabled=False)
    options = GenerateOptions(first_pass=off, second_pass=off, seam_pass=off)
    template = sample_photo("astronaut")
    plain = orchestrator.generate(template, ["alice"], options, seed=1)
    assert plain.skipped == {"super_resolution": "no enhancer model is loaded (--face-enhancer)"}
    assert "super_resolution" not in plain.timings

    enhancer = GreyEnhancer()
    enhancing = _with_face_models(orchestrator, upscaler=enhancer)
    enhanced = enhancing.generate(template, ["alice"], options, seed=1)
    assert enhanced.skipped == {} and enhanced.timings["super_resolution"] > 0
    crop_shape, whole_shape = enhancer.shapes
    assert whole_shape == template.shape  # the whole output, last
    assert max(crop_shape[:2]) < 512  # the working-size crop, grown back to its size in the template
    corner = enhanced.image[:20, :20].astype(float)  # far from the face: only the final blend
    difference = np.abs(corner - (template[:20, :20] * 0.5 + 100))  # up and down again: resampling
    assert difference.mean() < 1 and difference.max() <= 4
    zero = enhancing.generate(template, ["alice"], replace(options, super_resolution_ratio=0.0), seed=1)
    assert zero.skipped == {"super_resolution": "super_resolution_ratio is 0"}
    assert np.array_equal(zero.image[:20, :20], template[:20, :20])


class RecordingRetoucher:
    """A retoucher with a known answer (mid grey), recording the face widths it was given."""

    def __init__(self) -> None:
        self.widths: list[float] = []

    def __call__(self, crop: np.ndarray, face_width: float) -> np.ndarray:
        self.widths.append(face_width)
        return np.full_like(crop, 128)


def test_skin_retouching_runs_on_each_painted_faces_skin_only_when_asked(orchestrator: Orchestrator) -> None:
    off = replace(FAST, enabled=False)
    options = GenerateOptions(first_pass=off, second_pass=off, seam_pass=off, return_intermediates=True)
    retoucher = RecordingRetoucher()
    retouching = _with_face_models(orchestrator, retoucher=retoucher)
    template = sample_photo("group")
    plain = retouching.generate(template, ["alice", "", "alice"], options, seed=1)
    assert retoucher.widths == [] and "skin_retouching" not in plain.timings  # off by default
    asked = retouching.generate(
        template, ["alice", "", "alice"], replace(options, skin_retouching=True), seed=1
    )
    painted = [asked.faces[0].face, asked.faces[2].face]
    assert retoucher.widths == pytest.approx([face.width for face in painted])
    assert asked.timings["skin_retouching"] > 0
    assert "skin_retouching" in dict(asked.intermediates)
    changed = np.any(asked.image != plain.image, axis=2)
    grey = np.all(asked.image == 128, axis=2)
    for outcome in (asked.faces[0], asked.faces[2]):
        x0, y0, x1, y1 = int_box(outcome.face.box)
        assert grey[y0:y1, x0:x1].mean() > 0.2  # the skin, fully inside the feathered mask
    # Nothing changes outside the painted faces' skin (the skipped face 1 included).
    skin = union([only_parts(LandmarkParser()(plain.image, face), ("skin", "nose")) for face in painted])
    assert changed.any() and not changed[skin == 0].any()


def test_the_harness_baseline_paints_the_crop_the_orchestrator_paints(
    orchestrator: Orchestrator, tiny: ModelFamily
) -> None:
    from easyphoto.cli.load_bench import TEMPLATE, template_crop_size

    off = replace(FAST, enabled=False)
    options = GenerateOptions(first_pass=off, second_pass=off, seam_pass=off, return_intermediates=True)
    kept = dict(orchestrator.generate(sample_photo(TEMPLATE), ["alice"], options, seed=1).intermediates)
    height, width = kept["face0_crop"].shape[:2]
    assert template_crop_size(tiny) == (width, height)
    # At full SD 1.5 size (multiples of 64, sides up to 1024) the face's box of 3x its size is not
    # square: its crop has more pixels than the 512 x 512 a plain baseline would paint.
    template = sample_photo(TEMPLATE)
    face = orchestrator.analyzer.detect(template)[0]
    _, size = face_crop(face.box, template.shape[1], template.shape[0], GenerateOptions(), 64, 1024)
    assert size[0] == 512 and size[1] > 512
