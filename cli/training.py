"""Trainer-side subcommands: ``trainer`` (the service), ``train``, ``jobs`` and ``users`` (clients)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .service_args import add_client_security, add_service_arguments, client_security, service_settings

DEFAULT_TRAINER = "127.0.0.1:50052"
TERMINAL = ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED")


def _trainer(args: argparse.Namespace) -> int:
    from easyphoto.trainer.app import TrainerConfig, serve_trainer

    serve_trainer(
        TrainerConfig(
            **service_settings(args),
            orchestrator=args.orchestrator,
            orchestrator_security=client_security(args, "orchestrator-"),
            orchestrator_route_by_user=args.orchestrator_route_by_user,
            job_store=args.job_store,
            **({"replica": args.replica} if args.replica else {}),
            lease_seconds=args.lease_seconds,
        )
    )
    return 0


def _set_option(options: Any, assignment: str) -> None:
    """``name=value`` on a TrainingOptions message, typed from the field."""
    from .client import parse_option, set_option

    try:
        set_option(options, *parse_option(options, assignment))
    except ValueError as error:
        raise SystemExit(f"error: --set {assignment}: {error}") from None


def _fail(error: Any) -> int:
    from .client import ServiceError

    print(f"error: {ServiceError.from_rpc(error)}", file=sys.stderr)
    return 2


def _job_line(job: Any) -> str:
    from google.protobuf.json_format import MessageToDict

    summary = MessageToDict(job, preserving_proto_field_name=True)
    for bulky in ("options", "photos"):
        summary.pop(bulky, None)
    return json.dumps(summary)


def _train(args: argparse.Namespace) -> int:
    import grpc

    from easyphoto.v1 import trainer_pb2, trainer_pb2_grpc

    request = trainer_pb2.CreateTrainingJobRequest(user_id=args.user, request_id=args.request_id or "")
    request.photos.extend(Path(p).read_bytes() for p in args.photos)
    for assignment in args.set:
        _set_option(request.options, assignment)
    with client_security(args).channel(args.server) as channel:
        stub = trainer_pb2_grpc.TrainerStub(channel)
        try:
            job = stub.CreateTrainingJob(request, timeout=args.timeout)
            if args.detach:
                print(job.job_id)
                return 0
            final = _follow(stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id)))
        except grpc.RpcError as error:
            return _fail(error)
    for photo in final.photos:
        status = "kept" if photo.kept else f"dropped: {photo.reason}"
        print(f"photo {photo.index} ({args.photos[photo.index]}): {status} score={photo.identity_score:.3f}")
    for warning in final.warnings:
        print(f"warning: {warning}")
    state = trainer_pb2.JobState.Name(final.state)
    if state != "JOB_STATE_SUCCEEDED":
        print(f"job {final.job_id} {state}: {final.error.reason} {final.error.message}", file=sys.stderr)
        return 1
    print(f"job {final.job_id} published {final.user_id} v{final.published_version}")
    return 0


def _follow(events: Iterator[Any]) -> Any:
    """Shows a progress bar over the job's training steps; the job's last state."""
    from tqdm import tqdm

    from easyphoto.v1 import trainer_pb2

    last = None
    with tqdm(total=0, unit="step", dynamic_ncols=True) as bar:
        for job in events:
            last = job
            bar.total = job.total_steps
            bar.set_description(job.stage)
            bar.set_postfix(loss=f"{job.loss:.4f}", eta=f"{job.eta_seconds:.0f}s")
            bar.update(job.step - bar.n)
            if trainer_pb2.JobState.Name(job.state) in TERMINAL:
                break
    return last


def _jobs(args: argparse.Namespace) -> int:
    import grpc

    from easyphoto.v1 import trainer_pb2, trainer_pb2_grpc

    with client_security(args).channel(args.server) as channel:
        stub = trainer_pb2_grpc.TrainerStub(channel)
        try:
            if args.cancel:
                print(_job_line(stub.CancelJob(trainer_pb2.CancelJobRequest(job_id=args.cancel), timeout=30)))
                return 0
            pages = _pages(
                lambda token: stub.ListJobs(
                    trainer_pb2.ListJobsRequest(user_id=args.user, page_token=token), timeout=30
                )
            )
            for page in pages:
                for job in page.jobs:
                    print(_job_line(job))
            return 0
        except grpc.RpcError as error:
            return _fail(error)


def _pages(fetch: Callable[[str], Any]) -> Iterator[Any]:
    """Every page of a List call, ``fetch`` taking the page token ("" for the first)."""
    token = ""
    while True:
        page = fetch(token)
        yield page
        if not (token := page.next_page_token):
            return


def _users(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from easyphoto.v1 import users_pb2, users_pb2_grpc

    with client_security(args).channel(args.server) as channel:
        stub = users_pb2_grpc.UsersStub(channel)
        try:
            if args.delete:
                reply = stub.DeleteUser(users_pb2.DeleteUserRequest(user_id=args.delete), timeout=30)
                print(json.dumps({"deleted_versions": reply.deleted_versions}))
                return 0
            for page in _pages(
                lambda token: stub.ListUsers(users_pb2.ListUsersRequest(page_token=token), timeout=30)
            ):
                for user in page.users:
                    print(json.dumps(MessageToDict(user, preserving_proto_field_name=True)))
            return 0
        except grpc.RpcError as error:
            return _fail(error)


def register(commands: Any) -> None:
    trainer = commands.add_parser("trainer", help="run the trainer (Trainer + Users) gRPC server")
    add_service_arguments(trainer, port=50052, metrics_port=9465, data="jobs and user artifacts")
    trainer.add_argument("--orchestrator", default="", help="host:port to tell when a user is published")
    add_client_security(trainer, "orchestrator-", "the orchestrator (a service key)")
    trainer.add_argument(
        "--orchestrator-route-by-user",
        action="store_true",
        help="--orchestrator names several orchestrators: tell the one each user's requests go to",
    )
    trainer.add_argument(
        "--job-store",
        default="",
        help="a postgresql:// URL shared by replicas (default: <data>/trainer.sqlite3)",
    )
    trainer.add_argument(
        "--replica", default="", help="this trainer's name among replicas (default: hostname)"
    )
    trainer.add_argument(
        "--lease-seconds", type=float, default=30.0, help="a job whose trainer is silent this long moves on"
    )
    trainer.set_defaults(run=_trainer, service=True)

    train = commands.add_parser("train", help="train a user's LoRA from photos (waits with a progress bar)")
    train.add_argument("--user", required=True)
    train.add_argument("photos", nargs="+")
    train.add_argument("--server", default=DEFAULT_TRAINER)
    add_client_security(train)
    train.add_argument("--detach", action="store_true", help="print the job id and return at once")
    train.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE", help="a training option")
    train.add_argument("--request-id", default="", help="idempotency key")
    train.add_argument("--timeout", type=float, default=60.0, help="seconds for the job to be accepted")
    train.set_defaults(run=_train)

    jobs = commands.add_parser("jobs", help="list training jobs as JSON lines, or --cancel one")
    jobs.add_argument("--server", default=DEFAULT_TRAINER)
    add_client_security(jobs)
    jobs.add_argument("--user", default="")
    jobs.add_argument("--cancel", default="", metavar="JOB_ID")
    jobs.set_defaults(run=_jobs)

    users = commands.add_parser("users", help="list users as JSON lines, or --delete one")
    users.add_argument("--server", default=DEFAULT_TRAINER)
    add_client_security(users)
    users.add_argument("--delete", default="", metavar="USER_ID")
    users.set_defaults(run=_users)
