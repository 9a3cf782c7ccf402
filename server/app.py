"""The orchestrator's gRPC server: Generator and Serving services, health and reflection.

Models load in the background after the port opens, so health answers at once: NOT_SERVING
while loading, SERVING when the engines are ready (the readiness probe of a deployment).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from easyphoto.diffusion.steps import StepEngine
from easyphoto.engines.adapters import DEFAULT_CACHE_BYTES
from easyphoto.engines.backends.torch_backend import TorchBackend
from easyphoto.engines.faces.models import FaceModels
from easyphoto.engines.faces.paths import FaceModelPaths
from easyphoto.engines.interface import Backend, Engines
from easyphoto.engines.models.loading import resolve_family
from easyphoto.engines.models.sdxl import SdxlFacts, SdxlLoadError, resolve_sdxl_family
from easyphoto.engines.models.variants import LCM, LCM_LORA_WEIGHT, add_lcm_lora
from easyphoto.engines.roles.catalogue import RoleCatalogue
from easyphoto.engines.roles.manifest import MANIFEST_FILE, EngineManifest, FamilyFacts
from easyphoto.rpc.deadline import request_deadline
from easyphoto.rpc.errors import EasyPhotoError, EngineUnavailable, ModelMissing, UserNotReady
from easyphoto.rpc.metrics import DEFAULT_HOST, Metrics
from easyphoto.rpc.server import GrpcApp, Security, Service, abort
from easyphoto.rpc.tenants import current_tenant
from easyphoto.rpc.termination import TERMINATION
from easyphoto.users.namespace import Namespace
from easyphoto.users.store import UserStore, default_data_root
from easyphoto.v1 import generator_pb2, generator_pb2_grpc

from .metrics import GeneratorMetrics
from .pipeline import Orchestrator
from .service import MAX_WAITING, GeneratorService
from .templates import TemplatePainter

log = logging.getLogger(__name__)
# How long a stopping orchestrator lets requests in flight finish before cancelling them.
DRAIN_SECONDS = 30.0
# While loading waits for Triton: how often it asks, and how often it says it still waits.
TRITON_POLL_SECONDS = 1.0
TRITON_WAIT_LOG_SECONDS = 30.0


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    models: str = "tiny"
    backend: str = "torch"  # or "triton": the roles served by tritonserver at triton_url
    triton_url: str = "127.0.0.1:8001"
    # What `easyphoto export` wrote (manifest.json, tokenizer/): the roles --backend triton serves.
    export_dir: Path = Path("build/export")
    # Large per-request tensors through shared memory (Triton on this host only): "none",
    # "system" or "cuda" (on triton_cuda_device; engines.backends.shared_memory.CudaRegions).
    triton_shared_memory: str = "none"
    triton_cuda_device: int = 0
    # How long loading waits for Triton to be ready; None: as long as it takes.
    triton_wait_seconds: float | None = None
    device: str | None = None
    data: Path = field(default_factory=default_data_root)
    faces: FaceModelPaths = field(default_factory=FaceModelPaths)
    # HTTP /metrics, /healthz, /readyz: None serves none (metrics are still counted), 0 any free port.
    # `easyphoto serve` listens on 9464 (the usual exporter port); a library default binds nothing fixed.
    metrics_host: str = DEFAULT_HOST
    metrics_port: int | None = None
    # Requests run at once (their steps batched; None: sized for the device) and waiting beyond.
    max_running: int | None = None
    max_waiting: int = MAX_WAITING
    # Users' adapters kept hot on the serving device (torch backend), least recently used out first.
    adapter_cache_bytes: int = DEFAULT_CACHE_BYTES
    # Where Triton's models read users' adapters (the orchestrator writes each one there on first
    # use); None: <data>/adapters. The repository must be written with the same folder.
    adapter_dir: Path | None = None
    # An LCM-LoRA fused into a copy of the UNet for requests with lcm_accelerate (torch backend;
    # a Triton deployment gets its LCM roles from `easyphoto export --lcm-lora`).
    lcm_lora: Path | None = None
    lcm_lora_weight: float = LCM_LORA_WEIGHT
    # The SDXL model that paints templates from text (template_from_text): a diffusers folder,
    # "tiny-sdxl" or "sdxl-random"; None: such requests get FAILED_PRECONDITION.
    sdxl: str | None = None
    security: Security = field(default_factory=Security)


class EngineHolder:
    """Loads the engines once, off the request path; requests before that get UNAVAILABLE."""

    def __init__(self, config: ServerConfig, metrics: GeneratorMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self._orchestrator: Orchestrator | None = None
        self.model_family = ""
        self._error: Exception | None = None
        self._waiting_for = ""  # what the load waits for now, if anything
        self._closing = threading.Event()
        self.loaded = threading.Event()

    def load(self) -> Orchestrator:
        face_models = self.config.faces.load()
        if self.config.backend == "torch":
            engines, facts = self._torch_engines(face_models)
            templates = self._templates(engines)
        elif self.config.backend == "triton":
            engines, facts, templates = self._triton_engines(face_models)
        else:
            raise ValueError(f"backend {self.config.backend!r} is unknown; use 'torch' or 'triton'")
        analyzer = face_models.analyzer(engines.backend)
        users = UserStore(self.config.data)
        on_call = self.metrics.engine_call if self.metrics is not None else None
        steps = StepEngine(engines, facts.scheduler_config, on_call=on_call)
        self._orchestrator = Orchestrator(
            engines, facts.scheduler_config, face_models, analyzer, users, steps, templates
        )
        self.model_family = facts.label
        backend = engines.backend
        log.info(
            "engines ready: %s on %s (%s); data in %s",
            facts.name,
            backend.device,
            backend.dtype,
            self.config.data,
        )
        return self._orchestrator

    def _templates(self, engines: Engines) -> TemplatePainter | None:
        """The SDXL model of ``--sdxl`` in process, on the torch backend's device; None without."""
        if self.config.sdxl is None:
            return None
        try:
            sdxl = resolve_sdxl_family(self.config.sdxl)
        except SdxlLoadError as error:
            raise ModelMissing(f"--sdxl: {error}", field="sdxl") from error
        painter_backend = TorchBackend(None, device=engines.backend.device, sdxl=sdxl)
        log.info("templates from text: SDXL %s on %s", sdxl.source, painter_backend.device)
        return TemplatePainter(painter_backend, SdxlFacts.of(sdxl))

    def _torch_engines(self, face_models: FaceModels) -> tuple[Engines, FamilyFacts]:
        """Every role in process, from the family's weights."""
        family = resolve_family(self.config.models)
        if self.config.lcm_lora is not None:
            add_lcm_lora(family, self.config.lcm_lora, self.config.lcm_lora_weight)
        backend = TorchBackend(
            family,
            device=self.config.device,
            faces=face_models,
            adapter_cache_bytes=self.config.adapter_cache_bytes,
        )
        return Engines(backend, family.tokenizer, float(family.vae.config.scaling_factor)), FamilyFacts.of(
            family
        )

    def _triton_engines(self, face_models: FaceModels) -> tuple[Engines, FamilyFacts, TemplatePainter | None]:
        """Triton serving every exported role, described by the export's manifest: no model weights
        load here. Loading waits for Triton (:meth:`_wait_for`). The fused stages and the face roles
        are used while the repository has them (else the face models run in process, and each step
        calls its ControlNets and the UNet); the SDXL roles too (else no template is painted from
        text)."""
        from easyphoto.engines.backends.triton_backend import TritonBackend

        manifest = EngineManifest.read(self.config.export_dir)
        if self.config.lcm_lora is not None:
            exported = LCM in {role.variant for role in manifest.catalogue.roles.values()}
            raise ModelMissing(
                "--lcm-lora: a Triton deployment's LCM UNet is fused at export (easyphoto export"
                f" --lcm-lora FILE); the export in {self.config.export_dir} has"
                f" {'one: serve without --lcm-lora' if exported else 'none'}",
                field="lcm-lora",
            )
        if self.config.sdxl is not None:
            raise ModelMissing(
                "--sdxl: a Triton deployment's SDXL roles come from its export (easyphoto export --sdxl"
                f" FOLDER); the export in {self.config.export_dir} has"
                f" {'them: serve without --sdxl' if manifest.sdxl else 'none'}",
                field="sdxl",
            )
        log.info(
            "backend triton: roles, tokenizer and scheduler of %s from %s; no model weights are loaded here",
            manifest.family.name,
            self.config.export_dir / MANIFEST_FILE,
        )
        written = manifest.catalogue
        catalogue = RoleCatalogue(written.family, written.stages, face_models.roles, written.templates)
        backend = TritonBackend(
            self.config.triton_url,
            written.family,
            fallback=TorchBackend(None, device="cpu", faces=face_models),
            shared_memory=self.config.triton_shared_memory,
            cuda_device=self.config.triton_cuda_device,
            lora_targets=manifest.lora_targets,
            adapter_dir=self.config.adapter_dir or UserStore(self.config.data).adapter_dir,
            optional=catalogue.optional,
        )
        try:
            self._wait_for(backend)
        except BaseException:
            backend.close()
            raise
        local_faces = sorted(set(face_models.roles) - backend.remote_roles)
        if local_faces:
            log.info("face roles %s are not in Triton's repository now: they run in process", local_faces)
        if written.templates and not set(written.templates) <= backend.remote_roles:
            log.warning("the SDXL roles are not all in Triton's repository now: no templates from text")
        templates = None
        if manifest.sdxl is not None and written.templates:
            templates = TemplatePainter(backend, manifest.sdxl, written.templates)
        facts = manifest.family
        return Engines(backend, manifest.tokenizer(), facts.vae_scaling_factor), facts, templates

    def _wait_for(self, backend: Backend) -> None:
        """Until Triton is ready (``triton_wait_seconds``; None: as long as it takes, the process
        staying unready meanwhile, as when Triton starts after the orchestrator in a cluster)."""
        started = time.monotonic()
        said = -math.inf
        while not backend.ready():
            waited = time.monotonic() - started
            limit = self.config.triton_wait_seconds
            if limit is not None and waited >= limit:
                raise EngineUnavailable(
                    f"Triton at {self.config.triton_url} is not ready after {waited:.0f}s"
                    " (is `make triton` running?)"
                )
            if waited - said >= TRITON_WAIT_LOG_SECONDS:
                said = waited
                log.warning("waiting for Triton at %s (%.0fs so far)", self.config.triton_url, waited)
            self._waiting_for = f"waiting for Triton at {self.config.triton_url}"
            if self._closing.wait(TRITON_POLL_SECONDS):
                raise EngineUnavailable("stopped while waiting for Triton")
        self._waiting_for = ""

    def load_in_background(self, on_ready: Callable[[], None]) -> None:
        def run() -> None:
            try:
                self.load()
                on_ready()
            except Exception as exc:  # reported by every request and by health staying NOT_SERVING
                if self._closing.is_set():
                    log.info("loading stopped: %s", exc)
                else:
                    log.exception("loading engines failed")
                self._error = exc
            finally:
                self.loaded.set()

        threading.Thread(target=run, name="load-engines", daemon=True).start()

    def backend_ready(self) -> bool:
        """Whether the orchestrator can serve now: its step engine runs and its backend is ready
        (Triton's server and models)."""
        orchestrator = self._orchestrator
        return orchestrator is not None and orchestrator.steps.alive and orchestrator.engines.backend.ready()

    def close(self) -> None:
        """Stops the step engine, then releases the backend's connections (and Triton shared-memory
        regions); a load still waiting for Triton stops waiting."""
        self._closing.set()
        if self._orchestrator is None:
            return
        if self._orchestrator.close():
            self._orchestrator.engines.backend.close()
        else:  # a call still in flight uses the backend: leave it to the process's exit
            log.warning("the step engine did not stop in time; leaving the backend open")

    def get(self) -> Orchestrator:
        if self._orchestrator is None:
            why = self._waiting_for or "models are still loading"
            if self._error is not None:
                why = f"loading failed: {self._error}"
            raise EngineUnavailable(f"engines not ready ({why})")
        return self._orchestrator


class ServingService(generator_pb2_grpc.ServingServicer):
    """Internal: the trainer calls RefreshUser after publishing, so the user's first Generate finds
    the faces and embedding loaded and the user's adapter ready (in the torch backend's hot cache,
    or written where Triton's models read it, and loaded by them)."""

    def __init__(self, orchestrator: Callable[[], Orchestrator]) -> None:
        self._orchestrator = orchestrator

    def RefreshUser(
        self, request: generator_pb2.RefreshUserRequest, context: grpc.ServicerContext
    ) -> generator_pb2.RefreshUserResponse:
        started = time.perf_counter()
        namespace = Namespace.of(current_tenant())
        try:
            user_id = namespace.user(request.user_id, "user_id")
            with request_deadline(context.time_remaining()):
                reference = self._orchestrator().refresh_user(user_id, "user_id")
            if reference.artifacts.version < request.version:
                raise UserNotReady(
                    f"user {user_id!r} v{request.version} is not published here"
                    f" (this server sees v{reference.artifacts.version}; is the data root shared?)",
                    field="version",
                )
        except EasyPhotoError as error:
            abort(context, namespace.outward(error))
        seconds = time.perf_counter() - started
        log.info("user %s v%d ready in %.3fs", request.user_id, reference.artifacts.version, seconds)
        return generator_pb2.RefreshUserResponse(seconds=seconds)


def build_app(config: ServerConfig) -> tuple[GrpcApp, EngineHolder]:
    metrics = Metrics(host=config.metrics_host, port=config.metrics_port)
    generator_metrics = GeneratorMetrics(metrics.registry)
    holder = EngineHolder(config, generator_metrics)
    descriptor = generator_pb2.DESCRIPTOR
    service = GeneratorService(
        holder.get,
        lambda: holder.model_family,
        generator_metrics,
        max_waiting=config.max_waiting,
        max_running=config.max_running,
    )
    app = GrpcApp(
        [
            Service(
                service,
                generator_pb2_grpc.add_GeneratorServicer_to_server,
                descriptor.services_by_name["Generator"].full_name,
            ),
            Service(
                ServingService(holder.get),
                generator_pb2_grpc.add_ServingServicer_to_server,
                descriptor.services_by_name["Serving"].full_name,
            ),
        ],
        host=config.host,
        port=config.port,
        metrics=metrics,
        security=config.security,
    )
    return app, holder


def serve(config: ServerConfig) -> None:
    app, holder = build_app(config)
    termination = TERMINATION.serving()
    app.start()
    log.info(
        "orchestrator listening on %s:%d (models=%s, backend=%s)",
        config.host,
        app.port,
        config.models,
        config.backend,
    )
    if app.http:
        log.info("metrics, /healthz and /readyz on http://%s:%d", config.metrics_host, app.http.port)

    def on_ready() -> None:
        app.set_serving(True)
        app.follow_readiness(holder.backend_ready)

    holder.load_in_background(on_ready)
    signal_name = termination.wait()
    log.info("%s: draining requests, then stopping", signal_name)
    app.stop(grace=DRAIN_SECONDS)
    if not holder.loaded.is_set():
        log.info("stopped while the models were loading; the load is abandoned")
    holder.close()
