"""The Python client and `easyphoto generate` against a real orchestrator on loopback (tiny models)."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from easyphoto.cli.client import GeneratorClient, ServiceError, parse_option
from easyphoto.cli.main import main
from easyphoto.fixtures.photos import sample_photo
from easyphoto.imaging.codec import encode_png
from easyphoto.v1 import generator_pb2

# 4 steps at strength 0.5: 2 denoising steps per pass; both option forms (dotted, mapping).
QUICK = {"first_pass.steps": 4, "first_pass.strength": 0.5, "second_pass": {"steps": 4, "strength": 0.5}}
QUICK_FLAGS = ["--steps-first", "4", "--steps-second", "4"]
QUICK_FLAGS += ["--set", "first_pass.strength=0.5", "--set", "second_pass.strength=0.5"]


@pytest.fixture(scope="module")
def client(generator_address: str) -> Iterator[GeneratorClient]:
    with GeneratorClient(generator_address, timeout=120, metadata=[("x-request-id", "test")]) as client:
        yield client


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("templates") / "astronaut.png"
    path.write_bytes(encode_png(sample_photo("astronaut")))
    return path


def test_generate_returns_the_image(client: GeneratorClient) -> None:
    astronaut = sample_photo("astronaut")
    response = client.generate([encode_png(astronaut)], ["alice"], seed=7, **QUICK)
    [image] = response.images
    assert np.asarray(Image.open(io.BytesIO(image.png))).shape == astronaut.shape
    assert image.seed == 7 and [f.user_id for f in image.faces] == ["alice"]
    assert image.faces[0].HasField("identity_score")


def test_stream_yields_progress_over_the_request_then_the_response(
    client: GeneratorClient, template: Path
) -> None:
    events = list(client.generate_stream([template], ["alice"], seed=7, **QUICK))
    *progress, response = events
    assert all(isinstance(p, generator_pb2.Progress) for p in progress)
    assert [(p.stage, p.request_step, p.request_total_steps) for p in progress] == [
        ("first_diffusion", 1, 4),
        ("first_diffusion", 2, 4),
        ("second_diffusion", 3, 4),
        ("second_diffusion", 4, 4),
    ]
    assert isinstance(response, generator_pb2.GenerateResponse) and len(response.images) == 1


def test_a_bad_option_raises_with_code_and_field(client: GeneratorClient, template: Path) -> None:
    with pytest.raises(ServiceError) as info:
        client.generate([template], ["alice"], **{**QUICK, "first_pass.strength": 2.0})
    error = info.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "INVALID_ARGUMENT"
    assert list(error.fields) == ["first_pass.strength"] and "first_pass.strength" in str(error)
    with pytest.raises(ServiceError) as streamed:
        list(client.generate_stream([template], ["nobody"], **QUICK))
    assert (streamed.value.code, streamed.value.reason) == (grpc.StatusCode.NOT_FOUND, "UNKNOWN_USER")
    assert "user_ids[0]" in streamed.value.fields


def test_options_are_checked_and_typed_from_the_proto(client: GeneratorClient) -> None:
    request = generator_pb2.GenerateRequest
    assert parse_option(request, "first_pass.steps=30") == ("first_pass.steps", 30)
    assert parse_option(request, "color_shift=off") == ("color_shift", False)
    assert parse_option(request, "extra_prompt=a=b") == ("extra_prompt", "a=b")
    for bad in ("first_pass.nope=1", "seed=x", "color_shift=maybe", "first_pass=1", "user_ids=a", "seed"):
        with pytest.raises(ValueError):
            parse_option(request, bad)
    with pytest.raises(ValueError, match="lora_weight"):  # refused before any call
        client.generate([b""], ["alice"], lora_wieght=1.0)


def test_the_client_imports_no_torch_and_no_server_side() -> None:
    code = "import sys, easyphoto.cli.client; print(sorted(set(sys.modules) & {MODULES!r}))"
    modules = {"torch", "prometheus_client", "easyphoto.rpc.server", "grpc_health.v1.health"}
    out = subprocess.run(
        [sys.executable, "-c", code.replace("{MODULES!r}", repr(modules))],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]"


def test_cli_writes_the_png_scores_and_timings(
    generator_address: str, template: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["generate", "--server", generator_address, "--user", "alice", str(template), "--seed", "7"]
    assert main([*args, *QUICK_FLAGS, "--out", str(tmp_path), "--intermediates"]) == 0
    image = Image.open(tmp_path / "astronaut_seed7.png")
    assert image.size == (sample_photo("astronaut").shape[1], sample_photo("astronaut").shape[0])
    assert (tmp_path / "astronaut_seed7" / "face0_inpaint_mask.png").is_file()
    out = capsys.readouterr().out
    assert "identity scores [alice=" in out and "first_diffusion=" in out and "second_diffusion=" in out


def test_cli_reports_a_bad_request_on_stderr(
    generator_address: str, template: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "generate",
        "--server",
        generator_address,
        "--user",
        "alice",
        str(template),
        "--out",
        str(tmp_path),
    ]
    assert main([*args, *QUICK_FLAGS, "--set", "first_pass.strength=2"]) != 0
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "first_pass.strength" in err
    assert main([*args, "--set", "first_pass.stregth=0.5"]) != 0  # refused locally
    assert "unknown option 'first_pass.stregth'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
