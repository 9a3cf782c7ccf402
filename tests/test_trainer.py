"""The trainer on the tiny models and real face models: jobs over gRPC, training, merge, cancel, and a
trainer process killed mid-job."""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from processes import free_port, trainer_process

from easyphoto.engines.faces.detect import FaceAnalyzer
from easyphoto.engines.faces.models import default_face_models
from easyphoto.engines.lora import load_lora
from easyphoto.engines.models.family import ModelFamily
from easyphoto.engines.models.loading import tiny_family
from easyphoto.fixtures.photos import person_photos, sample_photo
from easyphoto.imaging.codec import encode_png
from easyphoto.rpc.errors import NoUsablePhotos, UnknownUser
from easyphoto.rpc.wire import error_details
from easyphoto.trainer.app import TrainerApp, TrainerConfig, build_trainer
from easyphoto.trainer.lora_training import LoraTrainer, TrainingImages
from easyphoto.trainer.merge import merge_checkpoints
from easyphoto.trainer.options import TINY_FAMILY_TRAINING, TrainingOptions
from easyphoto.trainer.validation import ValidationImage
from easyphoto.v1 import trainer_pb2, trainer_pb2_grpc, users_pb2, users_pb2_grpc

FAST = {
    "rank": 4,
    "alpha": 4.0,
    "resolution": 64,
    "gradient_accumulation_steps": 1,
    "steps_per_photo": 2,
    "max_train_steps": 6,
    "validation_interval": 2,
    "validation_steps": 4,
    "validation_templates": 2,
    "merge_top_k": 3,
    "seed": 5,
}
DONE = (trainer_pb2.JOB_STATE_SUCCEEDED, trainer_pb2.JOB_STATE_FAILED, trainer_pb2.JOB_STATE_CANCELLED)


def other_person(faces: FaceAnalyzer) -> np.ndarray:
    group = sample_photo("group")
    x0, y0, x1, y1 = (int(v) for v in faces.detect(group)[2].box)
    side = x1 - x0
    return group[max(0, y0 - side) : y1 + side, max(0, x0 - side) : x1 + side].copy()


@pytest.fixture(scope="module")
def channel(trainer: TrainerApp) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{trainer.app.port}") as channel:
        yield channel


def _request(
    user_id: str, photos: list[np.ndarray | bytes], **options: object
) -> trainer_pb2.CreateTrainingJobRequest:
    encoded = [p if isinstance(p, bytes) else encode_png(p) for p in photos]
    return trainer_pb2.CreateTrainingJobRequest(
        user_id=user_id, photos=encoded, options=trainer_pb2.TrainingOptions(**{**FAST, **options})
    )


def _watch(channel: grpc.Channel, job_id: str) -> list[trainer_pb2.Job]:
    stub = trainer_pb2_grpc.TrainerStub(channel)
    events = []
    for job in stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job_id), timeout=300):
        events.append(job)
        if job.state in DONE:
            break
    return events


def test_a_job_publishes_a_user_and_reports_every_dropped_photo(
    trainer: TrainerApp, channel: grpc.Channel, faces: FaceAnalyzer
) -> None:
    photos: list[np.ndarray | bytes] = [
        *person_photos(),
        sample_photo("coffee"),
        b"not an image",
        other_person(faces),
    ]
    job = trainer_pb2_grpc.TrainerStub(channel).CreateTrainingJob(
        _request("ann", photos, drop_different_person=True), timeout=30
    )
    assert (
        job.state == trainer_pb2.JOB_STATE_QUEUED and job.options.rank == 4 and job.options.merge_top_k == 3
    )
    assert trainer.runner.users.training_jobs("ann") == [job.job_id]  # what serving replicas read
    events = _watch(channel, job.job_id)
    final = events[-1]
    assert final.state == trainer_pb2.JOB_STATE_SUCCEEDED, final.error
    assert {e.stage for e in events} >= {"train", "validate_lora", "done"}
    assert final.step == final.total_steps == 6  # min(4 photos x 2, 6)
    reasons = {p.index: p.reason for p in final.photos if not p.kept}
    assert reasons == {4: "NO_FACE", 5: "IMAGE_UNREADABLE", 6: "DIFFERENT_PERSON"}
    assert all(p.identity_score > 0.9 for p in final.photos if p.kept)
    assert (
        final.photos[6].median_similarity < faces.same_person_threshold <= final.photos[0].median_similarity
    )
    assert final.photos[0].crop_box.x1 > final.photos[0].face_box.x1  # the framing is reported

    folder = trainer.runner.users.user_dir("ann") / "v1"
    assert final.published_version == 1 and (folder.parent / "CURRENT").read_text() == "1"
    report = json.loads((folder / "report.json").read_text())
    assert len(report["validation"]) == 3 * 2 and len(report["merged_from"]) == 3
    assert report["option_defaults"].startswith("tiny family") and report["options"]["rank"] == 4
    lora = load_lora(folder / "lora.safetensors")
    assert lora.targets == {"unet", "text_encoder"} and {x.rank for x in lora.layers} == {4}
    assert np.load(folder / "embeddings.npy").shape[0] == 4
    assert Image.open(io.BytesIO((folder / "face_id.png").read_bytes())).size[0] >= 64

    user = users_pb2_grpc.UsersStub(channel).GetUser(users_pb2.GetUserRequest(user_id="ann"), timeout=10)
    assert user.state == users_pb2.USER_STATE_READY and user.version == 1 and len(user.lora_sha256) == 64
    assert not (trainer.runner.job_dir(job.job_id) / "checkpoints").exists()
    assert trainer.runner.users.training_jobs("ann") == []


def test_a_job_with_the_identity_reward_stage_reports_its_rewards_and_publishes(
    trainer: TrainerApp, channel: grpc.Channel
) -> None:
    request = _request(
        "rita", person_photos()[:2], identity_reward=True, reward_iterations=2, reward_samples_per_template=2
    )
    job = trainer_pb2_grpc.TrainerStub(channel).CreateTrainingJob(request, timeout=30)
    events = _watch(channel, job.job_id)
    final = events[-1]
    assert final.state == trainer_pb2.JOB_STATE_SUCCEEDED, final.error
    stages = [e.stage for e in events]
    assert stages.index("merge") < stages.index("identity_reward") < stages.index("publish")
    during = [e for e in events if e.stage == "identity_reward" and e.identity_reward.mean_rewards]
    assert [len(e.identity_reward.mean_rewards) for e in during][-1] == 2 and during[0].total_steps == 2
    reward = final.identity_reward
    assert reward.kept in ("tuned", "pre_rl") and reward.HasField("after") and len(reward.mean_rewards) == 2
    assert (reward.kept == "tuned") == (reward.after > reward.before)
    assert (reward.kept == "pre_rl") == any("identity reward did not rise" in w for w in final.warnings)
    folder = trainer.runner.users.user_dir("rita") / "v1"
    report = json.loads((folder / "report.json").read_text())["identity_reward"]
    assert report["before"] == pytest.approx(reward.before) and report["kept"] == reward.kept
    assert [r["iteration"] for r in report["iterations"]] == [1, 2] and report["stopped_by"] == "iterations"
    assert not (trainer.runner.job_dir(job.job_id) / "reward").exists()  # its checkpoints are gone


def test_metrics_count_jobs_steps_and_dropped_photos(trainer: TrainerApp, channel: grpc.Channel) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    stub = trainer_pb2_grpc.TrainerStub(channel)
    job = stub.CreateTrainingJob(_request("ivy", [*person_photos()[:2], b"junk"]), timeout=30)
    assert _watch(channel, job.job_id)[-1].state == trainer_pb2.JOB_STATE_SUCCEEDED
    assert trainer.app.http is not None
    base = f"http://127.0.0.1:{trainer.app.http.port}"
    with urllib.request.urlopen(f"{base}/readyz", timeout=5) as reply:
        assert reply.status == 200
    finished = ("easyphoto_training_jobs_finished_total", (("state", "JOB_STATE_SUCCEEDED"),))
    for _ in range(50):  # the runner counts a job just after its final state is stored
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as reply:
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(reply.read().decode())
                for s in family.samples
            }
        if finished in samples:
            break
        time.sleep(0.1)
    assert samples[("easyphoto_training_jobs_finished_total", (("state", "JOB_STATE_SUCCEEDED"),))] >= 1
    assert samples[("easyphoto_training_photos_dropped_total", (("reason", "IMAGE_UNREADABLE"),))] >= 1
    assert samples[("easyphoto_training_steps_total", ())] >= 4
    assert samples[("easyphoto_training_jobs_queued", ())] == 0  # read from the store at the scrape
    assert samples[("easyphoto_training_jobs_running", ())] == 0
    handled = {
        dict(labels)["grpc_method"]: value
        for (name, labels), value in samples.items()
        if name == "grpc_server_handled_total" and dict(labels)["grpc_code"] == "OK"
    }
    assert handled["CreateTrainingJob"] >= 1


def test_all_photos_unusable_fails_with_every_reason(trainer: TrainerApp, channel: grpc.Channel) -> None:
    stub = trainer_pb2_grpc.TrainerStub(channel)
    job = stub.CreateTrainingJob(_request("bad", [sample_photo("coffee"), b"\x89PNG broken"]), timeout=30)
    final = _watch(channel, job.job_id)[-1]
    assert final.state == trainer_pb2.JOB_STATE_FAILED
    assert final.error.reason == NoUsablePhotos.reason and final.error.code == "FAILED_PRECONDITION"
    assert "photo 0: NO_FACE" in final.error.message and "photo 1: IMAGE_UNREADABLE" in final.error.message
    user = users_pb2_grpc.UsersStub(channel).GetUser(users_pb2.GetUserRequest(user_id="bad"), timeout=10)
    assert user.state == users_pb2.USER_STATE_FAILED
    with pytest.raises(UnknownUser):  # nothing published, nothing training: unknown to serving
        trainer.runner.users.load("bad")


def test_cancel_stops_a_running_job_and_a_queued_one(trainer: TrainerApp, channel: grpc.Channel) -> None:
    stub = trainer_pb2_grpc.TrainerStub(channel)
    long = stub.CreateTrainingJob(
        _request("cat", person_photos()[:2], max_train_steps=500, validation_interval=1000), timeout=30
    )
    queued = stub.CreateTrainingJob(_request("dan", person_photos()[:2]), timeout=30)
    for job in stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=long.job_id), timeout=120):
        if job.step >= 2:
            break
    assert (
        stub.CancelJob(trainer_pb2.CancelJobRequest(job_id=queued.job_id)).state
        == trainer_pb2.JOB_STATE_CANCELLED
    )
    stub.CancelJob(trainer_pb2.CancelJobRequest(job_id=long.job_id), timeout=10)
    final = _watch(channel, long.job_id)[-1]
    assert final.state == trainer_pb2.JOB_STATE_CANCELLED and final.step < 500
    assert trainer.runner.users.current_version("cat") is None
    assert trainer.runner.users.training_jobs("cat") == trainer.runner.users.training_jobs("dan") == []


def test_deleting_a_user_removes_its_finished_jobs_and_their_files(
    trainer: TrainerApp, channel: grpc.Channel
) -> None:
    stub = trainer_pb2_grpc.TrainerStub(channel)
    users = users_pb2_grpc.UsersStub(channel)
    job = stub.CreateTrainingJob(_request("gus", person_photos()[:1]), timeout=30)
    stub.CancelJob(trainer_pb2.CancelJobRequest(job_id=job.job_id), timeout=10)
    _watch(channel, job.job_id)
    assert users.GetUser(users_pb2.GetUserRequest(user_id="gus"), timeout=10).user_id == "gus"
    reply = users.DeleteUser(users_pb2.DeleteUserRequest(user_id="gus"), timeout=10)
    assert reply.deleted_versions == 0
    listed = users.ListUsers(users_pb2.ListUsersRequest(page_size=500), timeout=10)
    assert "gus" not in {u.user_id for u in listed.users}
    assert not trainer.runner.job_dir(job.job_id).exists()
    for call, request in (
        (users.GetUser, users_pb2.GetUserRequest(user_id="gus")),
        (users.DeleteUser, users_pb2.DeleteUserRequest(user_id="gus")),
        (stub.GetJob, trainer_pb2.GetJobRequest(job_id=job.job_id)),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death is the test
def test_a_dead_worker_makes_the_trainer_unready(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = build_trainer(
        TrainerConfig(port=0, data=tmp_path, device="cpu", metrics_port=0), default_face_models()
    )

    def die(*claimed: object) -> None:
        raise SystemExit("fatal")  # not an Exception: nothing in the worker's loop catches it

    monkeypatch.setattr(app.runner, "run_claimed", die)
    app.start()
    try:
        assert app.app.serving
        with grpc.insecure_channel(f"127.0.0.1:{app.app.port}") as channel:
            trainer_pb2_grpc.TrainerStub(channel).CreateTrainingJob(_request("eve", person_photos()[:2]))
            deadline = time.monotonic() + 30
            while app.app.serving and time.monotonic() < deadline:
                time.sleep(0.05)
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            liveness = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="liveness"), timeout=5
            )
        assert not app.runner.alive
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert liveness.status == health_pb2.HealthCheckResponse.NOT_SERVING  # the kubelet restarts it
        assert app.app.http is not None
        with pytest.raises(urllib.error.HTTPError) as unready:
            urllib.request.urlopen(f"http://127.0.0.1:{app.app.http.port}/readyz", timeout=5)
        assert unready.value.code == 503
        with pytest.raises(urllib.error.HTTPError) as dead:
            urllib.request.urlopen(f"http://127.0.0.1:{app.app.http.port}/healthz", timeout=5)
        assert dead.value.code == 503
    finally:
        app.stop(0)


def test_unset_options_take_the_tiny_familys_defaults(channel: grpc.Channel) -> None:
    """The reference's 512 px and 800 steps would take hours on the tiny family here."""
    stub = trainer_pb2_grpc.TrainerStub(channel)
    request = trainer_pb2.CreateTrainingJobRequest(
        user_id="tia", photos=[encode_png(person_photos()[0])], options=trainer_pb2.TrainingOptions(rank=4)
    )
    job = stub.CreateTrainingJob(request, timeout=30)
    stub.CancelJob(trainer_pb2.CancelJobRequest(job_id=job.job_id), timeout=10)
    assert job.options.rank == 4  # set: kept
    assert (job.options.resolution, job.options.max_train_steps) == (128, 400)
    assert job.options.gradient_accumulation_steps == TINY_FAMILY_TRAINING.gradient_accumulation_steps == 1
    assert _watch(channel, job.job_id)[-1].state == trainer_pb2.JOB_STATE_CANCELLED


def test_bad_requests_get_their_codes(channel: grpc.Channel) -> None:
    stub = trainer_pb2_grpc.TrainerStub(channel)
    photo = person_photos()[0]
    cases = [
        (_request("no/slash", [photo]), "INVALID_ARGUMENT", "user_id"),
        (_request("eve", []), "INVALID_ARGUMENT", "photos"),
        (_request("eve", [photo], rank=0), "INVALID_ARGUMENT", "options.rank"),
        (
            _request("eve", [photo], validation_strength=1.5),
            "INVALID_ARGUMENT",
            "options.validation_strength",
        ),
    ]
    for request, code, field in cases:
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateTrainingJob(request, timeout=10)
        details = error_details(info.value)
        assert (details["code"], field in details["fields"]) == (code, True), details
    with pytest.raises(grpc.RpcError) as info:
        stub.GetJob(trainer_pb2.GetJobRequest(job_id="nope"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_one_job_per_user_at_a_time_and_request_ids_are_idempotent(channel: grpc.Channel) -> None:
    stub = trainer_pb2_grpc.TrainerStub(channel)
    users = users_pb2_grpc.UsersStub(channel)
    request = _request("fay", person_photos()[:2], max_train_steps=400, validation_interval=1000)
    request.request_id = "fay-1"
    first = stub.CreateTrainingJob(request, timeout=30)
    assert stub.CreateTrainingJob(request, timeout=30).job_id == first.job_id
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateTrainingJob(_request("fay", person_photos()[:2]), timeout=30)
    assert error_details(info.value)["reason"] == "USER_TRAINING"
    with pytest.raises(grpc.RpcError) as info:
        users.DeleteUser(users_pb2.DeleteUserRequest(user_id="fay"), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    stub.CancelJob(trainer_pb2.CancelJobRequest(job_id=first.job_id), timeout=10)
    assert _watch(channel, first.job_id)[-1].state == trainer_pb2.JOB_STATE_CANCELLED


def _trainer(tiny: ModelFamily, photos: list[np.ndarray], **options: object) -> LoraTrainer:
    """A trainer on a fresh copy of the tiny family (adapters are injected into its modules)."""
    settings = TrainingOptions(**{**FAST, **options})  # type: ignore[arg-type]
    images = TrainingImages(photos, settings.resolution, settings.random_flip)
    return LoraTrainer(tiny_family(), images, settings, seed=1, device="cpu")


def test_loss_falls_when_overfitting_one_batch(tiny: ModelFamily) -> None:
    face = sample_photo("astronaut")[40:300, 140:400]
    trainer = _trainer(
        tiny, [face], unet_learning_rate=1e-3, text_encoder_learning_rate=1e-3, random_flip=False
    )
    losses = [trainer.train_step(0) for _ in range(25)]  # step 0 each time: the same batch and noise
    assert losses[-1] < 0.7 * losses[0], losses


def test_merged_lora_is_the_mean_of_the_chosen_checkpoints(tiny: ModelFamily, tmp_path: Path) -> None:
    trainer = _trainer(tiny, person_photos()[:1], unet_learning_rate=1e-2)
    paths = {}
    for step in (1, 2, 3):
        trainer.train_step(step)
        paths[step] = trainer.save_checkpoint(tmp_path, step)
    results = [
        ValidationImage(1, 0, 0.2, ""), ValidationImage(2, 0, 0.9, ""), ValidationImage(3, 0, 0.5, ""),
        ValidationImage(2, 1, 0.8, ""), ValidationImage(3, 1, 0.1, ""),
    ]  # fmt: skip
    merged, chosen = merge_checkpoints(results, 3, lambda step: load_lora(paths[step]), "merged")
    assert [(c.step, c.template) for c in chosen] == [(2, 0), (2, 1), (3, 0)]
    checkpoints = [{(x.target, x.module): x for x in load_lora(paths[s]).layers} for s in (2, 2, 3)]
    for layer in merged.layers:
        parts = [table[(layer.target, layer.module)] for table in checkpoints]
        assert torch.equal(layer.down, torch.stack([p.down for p in parts]).mean(0))
        assert torch.equal(layer.up, torch.stack([p.up for p in parts]).mean(0))
    assert not torch.equal(checkpoints[0][next(iter(checkpoints[0]))].up, load_lora(paths[3]).layers[0].up)


def test_a_checkpoint_restores_the_adapters_and_optimizer(tiny: ModelFamily, tmp_path: Path) -> None:
    trainer = _trainer(tiny, person_photos()[:1])
    trainer.train_step(1)
    path = trainer.save_checkpoint(tmp_path, 1)
    expected = trainer.train_step(2), trainer.lora("after")
    resumed = _trainer(tiny, person_photos()[:1])
    resumed.load_checkpoint(path)
    assert resumed.train_step(2) == pytest.approx(expected[0], abs=1e-6)
    for a, b in zip(resumed.lora("x").layers, expected[1].layers, strict=True):
        assert torch.allclose(a.up, b.up, atol=1e-6) and torch.allclose(a.down, b.down, atol=1e-6)


def test_a_tilted_photo_still_crops_around_the_face(faces: FaceAnalyzer) -> None:
    from easyphoto.trainer.photos import prepare_photos

    photo = sample_photo("astronaut")
    tilted = cv2.warpAffine(
        photo, cv2.getRotationMatrix2D((256, 256), 12, 1.0), (512, 512), borderMode=cv2.BORDER_REFLECT
    )
    prepared = prepare_photos(
        [encode_png(photo), encode_png(tilted)], TrainingOptions(), faces, default_face_models()
    )
    assert len(prepared.crops) == 2
    for crop, face in zip(prepared.crops, prepared.crop_faces, strict=True):
        height, width = crop.shape[:2]
        assert 0 <= face.box[0] < face.box[2] <= width and 0 <= face.box[1] < face.box[3] <= height
    scores = [r.roll_score for r in prepared.reports]
    assert scores[0] > scores[1]


def test_training_images_keep_the_3x_framing_and_only_the_tight_rectangle(faces: FaceAnalyzer) -> None:
    """preprocess.py L224-246: the training image is the 3x crop (the scale faces are painted at),
    white outside the saliency matte and the rectangle x +- 0.30 w, y0 + 0.15 h .. y1 + 0.15 h."""
    from easyphoto.trainer.photos import prepare_photos

    prepared = prepare_photos(
        [encode_png(p) for p in person_photos()[:2]], TrainingOptions(), faces, default_face_models()
    )
    assert len(prepared.crops) == 2
    for crop, face, report in zip(prepared.crops, prepared.crop_faces, prepared.reports, strict=True):
        x0, y0, x1, _ = report.crop_box
        fx0, _, fx1, _ = report.face_box
        assert (x1 - x0) / (fx1 - fx0) == pytest.approx(3.0, abs=0.05)  # not clipped sideways here
        assert crop.shape[1] / face.width == pytest.approx(3.0, rel=0.15)  # re-detected in the crop
        top = int(face.box[1] + 0.15 * face.height)  # the top edge moves down, below the hairline
        assert (crop[: top - 1] == 255).all() and (crop[top + 2 : top + 12] != 255).any()
        assert report.tight_box[1] == pytest.approx(y0 + top, abs=1.5)
        left = int(face.box[0] - 0.30 * face.width)
        assert (crop[:, : max(left - 1, 0)] == 255).all()
    assert (prepared.reference[:5] != 255).any()  # the reference photo is the 3x crop, not matted


def test_a_photo_unlike_the_others_is_kept_with_a_warning_by_default(faces: FaceAnalyzer) -> None:
    """The reference only ranks by similarity to the mean; the majority check only warns."""
    from easyphoto.trainer.photos import prepare_photos

    photos = [encode_png(p) for p in [*person_photos(), other_person(faces)]]
    prepared = prepare_photos(photos, TrainingOptions(), faces, default_face_models())
    assert all(r.kept for r in prepared.reports) and len(prepared.crops) == 5
    assert any(w.startswith("photo 4 may show someone else (median similarity") for w in prepared.warnings)
    others = min(r.median_similarity for r in prepared.reports[:4])
    assert prepared.reports[4].median_similarity < faces.same_person_threshold <= others
    dropped = prepare_photos(
        photos, TrainingOptions(drop_different_person=True), faces, default_face_models()
    )
    assert dropped.reports[4].reason == "DIFFERENT_PERSON" and len(dropped.crops) == 4


def test_portrait_enhancement_upscales_small_crops_for_at_most_half_the_photos(faces: FaceAnalyzer) -> None:
    from easyphoto.trainer.photos import prepare_photos

    photos = [encode_png(p) for p in person_photos()[:2]]
    plain = prepare_photos(photos, TrainingOptions(), faces, default_face_models())
    enhanced = prepare_photos(
        photos, TrainingOptions(portrait_enhancement=True), faces, default_face_models()
    )
    grown = [b.shape[0] / a.shape[0] for a, b in zip(plain.crops, enhanced.crops, strict=True)]
    assert sorted(grown) == [1.0, 2.0]  # one of two photos (preprocess.py L211-218), x2
    index = grown.index(2.0)
    scaled, face = enhanced.crop_faces[index], plain.crop_faces[index]
    assert scaled.box == pytest.approx(tuple(2 * v for v in face.box))


def test_skin_retouching_smooths_the_skin_of_each_training_crop(faces: FaceAnalyzer) -> None:
    from easyphoto.engines.faces.parts import LandmarkParser
    from easyphoto.imaging.masks import only_parts
    from easyphoto.trainer.photos import prepare_photos

    photos = [encode_png(p) for p in person_photos()[:2]]
    plain = prepare_photos(photos, TrainingOptions(), faces, default_face_models())
    stages: list[str] = []
    retouched = prepare_photos(
        photos, TrainingOptions(skin_retouching=True), faces, default_face_models(), stages.append
    )
    assert stages.index("crop") < stages.index("retouch") < stages.index("matte")
    assert retouched.warnings == plain.warnings
    for before, after, face in zip(plain.crops, retouched.crops, retouched.crop_faces, strict=True):
        changed = np.any(before != after, axis=2)
        skin = only_parts(LandmarkParser()(before, face), ("skin", "nose"))
        # Outside the skin only the matte may differ (GrabCut sees the retouched colours).
        matte_edge = np.all(before == 255, axis=2) | np.all(after == 255, axis=2)
        assert changed.mean() > 0.01 and not (changed & (skin == 0) & ~matte_edge).any()
    assert not np.array_equal(plain.reference, retouched.reference)  # the "roop" photo too


def test_a_photo_whose_matte_is_empty_is_dropped_with_its_reason(faces: FaceAnalyzer) -> None:
    from easyphoto.trainer.photos import prepare_photos

    nothing = replace(default_face_models(), matte=lambda image, box: np.zeros(image.shape[:2], np.uint8))
    prepared = prepare_photos([encode_png(person_photos()[0])], TrainingOptions(), faces, nothing)
    assert prepared.crops == [] and prepared.reports[0].reason == "EMPTY_MATTE"
    assert not prepared.reports[0].kept and "EMPTY_MATTE" in prepared.no_usable_photos().message


STEPS = 12
INTERVAL = 3


def test_a_killed_trainer_resumes_its_job_with_no_partial_artifacts(tmp_path: Path) -> None:
    data = tmp_path
    port = free_port()
    first = trainer_process(data, data / "trainer-1.log", port=port)
    try:
        first.wait_serving()
        with grpc.insecure_channel(first.address) as channel:
            stub = trainer_pb2_grpc.TrainerStub(channel)
            options = trainer_pb2.TrainingOptions(
                **{**FAST, "max_train_steps": STEPS, "steps_per_photo": 100, "validation_interval": INTERVAL}
            )
            photos = [encode_png(p) for p in person_photos()[:2]]
            job = stub.CreateTrainingJob(
                trainer_pb2.CreateTrainingJobRequest(user_id="kim", photos=photos, options=options),
                timeout=30,
            )
            for state in stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id), timeout=120):
                if state.step > INTERVAL:  # the step-3 checkpoint is on disk
                    break
    finally:
        first.kill()
    killed_at = state.step
    assert killed_at < STEPS
    checkpoints = sorted((data / "jobs" / job.job_id / "checkpoints").glob("step-*.safetensors"))
    assert checkpoints and not (data / "users" / "kim" / "CURRENT").exists()

    second = trainer_process(data, data / "trainer-2.log", port=port)
    try:
        second.wait_serving()
        with grpc.insecure_channel(second.address) as channel:
            stub = trainer_pb2_grpc.TrainerStub(channel)
            final = None
            for final in stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id), timeout=300):
                if final.state not in (trainer_pb2.JOB_STATE_QUEUED, trainer_pb2.JOB_STATE_RUNNING):
                    break
    finally:
        second.kill()
    assert final is not None and final.state == trainer_pb2.JOB_STATE_SUCCEEDED, final
    assert any("resumed after a trainer restart" in w for w in final.warnings)
    user = data / "users" / "kim"
    assert sorted(p.name for p in user.iterdir()) == ["CURRENT", "v1"]  # no staging leftovers
    assert load_lora(user / "v1" / "lora.safetensors").layers
    report = (user / "v1" / "report.json").read_text()
    assert f'"step": {STEPS}' in report


def test_train_jobs_and_users_commands(
    trainer: TrainerApp, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from easyphoto.cli.main import main

    paths = []
    for index, photo in enumerate([*person_photos()[:2], sample_photo("coffee")]):
        paths.append(tmp_path / f"{index}.png")
        paths[-1].write_bytes(encode_png(photo))
    server = f"127.0.0.1:{trainer.app.port}"
    settings = [arg for key, value in FAST.items() for arg in ("--set", f"{key}={value}")]
    assert main(["train", "--user", "gus", "--server", server, *settings, *map(str, paths)]) == 0
    out = capsys.readouterr().out
    assert "photo 2" in out and "dropped: NO_FACE" in out and "published gus v1" in out
    assert main(["jobs", "--server", server, "--user", "gus"]) == 0
    jobs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(j["user_id"], j["state"]) for j in jobs] == [("gus", "JOB_STATE_SUCCEEDED")]
    assert main(["users", "--server", server]) == 0
    users = {u["user_id"]: u for u in map(json.loads, capsys.readouterr().out.splitlines())}
    assert users["gus"]["state"] == "USER_STATE_READY" and users["gus"]["version"] == 1
    assert main(["train", "--user", "gus", "--server", server, "--set", "rank=0", str(paths[0])]) == 2
    assert "options.rank" in capsys.readouterr().err
    assert main(["users", "--server", server, "--delete", "gus"]) == 0
    assert json.loads(capsys.readouterr().out) == {"deleted_versions": 1}


def test_a_trainer_killed_mid_identity_reward_resumes_the_stage_where_it_was(tmp_path: Path) -> None:
    port = free_port()
    first = trainer_process(tmp_path, tmp_path / "trainer-1.log", port=port)
    options = trainer_pb2.TrainingOptions(
        **FAST, identity_reward=True, reward_iterations=2, reward_samples_per_template=2
    )
    try:
        first.wait_serving()
        with grpc.insecure_channel(first.address) as channel:
            stub = trainer_pb2_grpc.TrainerStub(channel)
            photos = [encode_png(p) for p in person_photos()[:2]]
            job = stub.CreateTrainingJob(
                trainer_pb2.CreateTrainingJobRequest(user_id="rex", photos=photos, options=options),
                timeout=30,
            )
            for state in stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id), timeout=180):
                if len(state.identity_reward.mean_rewards) >= 1:  # iteration 1 is checkpointed
                    break
    finally:
        first.kill()
    done_before_kill = list(state.identity_reward.mean_rewards)
    assert state.stage == "identity_reward" and len(done_before_kill) == 1
    second = trainer_process(tmp_path, tmp_path / "trainer-2.log", port=port)
    try:
        second.wait_serving()
        with grpc.insecure_channel(second.address) as channel:
            stub = trainer_pb2_grpc.TrainerStub(channel)
            final = None
            for final in stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id), timeout=300):
                if final.state not in (trainer_pb2.JOB_STATE_QUEUED, trainer_pb2.JOB_STATE_RUNNING):
                    break
    finally:
        second.kill()
    assert final is not None and final.state == trainer_pb2.JOB_STATE_SUCCEEDED, final
    rewards = list(final.identity_reward.mean_rewards)
    assert len(rewards) == 2 and rewards[:1] == done_before_kill  # not redone
    report = json.loads((tmp_path / "users" / "rex" / "v1" / "report.json").read_text())
    assert [r["iteration"] for r in report["identity_reward"]["iterations"]] == [1, 2]
