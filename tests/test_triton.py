"""The triton backend against a real tritonserver (CPU, python backend + onnxruntime) started here on
the exported tiny family: every role equals the torch backend, a whole Generate equals the torch
Generate, and Triton's health and metrics answer. Skipped, saying why, only when the server is not
installed (``make triton-setup``; ``make test`` runs it)."""

from __future__ import annotations

import logging
import re
import shutil
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from recording_engines import random_user_lora
from test_deploy import plotted_series
from triton_fixtures import (
    adapter_dir_beside,
    executions,
    fused_stages,
    inferences,
    publish_trained_user,
    repository_of,
)

from easyphoto.diffusion.passes import FIRST_PASS, SECOND_PASS, reference_stages
from easyphoto.engines.backends.torch_backend import TorchBackend
from easyphoto.engines.backends.triton_backend import TritonBackend
from easyphoto.engines.faces.detect import FaceAnalyzer
from easyphoto.engines.faces.models import FaceModels
from easyphoto.engines.interface import Engines
from easyphoto.engines.lora import LoraWeights, lora_targets
from easyphoto.engines.models.family import ModelFamily
from easyphoto.engines.roles.diffusion import describe_roles, describe_stage
from easyphoto.export.onnx_export import tolerance_for
from easyphoto.export.triton_repository import write_repository
from easyphoto.export.triton_server import (
    TritonInstall,
    TritonServer,
    find_install,
    free_ports,
    start_server,
    statistics_since,
)
from easyphoto.fixtures.photos import sample_photo
from easyphoto.imaging.codec import encode_png
from easyphoto.rpc.deadline import request_deadline
from easyphoto.rpc.errors import DeadlineExceeded, EngineUnavailable
from easyphoto.server.options import GenerateOptions
from easyphoto.server.pipeline import Orchestrator, planned_rows
from easyphoto.users.store import UserStore


@pytest.fixture(scope="module")
def server(install: TritonInstall, export_dir: Path) -> Iterator[TritonServer]:
    server = start_server(repository_of(export_dir), install, free_ports())
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def triton_backend(
    server: TritonServer, export_dir: Path, tiny: ModelFamily, face_models: FaceModels
) -> TritonBackend:
    served = {**describe_roles(tiny), **face_models.roles, **fused_stages(tiny)}
    fallback = TorchBackend(None, "cpu", faces=face_models)
    targets = lora_targets({"unet": tiny.unet, "text_encoder": tiny.text_encoder})
    return TritonBackend(
        server.grpc_url,
        served,
        fallback=fallback,
        lora_targets=targets,
        adapter_dir=adapter_dir_beside(export_dir),
    )


def test_every_role_through_triton_equals_the_torch_backend(
    triton_backend: TritonBackend, tiny: ModelFamily, face_models: FaceModels
) -> None:
    local = TorchBackend(tiny, "cpu", faces=face_models)
    for stage in fused_stages(tiny).values():
        local.add_role(stage)
    assert triton_backend.ready()
    for name, description in triton_backend.roles.items():
        for point in ("min", "opt"):
            sample = description.sample_inputs(point, seed=2)
            theirs = triton_backend.infer(name, sample)
            ours = local.infer(name, sample)
            tolerance = tolerance_for(description, point)  # the export's, per role and point
            for output, value in ours.items():
                scale = max(1.0, float(value.abs().max()))
                diff = float((theirs[output] - value.float()).abs().max())
                assert diff <= tolerance * scale, (name, point, output, diff, scale)


def _random_lora(tiny: ModelFamily, seed: int) -> LoraWeights:
    """A rank-4 LoRA on every targeted layer, its updates about a tenth of the weights."""
    return random_user_lora(lora_targets(tiny.lora_roots()), f"random-{seed}", seed)


def test_a_whole_generate_through_triton_equals_torch(
    server: TritonServer,
    triton_backend: TritonBackend,
    tiny: ModelFamily,
    face_models: FaceModels,
    faces: FaceAnalyzer,
    tmp_path: Path,
) -> None:
    publish_trained_user(tmp_path, faces, tiny)
    options = GenerateOptions()
    options = replace(
        options,
        first_pass=replace(options.first_pass, steps=6),
        second_pass=replace(options.second_pass, steps=6),
    )
    images, scores = [], []
    fused = describe_stage(tiny, reference_stages()[0]).name
    # The second pass's stage is not in the repository: its steps call the tile ControlNet there.
    before = {model: inferences(server, model) for model in (fused, "controlnet_tile", "face_embedder")}
    for backend in (triton_backend, TorchBackend(tiny, "cpu", faces=face_models)):
        engines = Engines(backend, tiny.tokenizer, float(tiny.vae.config.scaling_factor))
        analyzer = face_models.analyzer(backend)
        orchestrator = Orchestrator(
            engines, tiny.scheduler_config, face_models, analyzer, UserStore(tmp_path)
        )
        generation = orchestrator.generate(sample_photo("astronaut"), ["amy"], options, seed=11)
        images.append(generation.image)
        scores.append(generation.faces[0].identity_score)
    # Triton ran the first pass as one fused call per step, the second's nets, and dlib's embedder.
    assert all(inferences(server, model) > count for model, count in before.items())
    # The images differ by rounding (below); the score moves with them through MTCNN's landmarks and
    # dlib's chip: measured 0.006 alone and 0.034 once within the whole suite (same code).
    assert scores[0] == pytest.approx(scores[1], abs=0.05)
    # The fused stage graphs in onnxruntime against the separate nets in PyTorch, over every step:
    # measured at most 3 of 255 in a few pixels (mean 0.007) on an AVX-512 Xeon, 2 on another CPU.
    difference = np.abs(images[0].astype(int) - images[1].astype(int))
    assert difference.max() <= 4 and difference.mean() < 0.05, (difference.max(), difference.mean())


def test_triton_health_and_metrics_answer(server: TritonServer, triton_backend: TritonBackend) -> None:
    with urllib.request.urlopen(f"{server.http_url}/v2/health/ready", timeout=5) as reply:
        assert reply.status == 200
    triton_backend.infer("text_encoder", triton_backend.roles["text_encoder"].sample_inputs("min"))
    metrics = f"http://127.0.0.1:{server.ports['metrics']}/metrics"
    with urllib.request.urlopen(metrics, timeout=5) as reply:
        text = reply.read().decode()
    assert 'nv_inference_count{model="text_encoder",version="1"}' in text
    # Every Triton series the Grafana dashboard plots is one this tritonserver exports.
    exported = set(re.findall(r"^(nv_[a-z0-9_]+)\{", text, re.MULTILINE))
    plotted = plotted_series(("nv",))
    assert len(plotted) >= 4 and plotted <= exported, plotted - exported


def test_triton_statistics_count_what_a_call_ran(server: TritonServer, triton_backend: TritonBackend) -> None:
    before = server.settled_statistics()
    inputs = triton_backend.roles["text_encoder"].sample_inputs("opt")
    rows = len(next(iter(inputs.values())))
    triton_backend.infer("text_encoder", inputs)
    # Settled: Triton may answer a call before counting it (a full run here read no execution).
    ran = statistics_since(server.settled_statistics(), before)
    assert list(ran) == ["text_encoder"], ran  # nothing else ran, the rest left out
    counts = ran["text_encoder"]
    assert (counts.executions, counts.inferences) == (1, rows)
    assert 0 < counts.compute_infer_s < 60 and counts.compute_input_s >= 0


def test_an_optional_role_is_served_only_by_a_model_with_its_signature(
    triton_backend: TritonBackend, face_models: FaceModels, tiny: ModelFamily
) -> None:
    embedder = face_models.roles["face_embedder"]
    (stage,) = fused_stages(tiny).values()
    assert triton_backend.serves(embedder) and triton_backend.serves(stage)
    second = describe_stage(tiny, reference_stages()[1])  # not in this repository
    assert not triton_backend.serves(second)
    # Another embedder under the same role name (an insightface pack's ArcFace takes "input.1").
    arcface = replace(embedder, inputs=(replace(embedder.inputs[0], name="input.1"),))
    assert not triton_backend.serves(arcface)
    assert not triton_backend.serves(replace(embedder, name="face_detector"))  # not in the repository


def test_a_call_ends_with_the_request_deadline(server: TritonServer, triton_backend: TritonBackend) -> None:
    # A call of a role whose counts no test asserts: Triton may still run it after the cut (when it
    # had the whole request), seconds later, into the next test's counts (measured 0.3-0.5 s here).
    controlnet = triton_backend.roles["controlnet_canny"]
    large = controlnet.sample_inputs("max", seed=3)
    # Sent, then cut by the client's timeout, which was the request's 100 ms left, not the 60 s
    # default (the call takes 0.3-0.5 s; 20 ms left was sometimes spent before the send, in a
    # full suite run, and the call was then rightly never sent).
    with request_deadline(0.1), pytest.raises(DeadlineExceeded, match="triton controlnet_canny"):
        triton_backend.infer("controlnet_canny", large)
    text = triton_backend.roles["text_encoder"].sample_inputs("min")
    before = inferences(server, "text_encoder")
    with request_deadline(0.0), pytest.raises(DeadlineExceeded, match="before an engine call"):
        triton_backend.infer("text_encoder", text)  # not sent at all
    with request_deadline(60.0):
        triton_backend.infer("text_encoder", text)
    assert inferences(server, "text_encoder") == before + 1


def test_users_adapters_reach_triton_by_name_and_one_model_run_computes_both(
    server: TritonServer, triton_backend: TritonBackend, tiny: ModelFamily
) -> None:
    from easyphoto.engines.adapters import SampleAdapter
    from easyphoto.rpc.errors import EngineInputError

    loras = {"ann@v1": _random_lora(tiny, 1), "bob@v3": _random_lora(tiny, 2)}
    ann, bob = (triton_backend.adapter(name, partial(loras.__getitem__, name)) for name in loras)
    written = {p.name for p in _adapter_dir_of(triton_backend).iterdir()}  # each once, by name and target
    assert written >= {
        "ann@v1.text_encoder.npz",
        "ann@v1.unet.npz",
        "bob@v3.text_encoder.npz",
        "bob@v3.unet.npz",
    }
    rows = [SampleAdapter(ann, 0.9), SampleAdapter(bob, 0.6), None, SampleAdapter(ann, 0.3)]
    one = triton_backend.roles["unet"].sample_inputs("opt", seed=6)
    sample = {name: torch.cat([value[:1]] * len(rows)) for name, value in one.items()}
    local = TorchBackend(tiny, "cpu")
    local_rows = [
        SampleAdapter(
            local.adapter(row.adapter.name, partial(loras.__getitem__, row.adapter.name)), row.weight
        )
        if row
        else None
        for row in rows
    ]
    ours = local.infer("unet", sample, local_rows)["noise_pred"]
    rows_before = inferences(server, "unet")
    runs_before = executions(server, "unet")
    theirs = triton_backend.infer("unet", sample, rows)["noise_pred"]
    assert float((theirs - ours).abs().max()) <= 1e-4 * float(ours.abs().max())
    assert inferences(server, "unet") == rows_before + len(rows)  # four rows of two users...
    assert executions(server, "unet") == runs_before + 1  # ...one run
    base = triton_backend.infer("unet", sample)["noise_pred"]
    assert not torch.allclose(base[0], theirs[0], atol=1e-3) and torch.allclose(base[2], theirs[2], atol=1e-5)
    canny = triton_backend.roles["controlnet_canny"].sample_inputs("min")
    with pytest.raises(EngineInputError, match="takes no LoRA"):
        triton_backend.infer("controlnet_canny", canny, [SampleAdapter(ann, 0.9)])


def test_a_warmed_adapter_is_in_tritons_models_before_any_request(
    triton_backend: TritonBackend, tiny: ModelFamily
) -> None:
    """RefreshUser's warm-up: every model taking the user's adapter loads its factors then, so the
    first request needs no file; a user never warmed still reads its file on first use."""
    from easyphoto.engines.adapters import SampleAdapter

    cal = triton_backend.adapter("cal@v1", lambda: _random_lora(tiny, 5))
    dan = triton_backend.adapter("dan@v1", lambda: _random_lora(tiny, 6))
    triton_backend.warm_adapter(cal)
    for name in ("cal@v1", "dan@v1"):
        for path in _adapter_dir_of(triton_backend).glob(f"{name}.*.npz"):
            path.unlink()  # only what the models already hold can serve them now
    for role in ("unet", "text_encoder"):
        sample = triton_backend.roles[role].sample_inputs("opt", seed=3)
        rows = len(next(iter(sample.values())))
        triton_backend.infer(role, sample, [SampleAdapter(cal, 0.8)] * rows)
        with pytest.raises(Exception, match="dan@v1"):
            triton_backend.infer(role, sample, [SampleAdapter(dan, 0.8)] * rows)


def _adapter_dir_of(backend: TritonBackend) -> Path:
    assert backend.adapter_dir is not None
    return backend.adapter_dir


def test_the_server_serves_generate_through_triton_without_model_weights(
    server: TritonServer,
    export_dir: Path,
    tiny: ModelFamily,
    faces: FaceAnalyzer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import grpc as grpclib
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextModel

    from easyphoto.server.app import EngineHolder, ServerConfig, build_app
    from easyphoto.v1 import generator_pb2, generator_pb2_grpc

    def built(*args: object, **kwargs: object) -> None:
        raise AssertionError("serve --backend triton built a model of the family")

    for model in (UNet2DConditionModel, ControlNetModel, AutoencoderKL, CLIPTextModel):
        monkeypatch.setattr(model, "__init__", built)
    caplog.set_level(logging.INFO, logger="easyphoto.server.app")
    config = ServerConfig(
        port=0,
        data=tmp_path,
        backend="triton",
        triton_url=server.grpc_url,
        export_dir=export_dir,
        adapter_dir=adapter_dir_beside(export_dir),
    )
    app, holder = build_app(config)
    app.start()
    try:
        holder.load()
        app.set_serving(True)
        publish_trained_user(tmp_path, faces, tiny)
        request = generator_pb2.GenerateRequest(
            templates=[encode_png(sample_photo("astronaut"))], user_ids=["amy"], seed=1
        )
        for name in ("first_pass", "second_pass"):
            getattr(request, name).steps = 4
        with grpclib.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            response = generator_pb2_grpc.GeneratorStub(channel).Generate(request, timeout=120)
        face = response.images[0].faces[0]
        assert face.user_id == "amy" and face.HasField("identity_score")
        assert response.model_family.startswith("tiny (random weights)")  # named by the manifest
    finally:
        app.stop(0)
    assert "no model weights are loaded here" in caplog.text
    with pytest.raises(EngineUnavailable, match="not ready"):  # nothing listens there
        EngineHolder(replace(config, triton_url="127.0.0.1:1", triton_wait_seconds=0)).load()
    with pytest.raises(EngineUnavailable, match="no engine manifest"):
        EngineHolder(replace(config, export_dir=tmp_path / "nothing")).load()


def test_shared_memory_inputs_match_and_constant_inputs_are_written_once(
    server: TritonServer, tiny: ModelFamily, triton_backend: TritonBackend
) -> None:
    unet = describe_roles(tiny)["unet"]
    shared = TritonBackend(server.grpc_url, {"unet": unet}, shared_memory="system", shared_memory_min_bytes=1)
    try:
        sample = unet.sample_inputs("opt", seed=4)
        inline = triton_backend.infer("unet", sample)["noise_pred"]
        assert torch.equal(shared.infer("unet", sample)["noise_pred"], inline)
        assert shared.shared is not None
        first = shared.shared.writes
        assert first == len(unet.inputs)  # every input went through shared memory
        registered = shared._client.get_system_shared_memory_status(as_json=True)
        assert len(registered.get("regions", {})) == first
        moved = {**sample, "sample": sample["sample"] + 1.0}  # only the latents change between steps
        shared.infer("unet", moved)
        assert shared.shared.writes == first + 1
        sample["encoder_hidden_states"].mul_(2.0)  # changed in place: detected by its version counter
        doubled = shared.infer("unet", sample)["noise_pred"]
        assert torch.equal(doubled, triton_backend.infer("unet", sample)["noise_pred"])
        shared._client.unregister_system_shared_memory()  # every region, as a restarted server
        assert torch.equal(shared.infer("unet", sample)["noise_pred"], doubled)
        again = shared._client.get_system_shared_memory_status(as_json=True)
        assert len(again.get("regions", {})) == first
    finally:
        shared.close()
    assert not triton_backend._client.get_system_shared_memory_status(as_json=True).get("regions")


def test_a_step_without_a_fused_stage_sends_its_controlnets_together(
    server: TritonServer, tiny: ModelFamily
) -> None:
    from easyphoto.engines.interface import ControlInput

    roles = describe_roles(tiny)  # no stages: the ControlNets go out as concurrent calls
    remote = Engines(TritonBackend(server.grpc_url, roles), tiny.tokenizer, 1.0)
    local = Engines(TorchBackend(tiny, "cpu"), tiny.tokenizer, 1.0)
    sample = roles["unet"].sample_inputs("opt", seed=8)
    height, width = (8 * side for side in sample["sample"].shape[2:])
    generator = torch.Generator().manual_seed(9)
    controls = [
        ControlInput(k, torch.rand(2, 3, height, width, generator=generator), 0.7) for k in ("canny", "tile")
    ]
    args = (sample["sample"], sample["timestep"], sample["encoder_hidden_states"], controls)
    assert torch.allclose(remote.predict_noise(*args), local.predict_noise(*args), atol=1e-3)
    backend = remote.backend
    assert isinstance(backend, TritonBackend)
    calls = [(f"controlnet_{c.kind}", {"sample": sample["sample"], "timestep": sample["timestep"],
              "encoder_hidden_states": sample["encoder_hidden_states"], "controlnet_cond": c.image,
              "conditioning_scale": torch.full((2,), c.scale)}) for c in controls]  # fmt: skip
    together = backend.infer_many(calls)
    for (role, inputs), result in zip(calls, together, strict=True):
        alone = backend.infer(role, inputs)
        assert all(torch.equal(result[name], alone[name]) for name in alone)
    backend.close()


def _cuda_shared_memory_usable() -> bool:
    try:
        import tritonclient.utils.cuda_shared_memory  # noqa: F401
    except (ImportError, RuntimeError):
        return False
    return torch.cuda.is_available()


def test_an_unreachable_server_is_unavailable_not_an_internal_error(tiny: ModelFamily) -> None:

    text_encoder = describe_roles(tiny)["text_encoder"]
    backend = TritonBackend("127.0.0.1:1", {"text_encoder": text_encoder})  # nothing listens there
    try:
        assert not backend.ready()
        with pytest.raises(EngineUnavailable, match="triton text_encoder"):
            backend.infer("text_encoder", text_encoder.sample_inputs("min"))
    finally:
        backend.close()


def test_shared_memory_that_this_host_cannot_give_is_refused_at_start() -> None:

    if _cuda_shared_memory_usable():
        pytest.skip("this host has CUDA and cuda-python: the refusal is for hosts without them")
    # No server is needed: the regions are checked before anything is sent.
    with pytest.raises(EngineUnavailable, match="CUDA shared memory"):
        TritonBackend("127.0.0.1:1", {}, shared_memory="cuda")
    with pytest.raises(ValueError, match="'posix' is unknown"):
        TritonBackend("127.0.0.1:1", {}, shared_memory="posix")


class _RecordingClient:
    """Stands in for Triton's control plane (the GPU machines here run no Triton): records what
    would be registered."""

    def __init__(self) -> None:
        self.registered: dict[str, tuple[int, int]] = {}

    def register_cuda_shared_memory(self, name: str, raw: bytes, device_id: int, size: int) -> None:
        assert raw, "an empty CUDA IPC handle"
        self.registered[name] = (device_id, size)

    def unregister_cuda_shared_memory(self, name: str) -> None:
        del self.registered[name]


@pytest.mark.skipif(not _cuda_shared_memory_usable(), reason="needs a GPU and cuda-python (the gpu extra)")
def test_cuda_regions_hold_the_inputs_on_the_gpu() -> None:
    import tritonclient.utils.cuda_shared_memory as cudashm

    from easyphoto.engines.backends.shared_memory import CudaRegions, SharedInputs

    client = _RecordingClient()
    shared = SharedInputs(CudaRegions(client, device_id=0), "easyphoto-test")
    source = torch.randn(2, 4, 8, 8)
    name, size = shared.place("unet-sample", source, source.numpy())
    assert client.registered == {name: (0, size)} and size == source.numel() * 4
    handle = shared._held["unet-sample"][0]
    back = cudashm.get_contents_as_numpy(handle, "FP32", list(source.shape))
    assert np.array_equal(back, source.numpy())
    shared.place("unet-sample", source, source.numpy())
    assert shared.writes == 1  # unchanged: not copied again
    shared.close()
    assert client.registered == {}


def test_an_interrupted_server_install_is_replaced_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    packaged = tmp_path / "venv" / "lib" / "python3.11" / "site-packages" / "pytriton" / "tritonserver"
    for name in ("bin/tritonserver", "backends/python/libtriton_python.so", "caches/local/libtritoncache.so"):
        (packaged / name).parent.mkdir(parents=True, exist_ok=True)
        (packaged / name).write_text(name)
    stub = packaged / "python_backend_stubs" / "3.11" / "triton_python_backend_stub"
    stub.parent.mkdir(parents=True)
    stub.write_text("stub")
    server = tmp_path / "server"

    def cut_short(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copy2", cut_short)  # the copy's last file fails
    with pytest.raises(OSError):
        find_install(tmp_path / "venv", server)
    monkeypatch.undo()
    assert not (server / "bin" / "tritonserver").exists()  # else the next start would take it as installed
    install = find_install(tmp_path / "venv", server)
    assert (install.server / "bin" / "tritonserver").read_text() == "bin/tritonserver"
    assert (install.server / "backends" / "python" / "triton_python_backend_stub").read_text() == "stub"
    assert (install.server / "caches" / "local" / "libtritoncache.so").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server", "venv"]  # no partial copy left


def test_a_region_triton_still_holds_is_let_go_once_it_lets_go(monkeypatch: pytest.MonkeyPatch) -> None:
    """Closing right after the last call: Triton refuses to unregister for a moment ("in use")."""
    from easyphoto.engines.backends import shared_memory
    from easyphoto.engines.backends.shared_memory import SharedInputs

    class BusyRegions:
        kind = "system"

        def __init__(
            self, busy: int, error: str = "Cannot unregister region: it is currently in use"
        ) -> None:
            self.busy, self.error, self.destroyed = busy, error, 0

        def create(self, name: str, size: int) -> object:
            return name

        def register(self, name: str, handle: object, size: int) -> None:
            """Nothing to register here."""

        def unregister(self, name: str) -> None:
            if self.busy:
                self.busy -= 1
                raise RuntimeError(self.error)

        def write(self, handle: object, array: np.ndarray) -> None:
            """Nothing to write here."""

        def destroy(self, handle: object) -> None:
            self.destroyed += 1

    monkeypatch.setattr(shared_memory, "UNREGISTER_WAIT_SECONDS", 0.001)
    source = torch.zeros(4)
    regions = BusyRegions(busy=3)
    shared = SharedInputs(regions, "test")  # type: ignore[arg-type]
    shared.place("unet-sample", source, source.numpy())
    shared.close()
    assert regions.busy == 0 and regions.destroyed == 1
    broken = BusyRegions(busy=1, error="no such region")
    shared = SharedInputs(broken, "test")  # type: ignore[arg-type]
    shared.place("unet-sample", source, source.numpy())
    with pytest.raises(RuntimeError, match="no such region"):  # any other error is not waited out
        shared.close()


def test_two_users_requests_arriving_together_are_one_model_run(
    install: TritonInstall, export_dir: Path, tiny: ModelFamily, tmp_path: Path
) -> None:
    """Triton's dynamic batcher merges two orchestrators' calls and a call of base rows (here with a
    generous queue delay, so that they surely meet); the served model runs them, both users' rows
    and the base rows, as one session run of its one graph."""
    import threading

    from easyphoto.engines.adapters import SampleAdapter
    from easyphoto.export.triton_repository import ServingSettings
    from easyphoto.export.triton_server import RATE_LIMIT_FLAG

    unet = describe_roles(tiny)["unet"]
    repository = tmp_path / "repository"
    # Rate limited too (every model, as a small CPU host runs the big ones): batching still merges.
    settings = ServingSettings(max_queue_delay_microseconds=300_000, rate_limit_mb=0)
    adapters = adapter_dir_beside(export_dir)
    write_repository(
        export_dir, {"unet": unet}, repository, settings=settings, adapter_dir=adapters, only={"unet"}
    )
    # The graph with LoRA inputs serves base rows too, in place of the base graph: weights once.
    served = {p.name for p in (repository / "unet" / "1").iterdir()}
    assert "model.lora.onnx" in served and not any(name.startswith("model.onnx") for name in served)
    assert (
        'rate_limiter { resources [ { name: "memory" count: 1 } ] }'
        in (repository / "unet" / "config.pbtxt").read_text()
    )
    server = start_server(repository, install, free_ports())
    assert RATE_LIMIT_FLAG in server.process.args  # the repository asks for it
    targets = lora_targets({"unet": tiny.unet, "text_encoder": tiny.text_encoder})
    try:
        server.wait_ready()
        clients = [
            TritonBackend(server.grpc_url, {"unet": unet}, lora_targets=targets, adapter_dir=adapters)
            for _ in range(2)
        ]
        sample = unet.sample_inputs("opt", seed=9)
        rows = [
            [SampleAdapter(client.adapter(name, partial(_random_lora, tiny, seed)), 0.8)] * 2
            for client, name, seed in zip(clients, ("cy@v1", "dee@v1"), (5, 6), strict=True)
        ]
        calls = [(clients[0], rows[0]), (clients[1], rows[1]), (clients[0], None)]
        alone = [client.infer("unet", sample, row)["noise_pred"] for client, row in calls]
        runs = executions(server, "unet")
        results: list[torch.Tensor] = [torch.empty(0)] * len(calls)
        start = threading.Barrier(len(calls))

        def call(index: int) -> None:
            start.wait()
            client, row = calls[index]
            results[index] = client.infer("unet", sample, row)["noise_pred"]

        threads = [threading.Thread(target=call, args=(index,)) for index in range(len(calls))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert executions(server, "unet") == runs + 1  # three requests, one run
        for together, by_itself in zip(results, alone, strict=True):
            assert torch.allclose(together, by_itself, atol=1e-5)
        assert not torch.allclose(results[0], results[1], atol=1e-3)  # each kept its own user's rows
        assert not torch.allclose(results[0], results[2], atol=1e-3)  # and the base rows none
        for client in clients:
            client.close()
    finally:
        server.stop()


def test_the_bench_harness_sweeps_triton_and_writes_its_account(export_dir: Path, tmp_path: Path) -> None:
    """The harness's Triton half end to end at a miniature size, on this suite's export (copied in as
    the harness's export cache, so no role is exported again): its level, perf_analyzer's rows on
    the repository's UNet and Triton's account of the sweep by model, in the CSV and the doc."""
    import csv

    from easyphoto.cli.load_bench import HarnessConfig, run_harness

    cache = tmp_path / "export-cache"
    shutil.copytree(export_dir, cache / "tiny")
    doc = tmp_path / "docs" / "benchmarks.md"
    doc.parent.mkdir()
    config = HarnessConfig(
        concurrency=(1,), users=2, first_steps=4, second_steps=4, requests_per_level=2, baseline_repeats=1,
        triton_concurrency=(1,), fused=False, perf_window_ms=500, out=tmp_path / "bench-out", doc=doc,
        export_cache=cache, perf_stability_percent=100,  # a loaded test runner is never stable to 10 %
    )  # fmt: skip
    results = run_harness(config)
    level = results.level("triton", "N users", 1)
    assert level is not None and [r.faces for r in level.requests] == [1, 1]
    assert results.perf_analyzer_error == "" and results.perf_analyzer[0]["throughput"] > 0
    models = results.triton_models
    for counts in models.values():
        assert counts.inferences >= counts.executions > 0 and counts.compute_infer_s > 0
    # Triton counted the rows the capacity arithmetic plans for the sweep's two requests, and no
    # text encoder: the warm-ups cached each user's prompts.
    first, second = (replace(settings, steps=4) for settings in (FIRST_PASS, SECOND_PASS))
    planned = planned_rows(GenerateOptions(first_pass=first, second_pass=second), 1)
    controlnets = sum(
        counts.inferences for model, counts in models.items() if model.startswith("controlnet_")
    )
    assert (models["unet"].inferences, controlnets) == (2 * planned.unet, 2 * planned.controlnet)
    assert models["vae_encoder"].inferences == models["vae_decoder"].inferences == 2 * planned.vae_encode
    assert "text_encoder" not in models
    with (config.out / "triton_models.csv").open() as handle:
        written = {row["model"]: int(row["executions"]) for row in csv.DictReader(handle)}
    assert written == {model: counts.executions for model, counts in models.items()}
    text = doc.read_text()
    assert f"| unet | {models['unet'].executions} | {models['unet'].inferences} |" in text
