"""The ``easyphoto`` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from easyphoto.rpc.termination import TERMINATION, end_process

from . import training, triton
from .service_args import add_client_security, add_service_arguments, client_security, service_settings


def _serve(args: argparse.Namespace) -> int:
    from easyphoto.server.app import ServerConfig, serve

    serve(
        ServerConfig(
            **service_settings(args),
            backend=args.backend,
            triton_url=args.triton_url,
            export_dir=Path(args.export_dir),
            triton_shared_memory=args.triton_shared_memory,
            triton_cuda_device=args.triton_cuda_device,
            triton_wait_seconds=args.triton_wait,
            max_running=args.max_running,
            max_waiting=args.max_waiting,
            adapter_cache_bytes=args.adapter_cache_mb << 20,
            adapter_dir=Path(args.adapter_dir) if args.adapter_dir else None,
            **_lcm_settings(args),
            sdxl=args.sdxl,
        )
    )
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .client import GeneratorClient, ServiceError

    templates = [Path(t) for t in args.templates]
    try:
        options = _generate_options(args)
        security = client_security(args)
        client = GeneratorClient(
            args.server, timeout=args.timeout, security=security, route_by_user=args.route_by_user
        )
        with client:
            events = client.generate_stream(templates, args.user, **options)
            response = _follow_generation(events, several=len(templates) > 1)
    except (ValueError, OSError, ServiceError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    _write_generated(response, templates, Path(args.out))
    print(
        _timings_line({t.stage: t.seconds for t in response.timings if not t.skipped})
        + f" ({response.model_family})"
    )
    for timing in response.timings:
        if timing.skipped:
            print(f"skipped {timing.stage}: {timing.reason}")
    return 0


def _generate_options(args: argparse.Namespace) -> dict[str, Any]:
    """Request options from the dedicated flags, then ``--set NAME=VALUE`` typed from the proto."""
    from easyphoto.v1 import generator_pb2

    from .client import parse_option

    flags = {
        "seed": args.seed,
        "first_pass.steps": args.steps_first,
        "second_pass.steps": args.steps_second,
        "lora_weight": args.lora_weight,
        "return_intermediates": args.intermediates or None,
    }
    options = {name: value for name, value in flags.items() if value is not None}
    options.update(parse_option(generator_pb2.GenerateRequest, assignment) for assignment in args.set)
    return options


def _follow_generation(events: Iterator[Any], several: bool) -> Any:
    """Shows one progress bar over the request's steps; the response."""
    from tqdm import tqdm

    from easyphoto.v1 import generator_pb2

    with tqdm(unit="step", dynamic_ncols=True) as bar:
        for event in events:
            if not isinstance(event, generator_pb2.Progress):
                return event
            bar.total = event.request_total_steps
            where = f"template {event.template_index} " if several else ""
            bar.set_description(f"{where}{event.stage} face {event.face_index}")
            bar.update(event.request_step - bar.n)
    raise ValueError("the server ended the stream without a result")


def _write_generated(response: Any, templates: list[Path], out: Path) -> None:
    """Each image as ``STEM_seedN.png`` (intermediates in ``STEM_seedN/``), with its faces' scores."""
    stems = [t.stem for t in templates]
    if len(set(stems)) < len(stems):
        stems = [f"{i}_{stem}" for i, stem in enumerate(stems)]
    out.mkdir(parents=True, exist_ok=True)
    for image in response.images:
        name = f"{stems[image.template_index]}_seed{image.seed}"
        (out / f"{name}.png").write_bytes(image.png)
        if image.intermediates:
            (out / name).mkdir(exist_ok=True)
        for step in image.intermediates:
            (out / name / f"{step.name}.png").write_bytes(step.png)
        scores = ", ".join(
            f"{face.user_id}={face.identity_score:.3f}" if face.HasField("identity_score") else "(skipped)"
            for face in image.faces
        )
        print(f"{out / name}.png: identity scores [{scores}]")


def _timings_line(seconds: dict[str, float]) -> str:
    return "timings (s): " + ", ".join(f"{stage}={value:.2f}" for stage, value in seconds.items())


def _demo(args: argparse.Namespace) -> int:
    from .demo import DataInUse, run_demo

    try:
        result = run_demo(Path(args.out), models=args.models, steps=args.steps, seed=args.seed)
    except DataInUse as refused:
        print(refused, file=sys.stderr)
        return 2
    for name, generation in result.generations.items():
        scores = ", ".join("-" if s is None else f"{s:.3f}" for s in generation["scores"])  # type: ignore[attr-defined]
        print(
            f"{name}: identity scores [{scores}] -> {result.out_dir / name}.png, stages in {name}_stages.png"
        )
    print(_timings_line(result.seconds))
    if result.is_random:
        print(
            "NOTE: the tiny models have random weights, so faces are painted with noise and identity "
            "scores mean nothing. Point --models at a real SD 1.5 diffusers folder or .safetensors file "
            "(with its ControlNets) to paint faces."
        )
    return 0


def _models(args: argparse.Namespace) -> int:
    from easyphoto.diffusion.catalogue import role_catalogue
    from easyphoto.engines.models.loading import resolve_family
    from easyphoto.engines.roles.manifest import EngineManifest

    family = resolve_family(args.models)
    manifest = EngineManifest.of_family(family, role_catalogue(family))
    print(json.dumps(manifest.to_json(), indent=2))
    return 0


def _work(args: argparse.Namespace) -> int:
    from easyphoto.cli.work import face_work, work_table

    work = face_work(args.models, args.faces, args.side)
    print("\n".join(work_table(work, args.models, args.peak_tflops)))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from easyphoto.server.bench import run_bench, write_section
    from easyphoto.server.face_bench import face_section

    out = Path(args.out)
    if args.only in ("all", "faces"):
        section = face_section()
        write_section(out, section)
        print(section)
    if args.only in ("all", "first-pass"):
        print(run_bench(out, models=args.models, size=args.size, steps=args.steps, repeats=args.repeats))
    if args.only in ("all", "triton"):
        section = _triton_bench(args.models)
        write_section(out, section)
        print(section)
    if args.only in ("all", "lcm"):
        from easyphoto.server.lcm_bench import lcm_section

        section = lcm_section(args.models)
        write_section(out, section)
        print(section)
    if args.only in ("all", "lora"):
        from easyphoto.server.lora_bench import lora_section

        section = lora_section(args.models, repeats=args.repeats)
        write_section(out, section)
        print(section)
    if args.only in ("all", "harness"):
        _harness(args, out)
    return 0


def _harness(args: argparse.Namespace, doc: Path) -> None:
    """The gRPC sweep against a running orchestrator, beside diffusers and the Triton backend."""
    from dataclasses import replace

    import torch

    from easyphoto.cli.load_bench import FULL_CPU, FULL_GPU, QUICK, print_against_targets, run_harness

    config = QUICK if args.quick else FULL_GPU if torch.cuda.is_available() else FULL_CPU
    config = replace(config, out=Path(args.harness_out), doc=doc)
    results = run_harness(replace(config, triton_concurrency=()) if args.no_triton else config)
    for line in print_against_targets(results.summary()):
        print(line)


def _triton_bench(models: str) -> str:
    from easyphoto.engines.models.loading import resolve_family
    from easyphoto.export.triton_bench import triton_section
    from easyphoto.export.triton_server import find_install

    return triton_section(find_install(), resolve_family(models))


def _soak(args: argparse.Namespace) -> int:
    """Both services under load for a bounded time, checked for leaks (``cli/soak.py``)."""
    from .soak import SoakConfig, soak

    try:
        config = SoakConfig(
            minutes=args.minutes,
            warmup_minutes=args.warmup_minutes,
            concurrency=args.concurrency,
            out=Path(args.out),
            doc=Path(args.doc) if args.doc else None,
            models=args.models,
            sample_seconds=args.sample_seconds,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return soak(config)


def _faces(args: argparse.Namespace) -> int:
    from .faces import compare_faces, default_analyzer, list_faces

    analyzer = default_analyzer(Path(args.face_models) if args.face_models else None)
    if args.compare:
        if len(args.photos) != 2:
            print("--compare takes exactly two photos", file=sys.stderr)
            return 2
        first, second = args.photos
        return compare_faces(first, second, analyzer=analyzer)
    return list_faces(args.photos, analyzer)


def _export(args: argparse.Namespace) -> int:
    from easyphoto.diffusion.catalogue import role_catalogue
    from easyphoto.engines.faces.models import default_face_models
    from easyphoto.engines.models.loading import resolve_family
    from easyphoto.export.onnx_export import export_all

    family = resolve_family(args.models)
    if args.lcm_lora:
        from easyphoto.engines.models.variants import add_lcm_lora
        from easyphoto.rpc.errors import ModelMissing

        try:
            add_lcm_lora(family, **_lcm_settings(args))
        except ModelMissing as error:
            print(f"error: {error.message}", file=sys.stderr)
            return 2
    faces = None if args.no_faces else default_face_models()
    sdxl = None
    if args.sdxl:
        from easyphoto.engines.models.sdxl import SdxlLoadError, resolve_sdxl_family

        try:
            sdxl = resolve_sdxl_family(args.sdxl)
        except SdxlLoadError as error:
            print(f"error: --sdxl: {error}", file=sys.stderr)
            return 2
    catalogue = role_catalogue(family, faces, fused=args.fused, sdxl=sdxl)
    if args.roles:
        catalogue = catalogue.only(args.roles.split(","))
    roles = catalogue.roles
    out = Path(args.out)
    from easyphoto.engines.models.sdxl import SdxlFacts

    facts = SdxlFacts.of(sdxl) if sdxl is not None else None
    results = export_all(
        catalogue, out, family, force=args.force, lora_graphs=not args.no_lora_graphs, sdxl=facts
    )
    for result in results:
        state = "unchanged" if result.skipped else f"{result.seconds:.1f}s"
        verdict = "ok" if result.ok else "MISMATCH"
        fp16 = f" fp16 rel={result.fp16_rel_diff:.1e}" if result.fp16_path else ""
        print(
            f"{result.role:20s} {verdict:8s} max|ort-torch|={result.max_abs_diff:.2e}{fp16} ({state})"
            f" {result.path}"
        )
    if args.tensorrt:  # only on a GPU host with the gpu extra (NVIDIA's Triton container)
        from easyphoto.export.tensorrt_plan import build_all

        for engine in build_all(out):
            print(f"built {engine}")
    if args.triton:
        from easyphoto.export.triton_repository import ServingSettings, write_repository
        from easyphoto.users.store import default_data_root

        adapter_dir = Path(args.adapter_dir) if args.adapter_dir else default_data_root() / "adapters"
        settings = ServingSettings(rate_limit_mb=args.rate_limit_mb)
        models = write_repository(
            out, roles, Path(args.triton), target=args.target, settings=settings, adapter_dir=adapter_dir
        )
        print(f"wrote {len(models)} {args.target} models into {args.triton}")
    return 0 if all(r.ok for r in results) else 1


def _lcm_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``lcm_lora`` and ``lcm_lora_weight`` from the command line (the weight's default is
    :data:`engines.models.variants.LCM_LORA_WEIGHT`, read only when an LCM-LoRA is given)."""
    if not args.lcm_lora:
        return {}
    from easyphoto.engines.models.variants import LCM_LORA_WEIGHT

    weight = LCM_LORA_WEIGHT if args.lcm_lora_weight is None else args.lcm_lora_weight
    return {"lcm_lora": Path(args.lcm_lora), "lcm_lora_weight": weight}


def add_lcm_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """``--lcm-lora FILE`` and ``--lcm-lora-weight`` (serve and export)."""
    parser.add_argument(
        "--lcm-lora",
        default="",
        metavar="FILE",
        help=f"an LCM-LoRA .safetensors (peft or kohya keys) fused into a copy of the UNet: {what}",
    )
    parser.add_argument(
        "--lcm-lora-weight",
        type=float,
        default=None,
        help="its weight in the fused UNet (default: the reference's for SD 1.5, 0.8)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="easyphoto", description="EasyPhoto as a gRPC backend")
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the orchestrator (Generator) gRPC server")
    add_service_arguments(serve, port=50051, metrics_port=9464, data="user artifacts")
    serve.add_argument("--backend", default="torch", choices=["torch", "triton"])
    serve.add_argument(
        "--triton-url", default="127.0.0.1:8001", help="Triton's gRPC address (--backend triton)"
    )
    serve.add_argument(
        "--export-dir",
        default="build/export",
        help="what `easyphoto export` wrote there (manifest.json, tokenizer/) describes the roles Triton"
        " serves (--backend triton; no model weights load in this process)",
    )
    serve.add_argument(
        "--triton-shared-memory",
        nargs="?",
        const="system",
        default="none",
        metavar="none|system|cuda",
        help="send large tensors through shared memory with a co-located Triton: system (the bare"
        " flag) or cuda (a GPU host; the gpu extra)",
    )
    serve.add_argument("--triton-cuda-device", type=int, default=0, help="Triton's GPU (cuda shared memory)")
    serve.add_argument(
        "--triton-wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long loading waits for Triton, unready meanwhile (default: as long as it takes)",
    )
    serve.add_argument(
        "--max-running",
        type=int,
        default=None,
        help="requests run at once, their denoising steps batched together (default: 8 on CPU, 32 on a GPU)",
    )
    serve.add_argument(
        "--max-waiting",
        type=int,
        default=8,
        help="requests waiting beyond those; more get RESOURCE_EXHAUSTED",
    )
    serve.add_argument(
        "--adapter-dir",
        default="",
        help="--backend triton: where Triton's models read users' adapters, which this server writes"
        " (default: DATA/adapters; export --triton --adapter-dir must name the same folder)",
    )
    serve.add_argument(
        "--adapter-cache-mb",
        type=int,
        default=4096,
        help="users' LoRA adapters kept hot on the serving device, least recently used out first",
    )
    add_lcm_arguments(serve, "requests with lcm_accelerate paint with it")
    serve.add_argument(
        "--sdxl",
        default=None,
        metavar="FOLDER",
        help="an SDXL diffusers folder (or tiny-sdxl) that paints templates from text (template_from_text)",
    )
    serve.set_defaults(run=_serve, service=True)

    generate = commands.add_parser(
        "generate",
        help="paint users into templates on a running orchestrator (progress bar; PNGs into --out)",
    )
    generate.add_argument("templates", nargs="+", metavar="TEMPLATE", help="template photos")
    generate.add_argument(
        "--user", action="append", required=True, metavar="ID", help="user of the next face, left to right"
    )
    generate.add_argument("--out", default="generate-out")
    generate.add_argument("--server", default="127.0.0.1:50051")
    generate.add_argument(
        "--route-by-user",
        action="store_true",
        help="--server names several orchestrators: send each user's requests to the same one",
    )
    add_client_security(generate)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--steps-first", type=int, default=None, help="first pass steps (default 50)")
    generate.add_argument("--steps-second", type=int, default=None, help="second pass steps (default 20)")
    generate.add_argument("--lora-weight", type=float, default=None, help="default 0.9")
    generate.add_argument("--intermediates", action="store_true", help="also write masks, controls, passes")
    generate.add_argument("--timeout", type=float, default=600.0, help="deadline in seconds")
    generate.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any GenerateRequest option by dotted name, e.g. first_pass.strength=0.4",
    )
    generate.set_defaults(run=_generate)

    demo = commands.add_parser("demo", help="run the main job end to end on the embedded backend")
    demo.add_argument("--out", default="demo-out")
    demo.add_argument("--models", default="tiny")
    demo.add_argument("--steps", type=int, default=0, help="steps of every pass (default: the reference's)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    models = commands.add_parser("models", help="load a model family and print its engine manifest")
    models.add_argument("--models", default="tiny")
    models.set_defaults(run=_models)
    work = commands.add_parser(
        "work", help="rows and FLOPs a face costs at the reference's passes (counted, not measured)"
    )
    work.add_argument("--models", default="sd15-random", choices=("tiny", "sd15-random"))
    work.add_argument("--faces", type=int, default=1, help="painted faces a template")
    work.add_argument("--side", type=int, default=512, help="the crop's side in pixels")
    work.add_argument(
        "--peak-tflops", type=float, default=None, help="a device's peak: faces/s at shares of it"
    )
    work.set_defaults(run=_work)
    faces = commands.add_parser("faces", help="print the faces of photos as JSON lines, or --compare two")
    faces.add_argument("photos", nargs="+")
    faces.add_argument(
        "--compare", action="store_true", help="cosine similarity of the largest faces of two photos"
    )
    faces.add_argument(
        "--face-models",
        default=None,
        help="an insightface pack directory (SCRFD + ArcFace ONNX; non-commercial licence)",
    )
    faces.set_defaults(run=_faces)

    export = commands.add_parser("export", help="write ONNX for every role, checked against PyTorch")
    export.add_argument("--models", default="tiny")
    export.add_argument("--out", default="build/export")
    export.add_argument("--roles", default="", help="comma-separated role names (default: all)")
    export.add_argument("--no-faces", action="store_true", help="leave out the face roles")
    export.add_argument("--force", action="store_true", help="re-export even when nothing changed")
    export.add_argument("--fused", action="store_true", help="also one graph per reference pass step")
    export.add_argument("--tensorrt", action="store_true", help="build the TensorRT engines (GPU host only)")
    export.add_argument("--triton", default="", metavar="DIR", help="write a Triton model repository there")
    export.add_argument(
        "--target", choices=["cpu", "gpu"], default="cpu", help="python+onnxruntime or TensorRT"
    )
    export.add_argument(
        "--adapter-dir",
        default="",
        help="where the repository's models read users' adapters, which serve --backend triton writes"
        " (default: $EASYPHOTO_DATA/adapters, serve's default)",
    )
    export.add_argument(
        "--rate-limit-mb",
        type=float,
        default=None,
        metavar="MB",
        help="models with at least this many MB of weights run one at a time under tritonserver"
        " --rate-limit=execution_count (--rate-limit-resource=memory:N for N); for a small CPU host",
    )
    export.add_argument(
        "--no-lora-graphs",
        action="store_true",
        help="leave out the graphs with LoRA inputs (no users on Triton)",
    )
    add_lcm_arguments(export, "its roles (lcm_unet, lcm_stage_*) are exported beside the base's")
    export.add_argument(
        "--sdxl",
        default="",
        metavar="FOLDER",
        help="also export an SDXL folder's roles (templates from text)",
    )
    export.set_defaults(run=_export)

    bench = commands.add_parser("bench", help="time our loop against diffusers; writes docs/benchmarks.md")
    bench.add_argument("--out", default="docs/benchmarks.md")
    bench.add_argument("--models", default="tiny")
    bench.add_argument("--size", type=int, default=256)
    bench.add_argument("--steps", type=int, default=50)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument(
        "--only", choices=["all", "faces", "first-pass", "triton", "lcm", "lora", "harness"], default="all"
    )
    bench.add_argument(
        "--quick", action="store_true", help="harness: the tiny family, fewer steps (under 10 min on 2 cores)"
    )
    bench.add_argument("--harness-out", default="bench-out", help="harness: CSV, plots and summary.json")
    bench.add_argument(
        "--no-triton", action="store_true", help="harness: the torch backend only (no tritonserver here)"
    )
    bench.set_defaults(run=_bench)

    soak = commands.add_parser(
        "soak", help="both services under load for a bounded time; fails on errors, deaths or RSS growth"
    )
    soak.add_argument("--minutes", type=float, default=10.0, help="the whole load, warm-up included")
    soak.add_argument("--warmup-minutes", type=float, default=2.0, help="RSS growth is measured from here")
    soak.add_argument("--concurrency", type=int, default=16, help="client threads in all")
    soak.add_argument("--out", default="bench-out/soak", help="samples.csv, soak.png, summary.json, logs")
    soak.add_argument("--doc", default="", help="a markdown file to write the soak section into")
    soak.add_argument("--models", default="tiny")
    soak.add_argument("--sample-seconds", type=float, default=5.0, help="how often the processes are sampled")
    soak.set_defaults(run=_soak)
    training.register(commands)
    triton.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "service", False):
        return int(args.run(args))
    # A service: SIGTERM is caught before its heavy imports, and the process ends without
    # finalising the interpreter (rpc.termination says why).
    TERMINATION.install()
    end_process(int(args.run(args)))


if __name__ == "__main__":
    sys.exit(main())
