"""The benchmark harness (``make bench``, ``make bench-quick``): our own gRPC clients against a
running orchestrator at a concurrency sweep, one user and many different users, beside the
baseline (diffusers' ControlNet inpaint pipeline doing both passes of a face on the same models)
and, where tritonserver is installed, the Triton backend and perf_analyzer.

The orchestrator runs as its own process (``easyphoto serve``), so its RSS is its own and the
clients do not share its interpreter. Results go to ``bench-out/`` (CSV, PNG plots,
``summary.json``) and to a section of ``docs/benchmarks.md``; each summary figure is printed
against its target in ``docs/design.md``.
"""

from __future__ import annotations

import csv
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import astuple, dataclass, field, fields
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from easyphoto.engines.backends.torch_backend import TorchBackend, default_device, default_dtype
from easyphoto.engines.faces.paths import FaceModelPaths
from easyphoto.engines.interface import ControlInput
from easyphoto.engines.lora import LoraWeights
from easyphoto.engines.models.family import ModelFamily
from easyphoto.engines.models.loading import resolve_family
from easyphoto.export.triton_server import ModelStatistics, TritonServer, statistics_since
from easyphoto.fixtures.photos import astronaut_face, sample_photo
from easyphoto.fixtures.users import publish_photo_user, random_lora
from easyphoto.imaging.codec import encode_png
from easyphoto.server.bench import (
    PROMPT,
    baseline_inpaint,
    baseline_pipeline,
    device_name,
    lora_loaded,
    run_concurrently,
    write_section,
)
from easyphoto.server.options import resolve_options
from easyphoto.server.pipeline import face_crop
from easyphoto.users.store import UserStore
from easyphoto.v1 import generator_pb2, generator_pb2_grpc

# One section per model family: the quick (tiny) and the full-size runs are both kept.
MARK = "<!-- bench:harness:{models}:{end} -->"
# The stages whose seconds are model calls (diffusion passes, face detection and embedding).
MODEL_STAGES = ("first_diffusion", "second_diffusion", "seam_pass", "background_restore", "detect", "score")
FIRST_KINDS, SECOND_KINDS = ("canny", "openpose", "color"), ("canny", "tile")
TEMPLATE = "astronaut"  # a one-face template (easyphoto.fixtures.photos)
TARGETS_FILE = Path("docs/design.md")
PLOTS = ("concurrency.png", "stages.png")


@dataclass(frozen=True)
class HarnessConfig:
    models: str = "tiny"
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16)
    users: int = 16  # distinct users of the many-users runs (each with its own random LoRA)
    lora_rank: int = 8
    first_steps: int = 50  # the passes' steps (strengths 0.45 and 0.35 as the defaults)
    second_steps: int = 20
    # Steps of the requests that load each user's adapter before the sweep (one step of each pass
    # at the default strengths): a full-size face on a CPU Triton takes 13 minutes at 10 + 10.
    warmup_steps: int = 3
    requests_per_level: int = 0  # 0: twice the concurrency, at least 4
    baseline_repeats: int = 3
    triton_concurrency: tuple[int, ...] = (1, 4)  # () skips the Triton backend and perf_analyzer
    fused: bool = True  # the Triton repository with the passes' fused stage graphs
    # Triton runs one model of at least this many MB of weights at a time (ServingSettings).
    rate_limit_mb: float | None = None
    perf_window_ms: int = 3000  # perf_analyzer's measurement window
    perf_stability_percent: float = 10.0  # how far apart its windows may be to count as stable
    out: Path = Path("bench-out")
    doc: Path = Path("docs/benchmarks.md")
    # The Triton export, kept between runs (a role is exported again only when it changed).
    export_cache: Path = Path("build/harness-export")

    def requests_at(self, concurrency: int) -> int:
        return self.requests_per_level or max(4, 2 * concurrency)


QUICK = HarnessConfig(first_steps=10, second_steps=10, baseline_repeats=3)
# Full SD 1.5 shapes on a CPU: one face at the reference's steps takes about 11 minutes here. Its
# Triton repository has no fused stages (their fp32 graphs hold each UNet and ControlNet weight
# again per stage), and runs one UNet, ControlNet, VAE or text encoder at a time: a step's
# ControlNets at once ran out of this machine's 24 GiB (and two cores gain nothing from them).
FULL_CPU = HarnessConfig(
    models="sd15-random", concurrency=(1, 2), users=2, lora_rank=128, first_steps=10, second_steps=10,
    requests_per_level=2, baseline_repeats=1, triton_concurrency=(1,), fused=False, perf_window_ms=40000,
    rate_limit_mb=100,
)  # fmt: skip
# On a GPU the sweep goes to 32 in flight, where the step-batching issue sets its faces/s target.
FULL_GPU = HarnessConfig(
    models="sd15-random", concurrency=(1, 2, 4, 8, 16, 32), users=16, lora_rank=128,
    triton_concurrency=(1, 4, 8),
)  # fmt: skip


@dataclass
class Request:
    """One Generate as a client saw it."""

    seconds: float
    faces: int
    timings: dict[str, float]

    @property
    def model_seconds(self) -> float:
        return sum(self.timings.get(stage, 0.0) for stage in MODEL_STAGES)

    @property
    def orchestrator_seconds(self) -> float:
        return self.timings.get("total", 0.0) - self.model_seconds


@dataclass
class Level:
    """One point of the sweep."""

    backend: str
    users: str  # "one user" or "N users"
    concurrency: int
    requests: list[Request]
    wall_seconds: float
    rss_mb: float
    # The server's step engine over the level: batched denoising calls, and the passes' steps
    # they served (one request at a time: one call a step; batching: fewer).
    denoise_calls: float = 0.0
    denoise_steps: float = 0.0

    def row(self) -> dict[str, Any]:
        latencies = [r.seconds for r in self.requests]
        faces = sum(r.faces for r in self.requests)
        return {
            "backend": self.backend,
            "users": self.users,
            "concurrency": self.concurrency,
            "requests": len(self.requests),
            "p50_s": quantile(latencies, 0.50),
            "p95_s": quantile(latencies, 0.95),
            "p99_s": quantile(latencies, 0.99),
            "faces_per_s": faces / self.wall_seconds,
            "model_ms_per_face": 1000 * sum(r.model_seconds for r in self.requests) / faces,
            "orchestrator_ms_per_face": 1000 * sum(r.orchestrator_seconds for r in self.requests) / faces,
            "lora_switch_ms": 1000
            * statistics.median(r.timings.get("lora_switch", 0.0) for r in self.requests),
            "rss_mb": self.rss_mb,
            "denoise_calls_per_step": self.denoise_calls / self.denoise_steps if self.denoise_steps else None,
        }


@dataclass
class Results:
    config: HarnessConfig
    device: str
    levels: list[Level] = field(default_factory=list)
    baseline_seconds: list[float] = field(default_factory=list)
    perf_analyzer: list[dict[str, float]] = field(default_factory=list)
    perf_analyzer_error: str = ""
    triton_models: dict[str, ModelStatistics] = field(default_factory=dict)  # Triton's, of its sweep

    def level(self, backend: str, users: str, concurrency: int) -> Level | None:
        found = [
            x for x in self.levels if (x.backend, x.users, x.concurrency) == (backend, users, concurrency)
        ]
        return found[0] if found else None

    @property
    def label(self) -> str:
        """The name of this run's section and plots: one per model family, and a GPU's apart."""
        return self.config.models + ("-gpu" if self.device.startswith("cuda") else "")

    def summary(self) -> dict[str, Any]:
        single = self.level("torch", "N users", 1) or self.levels[0]
        rows = {(x.backend, x.users, x.concurrency): x.row() for x in self.levels}
        eight = rows.get(("torch", "N users", 8))
        figures: dict[str, Any] = {
            "ratio_vs_diffusers_single": statistics.median(r.seconds for r in single.requests)
            / statistics.median(self.baseline_seconds),
            "throughput_ratio_c8": eight["faces_per_s"] / rows[("torch", "N users", 1)]["faces_per_s"]
            if eight
            else None,
            "orchestrator_ms_per_face": rows[("torch", "N users", 1)]["orchestrator_ms_per_face"],
            "lora_switch_ms": rows[("torch", "N users", 1)]["lora_switch_ms"],
            "models": self.config.models,
            "device": self.device,
            "steps": [self.config.first_steps, self.config.second_steps],
            "baseline_both_passes_s": statistics.median(self.baseline_seconds),
            "p50_s_c1": rows[("torch", "N users", 1)]["p50_s"],
            "max_rss_mb": max(x.rss_mb for x in self.levels),
            "peak_faces_per_s": max(x.row()["faces_per_s"] for x in self.levels),
        }
        return figures


def run_harness(config: HarnessConfig) -> Results:
    """The whole run: the Triton export and the baseline first (in this process), then our server
    and its sweep, then the Triton backend's; writes every output."""
    config.out.mkdir(parents=True, exist_ok=True)
    results = Results(config, device_name())
    with tempfile.TemporaryDirectory(prefix="easyphoto-bench-") as folder:
        data = Path(folder) / "data"
        family = resolve_family(config.models)
        publish_users(family, UserStore(data), config)
        triton = _export_for_triton(family, Path(folder), data, config) if config.triton_concurrency else None
        print(f"baseline: diffusers, both passes, {config.baseline_repeats} times", flush=True)
        results.baseline_seconds = time_baseline(family, config)  # moves the family to the device
        del family  # its memory is the server's to use now
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        with tqdm(total=_planned_requests(config), desc="bench", unit="req") as progress:
            with _orchestrator(config, data, ["--backend", "torch"]) as server:
                _sweep(results, server, "torch", config.concurrency, config, progress)
            if triton is not None:
                _triton_sweep(results, data, triton, config, progress)
    write_outputs(results)
    return results


def publish_users(family: ModelFamily, store: UserStore, config: HarnessConfig) -> None:
    face = astronaut_face()
    for index in range(config.users):
        publish_photo_user(store, f"user{index}", face, user_lora(family, index, config))


def user_lora(family: ModelFamily, index: int, config: HarnessConfig) -> LoraWeights:
    return random_lora(family, f"user{index}", config.lora_rank, index)


def _planned_requests(config: HarnessConfig) -> int:
    torch_requests = 2 * sum(config.requests_at(c) for c in config.concurrency)
    return torch_requests + sum(config.requests_at(c) for c in config.triton_concurrency)


# ---- the baseline ----


def time_baseline(family: ModelFamily, config: HarnessConfig) -> list[float]:
    """diffusers' StableDiffusionControlNetInpaintPipeline doing both passes of one face (the first
    with canny, openpose and colour ControlNets, the second with canny and tile), at the working
    size and steps our requests use, one after another, with user0's LoRA loaded as diffusers
    loads one (our requests paint users too)."""
    width, height = template_crop_size(family)
    device = default_device()  # where the server's torch backend runs, in its dtype
    family.to(device, default_dtype(device))
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, height, width, generator=generator)
    mask = torch.zeros(1, 1, height, width)
    mask[..., height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 1
    first = baseline_pipeline(family, list(FIRST_KINDS))
    second = baseline_pipeline(family, list(SECOND_KINDS))

    def controls(kinds: tuple[str, ...], scale: float) -> list[ControlInput]:
        return [
            ControlInput(kind, torch.rand(1, 3, height, width, generator=generator), scale) for kind in kinds
        ]

    def both_passes() -> None:
        painted = baseline_inpaint(
            first, PROMPT, "", image, mask, controls(FIRST_KINDS, 0.5), config.first_steps, 1
        )
        baseline_inpaint(
            second, PROMPT, "", painted, mask, controls(SECOND_KINDS, 1.0), config.second_steps, 2, 0.35
        )

    times = []
    with lora_loaded(first, user_lora(family, 0, config)):  # the second pass shares its UNet
        both_passes()  # warm-up
        for _ in range(config.baseline_repeats):
            started = time.perf_counter()
            both_passes()
            times.append(time.perf_counter() - started)
    return times


def template_crop_size(family: ModelFamily) -> tuple[int, int]:
    """(width, height) of the crop our server paints the template's face at, with a request's
    default crop options: the baseline paints as many pixels (the astronaut's is 512 x 576 at
    full SD 1.5 size, not 512 x 512)."""
    models = FaceModelPaths().load()
    template = sample_photo(TEMPLATE)
    face = models.analyzer(TorchBackend(faces=models, device="cpu")).largest(template)
    height, width = template.shape[:2]
    options = resolve_options(generator_pb2.GenerateRequest())
    _, size = face_crop(face.box, width, height, options, family.image_multiple, family.image_sizes[2])
    return size


# ---- our server and its clients ----


@dataclass
class _Server:
    process: subprocess.Popen[bytes]
    address: str
    metrics_port: int

    def rss_mb(self) -> float:
        return rss_mb(self.process.pid)

    def denoising(self) -> tuple[float, float]:
        """The step engine's denoising calls and the steps they served so far (its /metrics)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as page:
            return denoising_counts(page.read().decode())


def denoising_counts(exposition: str) -> tuple[float, float]:
    """``easyphoto_engine_calls_total{phase="denoise"}`` and every stage's
    ``easyphoto_denoising_steps_total`` from a Prometheus text page."""
    calls = steps = 0.0
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == "easyphoto_engine_calls_total" and sample.labels.get("phase") == "denoise":
                calls += sample.value
            elif sample.name == "easyphoto_denoising_steps_total":
                steps += sample.value
    return calls, steps


@contextmanager
def _orchestrator(config: HarnessConfig, data: Path, backend_args: list[str]) -> Iterator[_Server]:
    port, metrics_port = free_port(), free_port()
    command = [
        sys.executable, "-m", "easyphoto.cli.main", "serve", "--models", config.models, "--data", str(data),
        "--port", str(port), "--metrics-port", str(metrics_port),
        "--max-running", str(max(config.concurrency)), "--max-waiting", "64", *backend_args,
    ]  # fmt: skip
    log = (config.out / f"serve-{backend_args[1]}.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        wait_ready(process, metrics_port, timeout=1800)
        yield _Server(process, f"127.0.0.1:{port}", metrics_port)
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def wait_ready(process: subprocess.Popen[bytes], metrics_port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"easyphoto serve exited with {process.returncode} (see bench-out/serve-*.log)"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("easyphoto serve never became ready")


def _sweep(
    results: Results,
    server: _Server,
    backend: str,
    levels: tuple[int, ...],
    config: HarnessConfig,
    progress: tqdm,
    triton: TritonServer | None = None,  # its statistics of the measured requests are kept
) -> None:
    template = encode_png(sample_photo(TEMPLATE))
    with grpc.insecure_channel(
        server.address, options=[("grpc.max_receive_message_length", 64 << 20)]
    ) as channel:
        stub = generator_pb2_grpc.GeneratorStub(channel)
        for index in range(config.users):  # every user's adapter loaded once, as in steady serving
            _generate(stub, template, f"user{index}", config, warming=True)
        before = triton.settled_statistics() if triton is not None else {}  # the warm-ups counted
        modes = ("one user", "N users") if backend == "torch" else ("N users",)
        for mode in modes:
            for concurrency in levels:
                level = _run_level(stub, template, backend, mode, concurrency, config, server, progress)
                results.levels.append(level)
        if triton is not None:
            results.triton_models = statistics_since(triton.settled_statistics(), before)


def _run_level(
    stub: generator_pb2_grpc.GeneratorStub,
    template: bytes,
    backend: str,
    mode: str,
    concurrency: int,
    config: HarnessConfig,
    server: _Server,
    progress: tqdm,
) -> Level:
    """``requests_at(concurrency)`` requests from ``concurrency`` clients sending back to back,
    user by user in turn (``mode``: one user or all of them): their records, the wall time, the
    server's largest RSS and its step engine's denoising calls and steps over them."""
    users = ["user0"] if mode == "one user" else [f"user{i}" for i in range(config.users)]
    rss = [server.rss_mb()]
    lock = threading.Lock()
    calls, steps = server.denoising()

    def one(index: int) -> Request:
        request = _generate(stub, template, users[index % len(users)], config)
        with lock:
            rss.append(server.rss_mb())
            progress.update(1)
        return request

    wall, done = run_concurrently(config.requests_at(concurrency), concurrency, one)
    calls_after, steps_after = server.denoising()
    return Level(backend, mode, concurrency, done, wall, max(rss), calls_after - calls, steps_after - steps)


def _generate(
    stub: generator_pb2_grpc.GeneratorStub,
    template: bytes,
    user: str,
    config: HarnessConfig,
    warming: bool = False,
) -> Request:
    request = generator_pb2.GenerateRequest(templates=[template], user_ids=[user], seed=1)
    steps = (config.warmup_steps,) * 2 if warming else (config.first_steps, config.second_steps)
    request.first_pass.steps, request.second_pass.steps = steps
    started = time.perf_counter()
    response = stub.Generate(request, timeout=7200)
    seconds = time.perf_counter() - started
    faces = sum(1 for image in response.images for face in image.faces if face.user_id)
    return Request(seconds, faces, {t.stage: t.seconds for t in response.timings if not t.skipped})


@dataclass(frozen=True)
class _TritonExport:
    install: Any  # export.triton_server.TritonInstall
    export_dir: Path
    repository: Path
    roles: dict[str, Any]


def _export_for_triton(
    family: ModelFamily, folder: Path, data: Path, config: HarnessConfig
) -> _TritonExport | None:
    """The family exported (with its LoRA graphs, and its fused pass steps if ``config.fused``) as
    a CPU Triton repository whose models read users' adapters from the data folder; None without
    a tritonserver."""
    from easyphoto.diffusion.catalogue import role_catalogue
    from easyphoto.engines.faces.models import default_face_models
    from easyphoto.engines.roles.manifest import EngineManifest
    from easyphoto.export.onnx_export import export_all
    from easyphoto.export.triton_repository import ServingSettings, write_repository
    from easyphoto.export.triton_server import TritonUnavailable, find_install

    try:
        install = find_install()
    except TritonUnavailable as why:
        print(f"skipping the Triton backend: {why}", flush=True)
        return None
    print("exporting the family for Triton", flush=True)
    catalogue = role_catalogue(family, default_face_models(), fused=config.fused)
    export_dir = config.export_cache / f"{config.models}{'-fused' if config.fused else ''}"
    export_all(catalogue, export_dir, family, fp16_graphs=False)
    settings = ServingSettings(rate_limit_mb=config.rate_limit_mb)
    write_repository(
        export_dir, catalogue.roles, folder / "repository", settings=settings, adapter_dir=data / "adapters"
    )
    # The roles as the manifest describes them: the catalogue's build the family's modules, which
    # would stay in this process's memory beside the server's (22 of 24 GiB at full size).
    roles = EngineManifest.read(export_dir).catalogue.roles
    return _TritonExport(install, export_dir, folder / "repository", roles)


def _triton_sweep(
    results: Results, data: Path, triton: _TritonExport, config: HarnessConfig, progress: tqdm
) -> None:
    """The same requests through ``serve --backend triton`` on the CPU tritonserver, then Triton's
    own perf_analyzer on the repository's UNet."""
    from easyphoto.export.triton_bench import ROLE, run_perf_analyzer
    from easyphoto.export.triton_server import free_ports, start_server

    server = start_server(triton.repository, triton.install, free_ports())
    try:
        server.wait_ready(timeout=1800)  # full-size graphs take minutes to load on a CPU
        backend = [
            "--backend", "triton", "--triton-url", server.grpc_url, "--export-dir", str(triton.export_dir),
            "--adapter-dir", str(data / "adapters"),
        ]  # fmt: skip
        with _orchestrator(config, data, backend) as orchestrator:
            _sweep(results, orchestrator, "triton", config.triton_concurrency, config, progress, server)
        try:  # with a user's adapter on every request (the sweep wrote user0's factors)
            results.perf_analyzer = run_perf_analyzer(
                triton.install,
                server.grpc_url,
                triton.roles[ROLE],
                config.triton_concurrency,
                "user0@v1",
                config.perf_window_ms,
                config.perf_stability_percent,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            output = (error.stdout or b"").decode(errors="replace")[-400:].strip()
            results.perf_analyzer_error = f"{error}: {output}" if output else str(error)
    finally:
        server.stop()


# ---- outputs ----


def write_outputs(results: Results) -> None:
    out = results.config.out
    rows = [level.row() for level in results.levels]
    with (out / "results.csv").open("w", newline="") as handle:
        table = csv.DictWriter(handle, fieldnames=list(rows[0]))
        table.writeheader()
        table.writerows(rows)
    stages = _stage_means(results)
    with (out / "stages.csv").open("w", newline="") as handle:
        lines = csv.writer(handle)
        lines.writerow(["backend", "stage", "mean_s"])
        lines.writerows([backend, stage, seconds] for (backend, stage), seconds in stages.items())
    if results.triton_models:
        with (out / "triton_models.csv").open("w", newline="") as handle:
            lines = csv.writer(handle)
            lines.writerow(["model", *(column.name for column in fields(ModelStatistics))])
            lines.writerows([model, *astuple(counts)] for model, counts in results.triton_models.items())
    summary = results.summary()
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plots(results, stages)
    images = results.config.doc.parent / "images"  # the plots beside the section that shows them
    images.mkdir(parents=True, exist_ok=True)
    for name in PLOTS:
        shutil.copyfile(out / name, images / f"harness_{results.label}_{name}")
    write_section(results.config.doc, markdown(results, rows, summary))


def _stage_means(results: Results) -> dict[tuple[str, str], float]:
    """Mean seconds per request of each stage at concurrency 1 (many users), by backend."""
    means: dict[tuple[str, str], float] = {}
    for level in results.levels:
        if level.concurrency == 1 and level.users == "N users":
            for stage in sorted({s for r in level.requests for s in r.timings}):
                means[(level.backend, stage)] = statistics.mean(
                    r.timings.get(stage, 0.0) for r in level.requests
                )
    return means


def _plots(results: Results, stages: dict[tuple[str, str], float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (latency, throughput) = plt.subplots(1, 2, figsize=(11, 4))
    for index, (backend, users) in enumerate(sorted({(x.backend, x.users) for x in results.levels})):
        color = f"C{index}"  # one colour for a series in both panels
        levels = sorted(
            (x for x in results.levels if (x.backend, x.users) == (backend, users)),
            key=lambda x: x.concurrency,
        )
        xs = [x.concurrency for x in levels]
        label = f"{backend}, {users}"
        p50, p95 = ([x.row()[name] for x in levels] for name in ("p50_s", "p95_s"))
        latency.plot(xs, p50, marker="o", color=color, label=f"{label} p50")
        latency.plot(xs, p95, marker="x", linestyle="--", color=color, label=f"{label} p95")
        throughput.plot(xs, [x.row()["faces_per_s"] for x in levels], marker="o", color=color, label=label)
    sequential = len(results.baseline_seconds) and 1 / statistics.median(results.baseline_seconds)
    throughput.axhline(sequential, color="grey", linestyle=":", label="diffusers, both passes only, in turn")
    for axis, title, unit in ((latency, "latency", "seconds"), (throughput, "throughput", "faces / s")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent requests")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.legend(fontsize=7)
    figure.suptitle(f"{results.config.models}, {results.device}")
    figure.tight_layout()
    figure.savefig(results.config.out / "concurrency.png", dpi=110)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(9, 4))
    backends = sorted({backend for backend, _ in stages})
    names = [
        s
        for s in ("detect", "lora_switch", "first_diffusion", "second_diffusion", "score")
        if any((b, s) in stages for b in backends)
    ]
    bottom = np.zeros(len(backends))
    for name in names:
        heights = np.array([stages.get((b, name), 0.0) for b in backends])
        axis.bar(backends, heights, bottom=bottom, label=name)
        bottom += heights
    other = np.array([stages.get((b, "total"), 0.0) for b in backends]) - bottom
    axis.bar(backends, other, bottom=bottom, label="orchestrator (outside the models)")
    axis.set_ylabel("seconds per request (concurrency 1)")
    axis.set_title("where a request's time goes")
    handles, labels = axis.get_legend_handles_labels()  # listed top to bottom, as the bars stack
    axis.legend(handles[::-1], labels[::-1], fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(results.config.out / "stages.png", dpi=110)
    plt.close(figure)


def markdown(results: Results, rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    config = results.config
    lines = [
        MARK.format(models=results.label, end="begin"),
        f"### Harness: our gRPC clients at a concurrency sweep ({config.models}, {results.device})",
        "",
        f"`easyphoto bench --only harness{' --quick' if config == QUICK else ''}`: one 1-face template"
        f" (astronaut), steps {config.first_steps}/{config.second_steps} (strengths 0.45/0.35),"
        f" {config.users} users with random rank-{config.lora_rank} LoRAs; `easyphoto serve` as its own"
        " process; plots in `bench-out/` (`concurrency.png`, `stages.png`).",
        "",
        "| backend | users | conc. | requests | p50 s | p95 s | p99 s | faces/s | model ms/face |"
        " orchestrator ms/face | LoRA switch ms | RSS MB | denoise calls / step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['backend']} | {row['users']} | {row['concurrency']} | {row['requests']}"
            f" | {row['p50_s']:.2f} | {row['p95_s']:.2f} | {row['p99_s']:.2f} | {row['faces_per_s']:.3f}"
            f" | {row['model_ms_per_face']:.0f} | {row['orchestrator_ms_per_face']:.0f}"
            f" | {row['lora_switch_ms']:.1f} | {row['rss_mb']:.0f}"
            f" | {_per_step(row['denoise_calls_per_step'])} |"
        )
    lines += [
        "",
        f"Baseline: diffusers' `StableDiffusionControlNetInpaintPipeline`, both passes of a face on the same"
        f" models with user0's LoRA loaded (`load_lora_weights`: peft layers, unfused), one after another:"
        f" {summary['baseline_both_passes_s']:.2f} s median of {len(results.baseline_seconds)}.",
    ]
    if results.perf_analyzer_error:
        lines += ["", f"perf_analyzer failed: `{' '.join(results.perf_analyzer_error.split())}`"]
    if results.perf_analyzer:
        lines += [
            "",
            "perf_analyzer on the Triton repository's UNet, every request with user0's adapter:",
            "",
        ]
        lines += ["| conc. | infer/s | p50 ms | p99 ms |", "| --- | --- | --- | --- |"]
        lines += [
            f"| {r['concurrency']:.0f} | {r['throughput']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |"
            for r in results.perf_analyzer
        ]
    lines += triton_account(results)
    lines += [""] + [f"![{name}](images/harness_{results.label}_{name})" for name in PLOTS]
    lines += ["", "| summary.json | value | target (docs/design.md) |", "| --- | --- | --- |"]
    targets = read_targets()
    for name, value in summary.items():
        if name in targets:
            lines.append(f"| {name} | {_format(value)} | {targets[name]} |")
    lines.append(MARK.format(models=results.label, end="end"))
    return "\n".join(lines)


def triton_account(results: Results) -> list[str]:
    """Triton's statistics of its sweep's requests: where the Triton backend's time went."""
    if not results.triton_models:
        return []
    wall = sum(x.wall_seconds for x in results.levels if x.backend == "triton")
    models = sorted(results.triton_models.items(), key=lambda item: -item[1].compute_infer_s)
    infer = sum(counts.compute_infer_s for _, counts in models)
    lines = [
        "",
        f"Triton's statistics of those requests (`/v2/models/stats`): its models' executions"
        f" computed for {infer:.1f} s in all, over {wall:.1f} s of the sweep's wall time"
        " (executions overlap at concurrency above 1).",
        "",
        "| model | executions | rows | rows / execution | infer ms / execution | queue ms / execution"
        " | input + output ms / execution | infer s in all |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, counts in models:
        runs = counts.executions
        lines.append(
            f"| {model} | {runs} | {counts.inferences} | {counts.inferences / runs:.2f}"
            f" | {1e3 * counts.compute_infer_s / runs:.1f} | {1e3 * counts.queue_s / runs:.1f}"
            f" | {1e3 * (counts.compute_input_s + counts.compute_output_s) / runs:.1f}"
            f" | {counts.compute_infer_s:.1f} |"
        )
    return lines


def read_targets(path: Path = TARGETS_FILE) -> dict[str, str]:
    """``| name | target | ... |`` rows of the targets table in docs/design.md."""
    if not path.is_file():
        return {}
    found = re.findall(r"^\| `([a-z0-9_]+)` \| ([^|]+) \|", path.read_text(), flags=re.MULTILINE)
    return {name: target.strip() for name, target in found}


def print_against_targets(summary: dict[str, Any]) -> list[str]:
    """Each summary figure beside its target, as the bench prints them."""
    targets = read_targets()
    on_gpu = str(summary.get("device", "")).startswith("cuda")
    lines = []
    for name, value in summary.items():
        target = targets.get(name)
        met = target is not None and meets(value, target, on_gpu)
        judged = (
            "not measured (the sweep has no such level)" if value is None else "met" if met else "NOT met"
        )
        verdict = "" if target is None else f"  target {target}: {judged}"
        lines.append(f"{name} = {_format(value)}{verdict}")
    return lines


def meets(value: Any, target: str, on_gpu: bool = False) -> bool:
    """Whether ``value`` meets a target written ``≤ x`` or ``≥ x``; of clauses marked "on a CPU"
    and "on a GPU", the device's."""
    clauses = re.findall(r"([≤≥])\s*([0-9.]+)([^,;]*)", target)
    if not clauses or not isinstance(value, int | float):
        return False
    device = "GPU" if on_gpu else "CPU"
    sign, limit, _ = next((c for c in clauses if f"on a {device}" in c[2]), clauses[0])
    return value <= float(limit) if sign == "≤" else value >= float(limit)


def _per_step(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _format(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def quantile(values: list[float], q: float) -> float:
    return float(np.quantile(np.array(values), q))


def rss_mb(pid: int) -> float:
    """A live process's resident set (``VmRSS`` of ``/proc/PID/status``) in MiB; 0 once it is gone."""
    status = Path(f"/proc/{pid}/status")
    found = re.search(r"^VmRSS:\s+(\d+) kB", status.read_text(), re.MULTILINE) if status.is_file() else None
    return int(found.group(1)) / 1024 if found else 0.0


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
