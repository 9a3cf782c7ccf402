"""The trainer's gRPC server: Trainer and Users services, health and reflection (localhost:50052).

The face models load before the port opens; the diffusion models load per job, so every job trains
a fresh copy of the base weights. Health is NOT_SERVING until the runner has started, which first
resumes the jobs a previous process left running.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path

from easyphoto.engines.backends.torch_backend import TorchBackend, default_device
from easyphoto.engines.faces.models import FaceModels
from easyphoto.engines.faces.paths import FaceModelPaths
from easyphoto.engines.models.family import ModelFamily
from easyphoto.engines.models.loading import resolve_family
from easyphoto.rpc.metrics import DEFAULT_HOST, Metrics
from easyphoto.rpc.server import GrpcApp, Security, Service
from easyphoto.rpc.termination import TERMINATION
from easyphoto.rpc.wire import ClientSecurity, route_by_user_options, route_metadata
from easyphoto.users.store import UserStore, default_data_root, split_stored_id
from easyphoto.v1 import (
    generator_pb2,
    generator_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
    users_pb2,
    users_pb2_grpc,
)

from .jobs import QUEUED, RUNNING, JobStore
from .metrics import TrainerMetrics
from .options import training_defaults
from .runner import JobRunner, Notify, RunnerConfig
from .service import TrainerService, UsersService

log = logging.getLogger(__name__)

REFRESH_TIMEOUT_SECONDS = 120.0


@dataclass
class TrainerConfig:
    host: str = "127.0.0.1"
    port: int = 50052
    models: str = "tiny"
    device: str | None = None
    data: Path = field(default_factory=default_data_root)
    # The orchestrator to tell when a user version is published ("" = nobody).
    orchestrator: str = ""
    faces: FaceModelPaths = field(default_factory=FaceModelPaths)
    # HTTP /metrics, /healthz, /readyz: None serves none, 0 any free port (`easyphoto trainer`: 9465).
    metrics_host: str = DEFAULT_HOST
    metrics_port: int | None = None
    # Where jobs are kept: "" is ``<data>/trainer.sqlite3``; a ``postgresql://`` URL is a server
    # several replicas share (with ``data`` on storage they all mount).
    job_store: str = ""
    replica: str = field(default_factory=socket.gethostname)  # this trainer's name among them
    lease_seconds: float = 30.0
    security: Security = field(default_factory=Security)
    # How to reach a secured orchestrator: its service API key (RefreshUser for every tenant's
    # users) and the CA of its certificate.
    orchestrator_security: ClientSecurity = field(default_factory=ClientSecurity)
    # Several orchestrators behind one name: RefreshUser reaches the one the user's Generates are
    # routed to (clients routing by user, rpc/wire.py), where the adapter is then hot.
    orchestrator_route_by_user: bool = False

    @property
    def job_store_location(self) -> str | Path:
        return self.job_store or self.data / "trainer.sqlite3"


def refresh_notifier(
    address: str, security: ClientSecurity | None = None, route_by_user: bool = False
) -> Notify:
    """Calls the orchestrator's Serving.RefreshUser for each published version (routed by the
    user, with ``route_by_user``, as the user's Generates are)."""
    options = route_by_user_options() if route_by_user else []

    def notify(user_id: str, version: int) -> None:
        with (security or ClientSecurity()).channel(address, options) as channel:
            stub = generator_pb2_grpc.ServingStub(channel)
            request = generator_pb2.RefreshUserRequest(user_id=user_id, version=version)
            # Routed by the id as the user's tenant names it, as its clients' Generates are.
            _, shown = split_stored_id(user_id)
            reply = stub.RefreshUser(
                request, timeout=REFRESH_TIMEOUT_SECONDS, metadata=route_metadata([shown])
            )
        log.info("orchestrator %s made %s v%d ready in %.2fs", address, user_id, version, reply.seconds)

    return notify


# Asking whether the worker thread lives costs nothing, so health follows it closely.
WORKER_POLL_SECONDS = 0.5


@dataclass
class TrainerApp:
    app: GrpcApp
    store: JobStore
    runner: JobRunner

    def start(self) -> None:
        self.app.start()
        self.runner.start()
        self.app.set_serving(True)

        def alive() -> bool:  # a dead worker: unready, and only a restart helps
            return self.runner.alive

        self.app.follow_readiness(alive, interval=WORKER_POLL_SECONDS, alive=alive)

    def stop(self, grace: float = 5.0) -> None:
        self.app.stop(grace)
        self.runner.stop()
        self.store.close()


def build_trainer(config: TrainerConfig, face_models: FaceModels | None = None) -> TrainerApp:
    store = JobStore(config.job_store_location)
    users = UserStore(config.data)
    metrics = Metrics(host=config.metrics_host, port=config.metrics_port)
    trainer_metrics = TrainerMetrics(metrics.registry)
    trainer_metrics.follow_store(store.count, QUEUED, RUNNING)
    runner = _runner(config, store, users, face_models, trainer_metrics)
    services = [
        Service(
            TrainerService(store, runner, training_defaults(config.models)[0]),
            trainer_pb2_grpc.add_TrainerServicer_to_server,
            trainer_pb2.DESCRIPTOR.services_by_name["Trainer"].full_name,
        ),
        Service(
            UsersService(store, users, runner),
            users_pb2_grpc.add_UsersServicer_to_server,
            users_pb2.DESCRIPTOR.services_by_name["Users"].full_name,
        ),
    ]
    app = GrpcApp(services, host=config.host, port=config.port, metrics=metrics, security=config.security)
    return TrainerApp(app, store, runner)


def _runner(
    config: TrainerConfig,
    store: JobStore,
    users: UserStore,
    face_models: FaceModels | None,
    metrics: TrainerMetrics,
) -> JobRunner:
    device = config.device or str(default_device())
    models = face_models or config.faces.load()
    backend = TorchBackend(None, device, faces=models)

    def load_family() -> ModelFamily:
        return resolve_family(config.models)

    runner_config = RunnerConfig(
        data=config.data,
        device=device,
        load_family=load_family,
        face_models=models,
        analyzer=models.analyzer(backend),
        notify=refresh_notifier(
            config.orchestrator, config.orchestrator_security, config.orchestrator_route_by_user
        )
        if config.orchestrator
        else None,
        metrics=metrics,
        option_defaults=training_defaults(config.models)[1],
        replica=config.replica,
        lease_seconds=config.lease_seconds,
    )
    return JobRunner(store, users, runner_config)


def serve_trainer(config: TrainerConfig) -> None:
    trainer = build_trainer(config)
    termination = TERMINATION.serving()
    trainer.start()
    log.info(
        "trainer listening on %s:%d (models=%s, data=%s)",
        config.host,
        trainer.app.port,
        config.models,
        config.data,
    )
    if trainer.app.http:
        log.info("metrics, /healthz and /readyz on http://%s:%d", config.metrics_host, trainer.app.http.port)
    signal_name = termination.wait()
    log.info("%s: stopping; a running job pauses and resumes on the next start", signal_name)
    trainer.stop()
