"""``make bench`` (``easyphoto bench --only triton``): Triton's own perf_analyzer on the UNet role at a
concurrency sweep, next to our client's numbers (the triton backend vs onnxruntime in process on the
same input: the per-call overhead Triton adds).

perf_analyzer is the real binary from the ``tritonclient==2.51.0`` wheel, installed into the
Triton venv by ``make triton-setup``; it needs ``libb64`` and ``libcudart`` from nvidia-pytriton's
bundled libraries (linked under ``<venv>/perf-libs``), even on CPU.
"""

from __future__ import annotations

import csv
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import torch
from transformers import CLIPTokenizer

from easyphoto.diffusion.catalogue import role_catalogue
from easyphoto.diffusion.passes import FIRST_PASS
from easyphoto.engines.backends.triton_backend import TritonBackend
from easyphoto.engines.interface import ControlInput, Engines
from easyphoto.engines.models.family import ModelFamily
from easyphoto.engines.roles.description import RoleDescription
from easyphoto.engines.roles.diffusion import controlnet_role, stage_role_name

from .onnx_export import export_all
from .triton_repository import write_repository
from .triton_server import TritonInstall, free_ports, start_server

MARK_BEGIN = "<!-- bench:triton:begin -->"
MARK_END = "<!-- bench:triton:end -->"
CONCURRENCY = (1, 2, 4)
ROLE = "unet"


def perf_analyzer(install: TritonInstall) -> tuple[Path, dict[str, str]]:
    """The binary and the environment it runs in."""
    binary = install.venv / "bin" / "perf_analyzer"
    if not binary.is_file():
        raise FileNotFoundError(f"{binary} is missing; run `make triton-setup`")
    libs = install.venv / "perf-libs"
    libs.mkdir(exist_ok=True)
    for pattern, name in (("libb64*.so*", "libb64.so.0d"), ("libcudart*.so*", "libcudart.so.12")):
        found = sorted((install.site_packages / "nvidia_pytriton.libs").glob(pattern))
        if found and not (libs / name).exists():
            (libs / name).symlink_to(found[0].resolve())
    return binary, {"LD_LIBRARY_PATH": str(libs), "PATH": "/usr/bin:/bin"}


def _shape_flags(description: RoleDescription) -> list[str]:
    """``--shape name:dims`` at the opt point, as the Triton model declares them."""
    values = description.axis_values("opt")
    flags = []
    for spec in description.inputs:
        dims = [d if isinstance(d, int) else d.resolve(values) for d in description.triton_dims(spec)]
        flags += ["--shape", f"{spec.name}:{','.join(str(d) for d in dims)}"]
    return flags


def run_perf_analyzer(
    install: TritonInstall,
    grpc_url: str,
    description: RoleDescription,
    concurrency: tuple[int, ...] = CONCURRENCY,
    string_data: str | None = None,
    window_ms: int = 3000,
    stability_percent: float = 10.0,
) -> list[dict[str, float]]:
    """perf_analyzer's rows at each concurrency; ``string_data`` fills every string input (a
    model serving users' adapters takes the adapter's name there: give one the repository has).
    ``window_ms``: each measurement window, long enough for several inferences (perf_analyzer
    takes up to ten windows to find three that agree); ``stability_percent``: how far apart their
    throughput and latency may be to agree (perf_analyzer's default, 10)."""
    binary, env = perf_analyzer(install)
    strings = ["--string-data", string_data] if string_data is not None else []
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for level in concurrency:
            report = Path(folder) / f"c{level}.csv"
            command = [
                str(binary), "-m", description.name, "-u", grpc_url, "-i", "grpc", "-b", "1",
                "--concurrency-range", str(level), "--measurement-interval", str(window_ms),
                "--stability-percentage", f"{stability_percent:g}",
                "-f", str(report), *_shape_flags(description), *strings,
            ]  # fmt: skip
            timeout = max(300, window_ms * 12 / 1000)  # ten windows and the warm-up
            subprocess.run(command, env=env, check=True, capture_output=True, timeout=timeout)
            with open(report) as handle:
                row = next(csv.DictReader(handle))
            rows.append(
                {
                    "concurrency": level,
                    "throughput": float(row["Inferences/Second"]),
                    "p50_ms": float(row["p50 latency"]) / 1000,
                    "p99_ms": float(row["p99 latency"]) / 1000,
                    "queue_ms": float(row["Server Queue"]) / 1000,
                    "compute_ms": float(row["Server Compute Infer"]) / 1000,
                }
            )
    return rows


def client_overhead(
    infer: Callable[[str, dict[str, torch.Tensor]], object],
    onnx_path: Path,
    description: RoleDescription,
    repeats: int = 30,
) -> tuple[float, float]:
    """Median ms of one call through our triton backend and of onnxruntime in process (same input)."""
    # Batch 1 at the opt height and width, like perf_analyzer's requests.
    sample = {name: tensor[:1] for name, tensor in description.sample_inputs("opt", seed=0).items()}
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feed = {name: tensor.numpy() for name, tensor in sample.items()}

    through_triton = _median_ms(lambda: infer(description.name, sample), repeats)
    return through_triton, _median_ms(lambda: session.run(None, feed), repeats)


def _median_ms(run: Callable[[], object], repeats: int) -> float:
    run()  # warm up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def step_times(
    url: str,
    roles: dict[str, RoleDescription],
    kinds: tuple[str, ...],
    tokenizer: CLIPTokenizer,
    repeats: int = 20,
) -> tuple[float, float]:
    """Median ms of one denoising step of the pass with ``kinds`` (batch 2 for CFG, opt size), as the
    orchestrator makes it (:meth:`Engines.predict_noise`): without the fused stage (its ControlNets,
    then the UNet) and with it (one call)."""
    step = roles[ROLE].sample_inputs("opt", seed=0)
    weights = FIRST_PASS.control_weights()
    controls = [
        ControlInput(
            kind, roles[controlnet_role(kind)].sample_inputs("opt", seed=1)["controlnet_cond"], weights[kind]
        )
        for kind in kinds
    ]
    args = (step["sample"], step["timestep"], step["encoder_hidden_states"], controls)
    stage = stage_role_name(kinds)
    separate = {name: role for name, role in roles.items() if name != stage}
    return _step_ms(url, separate, tokenizer, args, repeats), _step_ms(url, roles, tokenizer, args, repeats)


def _step_ms(
    url: str, served: dict[str, RoleDescription], tokenizer: CLIPTokenizer, args: tuple, repeats: int
) -> float:
    backend = TritonBackend(url, served)
    try:
        engines = Engines(backend, tokenizer, 1.0)
        return _median_ms(lambda: engines.predict_noise(*args), repeats)
    finally:
        backend.close()


def triton_section(install: TritonInstall, family: ModelFamily, build: Path = Path("build")) -> str:
    """Exports the UNet, the first pass's ControlNets and its fused stage, serves them on the CPU
    tritonserver and measures; the markdown section for ``docs/benchmarks.md``."""
    kinds = tuple(FIRST_PASS.control_weights())
    wanted = {ROLE, stage_role_name(kinds), *(controlnet_role(kind) for kind in kinds)}
    catalogue = role_catalogue(family).only(wanted)
    roles = catalogue.roles
    export_dir, repository = build / "bench-export", build / "bench-triton-repo"
    export_all(catalogue, export_dir, family)
    write_repository(export_dir, roles, repository)
    server = start_server(repository, install, free_ports())
    try:
        server.wait_ready()
        description = roles[ROLE]
        rows = run_perf_analyzer(install, server.grpc_url, description)
        backend = TritonBackend(server.grpc_url, {ROLE: description})
        ours, local = client_overhead(backend.infer, export_dir / ROLE / "model.onnx", description)
        shared = TritonBackend(
            server.grpc_url, {ROLE: description}, shared_memory="system", shared_memory_min_bytes=1
        )
        try:
            with_shm, _ = client_overhead(shared.infer, export_dir / ROLE / "model.onnx", description)
        finally:
            shared.close()
        steps = (
            step_times(server.grpc_url, roles, kinds, family.tokenizer)
            if stage_role_name(kinds) in roles
            else None
        )
    finally:
        server.stop()
    shape = description.shapes("opt", {"batch": 1})["sample"]
    lines = [
        MARK_BEGIN,
        f"### Triton (CPU tritonserver 2.51, python backend + onnxruntime): `{ROLE}`, tiny, sample {shape}",
        "",
        f"Device: cpu ({platform.machine()}, 2 cores). perf_analyzer over gRPC, batch 1, 3 s windows.",
        "",
        "| concurrency | inferences/s | p50 ms | p99 ms | server queue ms | server compute ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['concurrency']} | {row['throughput']:.1f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f}"
            f" | {row['queue_ms']:.2f} | {row['compute_ms']:.2f} |"
        )
    lines += [
        "",
        f"Our client (the triton backend, same input, median of 30): **{ours:.2f} ms** per call; onnxruntime"
        f" in process: {local:.2f} ms; Triton adds **{ours - local:.2f} ms** per call (target ≤ 1 ms).",
        f"With every input in system shared memory, unchanged between calls (the best case: prompt embeddings"
        f" and control images are constant within a pass): **{with_shm:.2f} ms** per call.",
        *(
            [
                f"One first-pass step ({' + '.join(kinds)} ControlNets, then the UNet; batch 2):"
                f" four calls **{steps[0]:.2f} ms**, the fused stage graph in one call **{steps[1]:.2f} ms**"
                f" ({steps[0] / steps[1]:.2f}x)."
            ]
            if steps
            else []
        ),
        "On this CPU build the overhead is the python backend's: each request crosses into a stub process"
        " through shared memory and back, and the ONNX graph runs there; a GPU host serves the TensorRT"
        " engines natively (`deploy/README.md`), which this machine cannot measure.",
        MARK_END,
    ]
    return "\n".join(lines)
