"""The hostile corpus (tests/hostile.py) against live servers on loopback: every upload, option and
id is answered OK (unusual but valid images converted and served) or with a typed status whose
message is under 1 kB and names the field, and the server answers the next request."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hostile import (
    IMAGE_REASONS,
    MALFORMED_IDS,
    NUMBER_VALUES,
    face_grid,
    image_uploads,
    numeric_fields,
    set_path,
    tiny_face,
)
from PIL import Image

from easyphoto.engines.faces.detect import FaceAnalyzer
from easyphoto.engines.faces.models import default_face_models
from easyphoto.fixtures.photos import sample_photo
from easyphoto.imaging.codec import decode_image, encode_png
from easyphoto.imaging.geometry import grow_box, int_box
from easyphoto.rpc.wire import error_details
from easyphoto.trainer.app import TrainerApp
from easyphoto.v1 import generator_pb2, generator_pb2_grpc, trainer_pb2, trainer_pb2_grpc, users_pb2_grpc

Reply = TypeVar("Reply")
MAX_MESSAGE_BYTES = 1024
# A portrait (taller than wide), so that an EXIF rotation left undone shows in the output's shape.
PORTRAIT = (slice(0, 512), slice(48, 432))


def answer(
    method: Callable[..., Reply], request: object, field: str | None = None, timeout: float = 120
) -> Reply | dict[str, Any]:
    """The call's reply, or its error's details once they are checked to be a typed status: not
    UNKNOWN or INTERNAL, a reason, a message under 1 kB, and ``field`` named where given."""
    try:
        return method(request, timeout=timeout)
    except grpc.RpcError as error:
        details = error_details(error)
    assert details["code"] not in ("UNKNOWN", "INTERNAL"), details
    assert details["reason"], details
    assert len(details["message"].encode()) < MAX_MESSAGE_BYTES, details["message"][:2000]
    if field is not None:
        named = field in details["fields"] or field.rsplit(".", 1)[-1] in details["message"]
        assert named, (field, details)
    return details


def refused(outcome: object, code: str, reasons: set[str] | None = None) -> dict[str, Any]:
    assert isinstance(outcome, dict), f"expected {code}, got a reply"
    assert outcome["code"] == code, outcome
    assert reasons is None or outcome["reason"] in reasons, outcome
    return outcome


def assert_serving(channel: grpc.Channel) -> None:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# ---- the orchestrator ----


@pytest.fixture(scope="module")
def channel(generator_address: str) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(generator_address, options=options) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> generator_pb2_grpc.GeneratorStub:
    return generator_pb2_grpc.GeneratorStub(channel)


def _request(template: bytes | np.ndarray, users: list[str] | None = None) -> generator_pb2.GenerateRequest:
    data = template if isinstance(template, bytes) else encode_png(template)
    request = generator_pb2.GenerateRequest(templates=[data], user_ids=users or ["alice"], seed=3)
    for name in ("first_pass", "second_pass"):
        getattr(request, name).steps = 6  # 2 steps at the default strengths
    return request


def _portrait() -> np.ndarray:
    return np.ascontiguousarray(sample_photo("astronaut")[PORTRAIT])


@pytest.mark.parametrize("upload", image_uploads(_portrait()), ids=lambda u: u.name)
def test_every_upload_is_served_or_refused_naming_the_template(
    upload: Any, stub: generator_pb2_grpc.GeneratorStub, channel: grpc.Channel
) -> None:
    outcome = answer(stub.Generate, _request(upload.data), "templates[0]")
    if upload.readable:
        assert isinstance(outcome, generator_pb2.GenerateResponse), outcome
        image = outcome.images[0]
        assert [f.user_id for f in image.faces] == ["alice"]
        height, width = np.asarray(Image.open(io.BytesIO(image.png))).shape[:2]
        assert (height, width) == (512, 384)  # upright, whatever the file's form
    else:
        refused(outcome, "INVALID_ARGUMENT", IMAGE_REASONS)
    assert_serving(channel)


def test_readable_forms_decode_to_the_photo_they_show() -> None:
    photo = _portrait()
    uploads = {u.name: u for u in image_uploads(photo)}
    gray = photo.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    sixteen = decode_image(uploads["sixteen_bit_png"].data)
    assert np.abs(sixteen[..., 0].astype(np.float32) - gray).mean() < 2  # scaled, not clipped to white
    rotated = decode_image(uploads["exif_rotated_jpeg"].data)
    assert np.abs(rotated.astype(np.float32) - photo).mean() < 6
    alpha = decode_image(uploads["alpha_png"].data)
    assert (alpha[:, : photo.shape[1] // 8] == 255).all()  # transparent: on white, not black
    for name in ("cmyk_jpeg", "palette_png", "animated_gif", "animated_webp", "webp"):
        assert np.abs(decode_image(uploads[name].data).astype(np.float32) - photo).mean() < 12, name


@pytest.fixture(scope="module")
def astronaut_face() -> np.ndarray:
    photo = sample_photo("astronaut")
    faces = default_face_models()
    from easyphoto.engines.backends.torch_backend import TorchBackend

    analyzer: FaceAnalyzer = faces.analyzer(TorchBackend(faces=faces, device="cpu"))
    x0, y0, x1, y1 = int_box(grow_box(analyzer.detect(photo)[0].box, 1.6, photo.shape[1], photo.shape[0]))
    return np.asarray(Image.fromarray(photo[y0:y1, x0:x1]).resize((160, 160)))


def test_crowds_tiny_faces_and_missing_faces(
    stub: generator_pb2_grpc.GeneratorStub, channel: grpc.Channel, astronaut_face: np.ndarray
) -> None:
    crowd = face_grid(astronaut_face, 50)
    response = answer(stub.Generate, _request(crowd, ["alice"]))
    assert isinstance(response, generator_pb2.GenerateResponse), response
    faces = response.images[0].faces
    assert len(faces) >= 40 and [f.user_id for f in faces if f.user_id] == ["alice"]
    beyond = ["" for _ in range(16)] + ["alice"]
    outcome = answer(stub.Generate, _request(crowd, beyond), "templates[0]")
    refused(outcome, "INVALID_ARGUMENT", {"TOO_MANY_FACES"})
    small = tiny_face(sample_photo("astronaut"), 0.04)
    outcome = answer(stub.Generate, _request(small), "templates[0]")
    refused(outcome, "FAILED_PRECONDITION", {"NO_FACE", "FACE_TOO_SMALL"})
    coffee = sample_photo("coffee")
    refused(answer(stub.Generate, _request(coffee)), "FAILED_PRECONDITION", {"NO_FACE"})
    outcome = answer(stub.Generate, _request(_portrait(), ["alice", "alice"]), "user_ids")
    refused(outcome, "INVALID_ARGUMENT")
    assert_serving(channel)


GENERATE_NUMBERS = [
    (path, value)
    for path, field in numeric_fields(generator_pb2.GenerateRequest.DESCRIPTOR)
    for value in NUMBER_VALUES[field.type]
]


@pytest.mark.parametrize(("path", "value"), GENERATE_NUMBERS, ids=lambda v: str(v))
def test_every_numeric_option_is_served_or_refused_by_name(
    path: str, value: float, stub: generator_pb2_grpc.GeneratorStub
) -> None:
    request = _request(_portrait())
    set_path(request, path, value)
    outcome = answer(stub.Generate, request, path)
    if isinstance(outcome, dict):
        refused(outcome, "INVALID_ARGUMENT")
    else:
        assert len(outcome.images) >= 1


@pytest.mark.parametrize("name", MALFORMED_IDS)
def test_malformed_user_ids_are_refused_by_name(
    name: str, stub: generator_pb2_grpc.GeneratorStub, channel: grpc.Channel
) -> None:
    request = _request(_portrait(), [MALFORMED_IDS[name]])
    refused(answer(stub.Generate, request, "user_ids[0]"), "INVALID_ARGUMENT")
    assert_serving(channel)


def test_strings_enums_and_sizes_out_of_bounds(
    stub: generator_pb2_grpc.GeneratorStub, channel: grpc.Channel
) -> None:
    template = encode_png(_portrait())
    for path in ("first_pass.scheduler", "second_pass.scheduler", "seam_pass.scheduler"):
        request = _request(template)
        set_path(request, path, "warp_drive")
        refused(answer(stub.Generate, request, path), "INVALID_ARGUMENT")
    for path in ("positive_prompt", "negative_prompt", "extra_prompt", "extra_negative_prompt"):
        request = _request(template)
        set_path(request, path, "x" * 1_000_000)
        refused(answer(stub.Generate, request, path), "INVALID_ARGUMENT")
    odd = _request(template)
    odd.extra_prompt = "\u202e\u05e9\u05dc\u05d5\u05dd \x00 \U0001f600"  # RTL, Hebrew, NUL, emoji: just text
    assert isinstance(answer(stub.Generate, odd), generator_pb2.GenerateResponse)
    last_seed = _request(template)
    last_seed.seed, last_seed.images_per_template = 2**64 - 1, 2
    wrapped = answer(stub.Generate, last_seed)
    assert isinstance(wrapped, generator_pb2.GenerateResponse), wrapped
    assert [image.seed for image in wrapped.images] == [2**64 - 1, 0]
    unknown = answer(stub.Generate, _request(template, ["nobody"]), "user_ids[0]")
    refused(unknown, "NOT_FOUND", {"UNKNOWN_USER"})
    many = generator_pb2.GenerateRequest(templates=[template] * 9, user_ids=["alice"])
    refused(answer(stub.Generate, many, "templates"), "INVALID_ARGUMENT")
    fat = _request(template + b"\x00" * (21 * 1024 * 1024))
    refused(answer(stub.Generate, fat, "templates[0]"), "INVALID_ARGUMENT", {"IMAGE_TOO_LARGE"})
    assert_serving(channel)


def test_a_message_over_the_size_limit_is_refused_before_it_is_read(
    stub: generator_pb2_grpc.GeneratorStub, channel: grpc.Channel
) -> None:
    huge = generator_pb2.GenerateRequest(templates=[b"\x00" * (257 * 1024 * 1024)], user_ids=["alice"])
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(huge, timeout=60)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(caught.value.details().encode()) < MAX_MESSAGE_BYTES
    del huge
    assert_serving(channel)
    response = stub.Generate(_request(_portrait()), timeout=120)  # and it still paints
    assert [f.user_id for f in response.images[0].faces] == ["alice"]


# ---- the trainer ----


@pytest.fixture(scope="module")
def trainer_channel(trainer: TrainerApp) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{trainer.app.port}") as channel:
        yield channel


def _finished(stub: trainer_pb2_grpc.TrainerStub, job_id: str) -> trainer_pb2.Job:
    for job in stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job_id), timeout=120):
        if job.state not in (trainer_pb2.JOB_STATE_QUEUED, trainer_pb2.JOB_STATE_RUNNING):
            return job
    raise AssertionError("the watch ended before the job")


def test_every_training_photo_is_reported_by_reason(trainer_channel: grpc.Channel) -> None:
    """Each upload alone (around a photo with no face, so that a readable one is looked at and
    dropped as NO_FACE rather than trained on): the job ends FAILED naming each photo's reason."""
    stub = trainer_pb2_grpc.TrainerStub(trainer_channel)
    for index, upload in enumerate(image_uploads(sample_photo("coffee"))):
        request = trainer_pb2.CreateTrainingJobRequest(user_id=f"photo{index}", photos=[upload.data])
        job = answer(stub.CreateTrainingJob, request)
        assert isinstance(job, trainer_pb2.Job), (upload.name, job)
        final = _finished(stub, job.job_id)
        assert final.state == trainer_pb2.JOB_STATE_FAILED and final.error.reason == "NO_USABLE_PHOTOS", (
            upload.name
        )
        assert len(final.error.message.encode()) < MAX_MESSAGE_BYTES
        expected = {"NO_FACE"} if upload.readable else IMAGE_REASONS
        assert final.photos[0].reason in expected, (upload.name, final.photos[0])
    assert_serving(trainer_channel)


TRAINING_NUMBERS = [
    (path, value)
    for path, field in numeric_fields(trainer_pb2.TrainingOptions.DESCRIPTOR, "options.")
    for value in NUMBER_VALUES[field.type]
]


def test_every_numeric_training_option_is_accepted_or_refused_by_name(trainer_channel: grpc.Channel) -> None:
    stub = trainer_pb2_grpc.TrainerStub(trainer_channel)
    photo = encode_png(sample_photo("coffee"))
    for index, (path, value) in enumerate(TRAINING_NUMBERS):
        request = trainer_pb2.CreateTrainingJobRequest(user_id=f"opt{index}", photos=[photo])
        set_path(request, path, value)
        outcome = answer(stub.CreateTrainingJob, request, path)
        if isinstance(outcome, dict):
            refused(outcome, "INVALID_ARGUMENT")
        else:  # accepted: the job says what it was given, then it is cancelled
            name = path.rsplit(".", 1)[-1]
            assert np.float32(getattr(outcome.options, name)) == np.float32(value), (path, value)
            stub.CancelJob(trainer_pb2.CancelJobRequest(job_id=outcome.job_id), timeout=60)
    assert_serving(trainer_channel)


def test_trainer_ids_enums_pages_and_sizes(trainer_channel: grpc.Channel) -> None:
    stub = trainer_pb2_grpc.TrainerStub(trainer_channel)
    users = users_pb2_grpc.UsersStub(trainer_channel)
    from easyphoto.v1 import users_pb2

    photo = encode_png(sample_photo("coffee"))
    for user_id in MALFORMED_IDS.values():
        create = trainer_pb2.CreateTrainingJobRequest(user_id=user_id, photos=[photo])
        refused(answer(stub.CreateTrainingJob, create, "user_id"), "INVALID_ARGUMENT")
        get = users_pb2.GetUserRequest(user_id=user_id)
        refused(answer(users.GetUser, get, "user_id"), "INVALID_ARGUMENT")
        for job_id in (user_id, "0" * 100):
            outcome = answer(stub.GetJob, trainer_pb2.GetJobRequest(job_id=job_id))
            assert isinstance(outcome, dict) and outcome["code"] in ("NOT_FOUND", "INVALID_ARGUMENT"), outcome
            outcome = answer(stub.CancelJob, trainer_pb2.CancelJobRequest(job_id=job_id))
            assert isinstance(outcome, dict) and outcome["code"] in ("NOT_FOUND", "INVALID_ARGUMENT"), outcome
    listing = trainer_pb2.ListJobsRequest(state=99)  # type: ignore[arg-type]
    refused(answer(stub.ListJobs, listing, "state"), "INVALID_ARGUMENT")
    for page in (
        trainer_pb2.ListJobsRequest(page_size=2**32 - 1),
        trainer_pb2.ListJobsRequest(page_token="-5"),
    ):
        refused(answer(stub.ListJobs, page), "INVALID_ARGUMENT")
    refused(answer(users.ListUsers, users_pb2.ListUsersRequest(page_token="x" * 10_000)), "INVALID_ARGUMENT")
    for photos in ([], [photo] * 51):
        create = trainer_pb2.CreateTrainingJobRequest(user_id="many", photos=photos)
        refused(answer(stub.CreateTrainingJob, create, "photos"), "INVALID_ARGUMENT")
    caption = trainer_pb2.CreateTrainingJobRequest(user_id="caption", photos=[photo])
    caption.options.caption = "x" * 1_000_000
    refused(answer(stub.CreateTrainingJob, caption, "options.caption"), "INVALID_ARGUMENT")
    fat = trainer_pb2.CreateTrainingJobRequest(user_id="fat", photos=[photo + b"\x00" * (21 * 1024 * 1024)])
    refused(answer(stub.CreateTrainingJob, fat, "photos[0]"), "INVALID_ARGUMENT", {"IMAGE_TOO_LARGE"})
    assert_serving(trainer_channel)
