"""The Trainer and Users gRPC services over the job store, the runner and the user artifacts."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc

from easyphoto.imaging.codec import MAX_ENCODED_BYTES
from easyphoto.rpc.errors import EasyPhotoError, ImageTooLarge, InvalidArgument, UnknownUser
from easyphoto.rpc.server import abort
from easyphoto.rpc.tenants import current_tenant
from easyphoto.users.namespace import Namespace
from easyphoto.users.store import UserStore
from easyphoto.v1 import trainer_pb2, trainer_pb2_grpc, users_pb2, users_pb2_grpc

from .jobs import ACTIVE, FAILED, JobRecord, JobStore, UserBusy, timestamp
from .options import MAX_PHOTOS, TrainingOptions, resolve_training_options
from .runner import JobRunner

log = logging.getLogger(__name__)

DEFAULT_PAGE = 50
MAX_PAGE = 500
MAX_OFFSET = 2**62  # beyond what a database's OFFSET takes
WATCH_POLL_SECONDS = 1.0

Message = TypeVar("Message")


def _page(size: int, token: str) -> tuple[int, int]:
    """(limit, offset) from a page size and an opaque token (the offset, as text)."""
    if size > MAX_PAGE:
        raise InvalidArgument(f"page_size is {size}; at most {MAX_PAGE}", field="page_size")
    if not token:
        return size or DEFAULT_PAGE, 0
    if not (token.isascii() and token.isdigit()) or int(token) > MAX_OFFSET:
        raise InvalidArgument("page_token is not one this server issued", field="page_token")
    return size or DEFAULT_PAGE, int(token)


def _guard(context: grpc.ServicerContext, call: Callable[[Namespace], Message]) -> Message:
    """``call`` in the caller's namespace; a typed error aborts the call, shown in it."""
    namespace = Namespace.of(current_tenant())
    try:
        return call(namespace)
    except EasyPhotoError as error:
        return abort(context, namespace.outward(error))


def _job(namespace: Namespace, job: JobRecord) -> trainer_pb2.Job:
    message = job.to_proto()
    message.user_id = namespace.shown(job.user_id)
    return message


class TrainerService(trainer_pb2_grpc.TrainerServicer):
    def __init__(self, store: JobStore, runner: JobRunner, defaults: TrainingOptions | None = None) -> None:
        self.store = store
        self.runner = runner
        self.defaults = defaults or TrainingOptions()  # of options a request leaves unset

    def CreateTrainingJob(
        self, request: trainer_pb2.CreateTrainingJobRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.Job:
        return _guard(context, lambda namespace: _job(namespace, self._create(request, namespace)))

    def _create(self, request: trainer_pb2.CreateTrainingJobRequest, namespace: Namespace) -> JobRecord:
        request_id = namespace.request_id(request.request_id)
        if request_id and (existing := self.store.by_request_id(request_id)) is not None:
            if not namespace.owns(existing.user_id):
                raise InvalidArgument(
                    "request_id is taken by another caller; use a new one", field="request_id"
                )
            return existing
        user_id = namespace.user(request.user_id, "user_id")
        if not 1 <= len(request.photos) <= MAX_PHOTOS:
            raise InvalidArgument(f"{len(request.photos)} photos; send 1 to {MAX_PHOTOS}", field="photos")
        for index, photo in enumerate(request.photos):
            if len(photo) > MAX_ENCODED_BYTES:
                raise ImageTooLarge(
                    f"{len(photo)} bytes; the limit is {MAX_ENCODED_BYTES}", field=f"photos[{index}]"
                )
        options = resolve_training_options(request.options, self.defaults)
        seed = options.seed if options.seed is not None else secrets.randbits(62)
        return self.runner.submit(user_id, list(request.photos), options, seed, request_id)

    def GetJob(self, request: trainer_pb2.GetJobRequest, context: grpc.ServicerContext) -> trainer_pb2.Job:
        return _guard(context, lambda namespace: _job(namespace, self._visible(namespace, request.job_id)))

    def _visible(self, namespace: Namespace, job_id: str) -> JobRecord:
        job = self.store.get(job_id)
        namespace.job_of(job.user_id, job_id)
        return job

    def WatchJob(
        self, request: trainer_pb2.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[trainer_pb2.Job]:
        namespace = Namespace.of(current_tenant())
        job = _guard(context, lambda namespace: self._visible(namespace, request.job_id))
        yield _job(namespace, job)
        while not job.finished and context.is_active():
            changed = self.store.wait_for_change(job.job_id, job.revision, WATCH_POLL_SECONDS)
            if changed.revision != job.revision:
                job = changed
                yield _job(namespace, job)

    def CancelJob(
        self, request: trainer_pb2.CancelJobRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.Job:
        def cancel(namespace: Namespace) -> trainer_pb2.Job:
            self._visible(namespace, request.job_id)
            return _job(namespace, self.runner.cancel(request.job_id))

        return _guard(context, cancel)

    def ListJobs(
        self, request: trainer_pb2.ListJobsRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.ListJobsResponse:
        def run(namespace: Namespace) -> trainer_pb2.ListJobsResponse:
            limit, offset = _page(request.page_size, request.page_token)
            if request.state not in trainer_pb2.JobState.values():
                raise InvalidArgument(f"state {request.state} is no JobState", field="state")
            states = (request.state,) if request.state else ()
            user_id = namespace.user(request.user_id, "user_id") if request.user_id else ""
            jobs = self.store.list(user_id, states, limit + 1, offset, tenant=namespace.listing())
            token = str(offset + limit) if len(jobs) > limit else ""
            return trainer_pb2.ListJobsResponse(
                jobs=[_job(namespace, j) for j in jobs[:limit]], next_page_token=token
            )

        return _guard(context, run)


class UsersService(users_pb2_grpc.UsersServicer):
    def __init__(self, store: JobStore, users: UserStore, runner: JobRunner) -> None:
        self.store = store
        self.users = users
        self.runner = runner

    def GetUser(self, request: users_pb2.GetUserRequest, context: grpc.ServicerContext) -> users_pb2.User:
        return _guard(
            context,
            lambda namespace: self._user(
                namespace, namespace.user(request.user_id, "user_id"), request.include_artifacts
            ),
        )

    def ListUsers(
        self, request: users_pb2.ListUsersRequest, context: grpc.ServicerContext
    ) -> users_pb2.ListUsersResponse:
        def run(namespace: Namespace) -> users_pb2.ListUsersResponse:
            limit, offset = _page(request.page_size, request.page_token)
            with_jobs = {job.user_id for job in self.store.list(limit=1_000_000, tenant=namespace.listing())}
            ids = sorted(u for u in set(self.users.user_ids()) | with_jobs if namespace.owns(u))
            page = ids[offset : offset + limit]
            token = str(offset + limit) if offset + limit < len(ids) else ""
            return users_pb2.ListUsersResponse(
                users=[self._user(namespace, u, False) for u in page], next_page_token=token
            )

        return _guard(context, run)

    def DeleteUser(
        self, request: users_pb2.DeleteUserRequest, context: grpc.ServicerContext
    ) -> users_pb2.DeleteUserResponse:
        def run(namespace: Namespace) -> users_pb2.DeleteUserResponse:
            user_id = namespace.user(request.user_id, "user_id")
            if active := self.store.list(user_id=user_id, states=ACTIVE, limit=1):
                raise UserBusy(f"user {user_id!r} is training (job {active[0].job_id})", field="user_id")
            has_versions = self.users.user_dir(user_id).is_dir()
            jobs = self.runner.delete_user_jobs(user_id)
            if not has_versions and not jobs:
                raise UnknownUser(f"no user {user_id!r}", field="user_id")
            deleted = self.users.delete(user_id) if has_versions else 0
            log.info("deleted user %s (%d versions, %d jobs)", user_id, deleted, jobs)
            return users_pb2.DeleteUserResponse(deleted_versions=deleted)

        return _guard(context, run)

    def _user(self, namespace: Namespace, user_id: str, include_artifacts: bool) -> users_pb2.User:
        """The user of stored id ``user_id``, shown in the caller's namespace."""
        jobs = self.store.list(user_id=user_id, limit=1_000_000)
        version = self.users.current_version(user_id)
        if version is None and not jobs:
            raise UnknownUser(f"no user {user_id!r}", field="user_id")
        active = [job for job in jobs if job.state in ACTIVE]
        user = users_pb2.User(user_id=namespace.shown(user_id), version=version or 0)
        if active:
            user.active_job_id = active[0].job_id
        if version is not None:
            user.state = users_pb2.USER_STATE_READY
            artifacts = self.users.load(user_id, "user_id")
            user.lora_sha256 = artifacts.lora_sha256
            user.base_model = str(artifacts.meta.get("base_model", ""))
            user.updated_at.CopyFrom(timestamp(artifacts.directory.stat().st_mtime))
            if include_artifacts:
                user.face_id_png = (artifacts.directory / "face_id.png").read_bytes()
                user.reference_png = (artifacts.directory / "reference.png").read_bytes()
        elif active:
            user.state = users_pb2.USER_STATE_TRAINING
        elif jobs and jobs[-1].state == FAILED:
            user.state = users_pb2.USER_STATE_FAILED
        if jobs:
            user.created_at.CopyFrom(timestamp(jobs[0].created_at))
        return user
