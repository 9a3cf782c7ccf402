"""The Generator gRPC service: request validation, the orchestrator per template, progress
streaming, deadlines and client cancellation."""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import grpc
import numpy as np
import torch
from prometheus_client import CollectorRegistry

from easyphoto.imaging.codec import decode_image, encode_png
from easyphoto.rpc.deadline import request_deadline
from easyphoto.rpc.errors import Cancelled, DeadlineExceeded, EasyPhotoError, InvalidArgument, Overloaded
from easyphoto.rpc.server import abort
from easyphoto.rpc.tenants import current_tenant
from easyphoto.users.namespace import Namespace
from easyphoto.v1 import common_pb2, generator_pb2, generator_pb2_grpc

from .metrics import GeneratorMetrics
from .options import resolve_options, resolve_template_options
from .pipeline import Generation, Orchestrator, Progress, planned_steps

log = logging.getLogger(__name__)

MAX_TEMPLATES = 8
# Requests waiting for a slot beyond the running ones; more are refused with RESOURCE_EXHAUSTED.
MAX_WAITING = 8
# How often a waiting request looks at its deadline and whether its client is still there.
WAIT_POLL_SECONDS = 0.05


def default_max_running() -> int:
    """Requests run at once: their passes share the step engine's batched calls. A GPU has room
    for more (its batch of 2 leaves it mostly idle) than this project's 2-core CPUs."""
    return 32 if torch.cuda.is_available() else 8


class _Admission:
    """At most ``max_running`` requests run at once (their steps batched by the step engine).
    Beyond them requests wait in line, at most ``max_waiting``, each leaving the line when its
    deadline passes or its client cancels, so a waiting request never holds a worker thread past
    its deadline; a full line is refused."""

    def __init__(self, max_running: int, max_waiting: int) -> None:
        self.max_running = max_running
        self.max_waiting = max_waiting
        self._running = threading.Semaphore(max_running)
        self._count = threading.Lock()
        self.waiting = 0
        self.running = 0

    @contextmanager
    def slot(self, raise_if_stopped: Callable[[], None]) -> Iterator[None]:
        with self._count:
            if self.waiting >= self.max_waiting:
                raise Overloaded(f"{self.waiting} requests are already waiting; retry later")
            self.waiting += 1
        try:
            while not self._running.acquire(timeout=WAIT_POLL_SECONDS):
                raise_if_stopped()
        finally:
            with self._count:
                self.waiting -= 1
        with self._count:
            self.running += 1
        try:
            yield
        finally:
            with self._count:
                self.running -= 1
            self._running.release()


class GeneratorService(generator_pb2_grpc.GeneratorServicer):
    def __init__(
        self,
        orchestrator: Callable[[], Orchestrator],
        model_family: Callable[[], str],
        metrics: GeneratorMetrics | None = None,
        max_waiting: int = MAX_WAITING,
        max_running: int | None = None,
    ) -> None:
        self._orchestrator = orchestrator
        self._model_family = model_family
        self._metrics = metrics or GeneratorMetrics(CollectorRegistry())
        self._admission = _Admission(max_running or default_max_running(), max_waiting)
        self._metrics.follow_admission(lambda: self._admission.running, lambda: self._admission.waiting)

    def Generate(
        self, request: generator_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> generator_pb2.GenerateResponse:
        namespace = Namespace.of(current_tenant())
        try:
            return self._run(request, context, namespace, send=None)
        except EasyPhotoError as error:
            abort(context, namespace.outward(error))

    def GenerateStream(
        self, request: generator_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[generator_pb2.GenerateEvent]:
        events: queue.Queue[generator_pb2.GenerateEvent | BaseException | None] = queue.Queue()
        namespace = Namespace.of(current_tenant())  # of this thread's call, not the worker's

        def progress(message: generator_pb2.Progress) -> None:
            events.put(generator_pb2.GenerateEvent(progress=message))

        def work() -> None:
            try:
                result = self._run(request, context, namespace, progress)
                events.put(generator_pb2.GenerateEvent(result=result))
            except BaseException as exc:  # handed to the streaming thread, which reports it
                events.put(exc)
            finally:
                events.put(None)

        threading.Thread(target=work, name="generate-stream", daemon=True).start()
        while (event := events.get()) is not None:
            if isinstance(event, EasyPhotoError):
                abort(context, namespace.outward(event))
            if isinstance(event, BaseException):
                raise event
            yield event

    # ---- the job ----

    def _run(
        self,
        request: generator_pb2.GenerateRequest,
        context: grpc.ServicerContext,
        namespace: Namespace,
        send: Callable[[generator_pb2.Progress], None] | None,
    ) -> generator_pb2.GenerateResponse:
        started = time.perf_counter()
        from_text = resolve_template_options(request)
        if not request.templates and from_text is None:
            raise InvalidArgument(
                "at least one template (or template_from_text) is required", field="templates"
            )
        if len(request.templates) > MAX_TEMPLATES:
            raise InvalidArgument(f"at most {MAX_TEMPLATES} templates per request", field="templates")
        # The store's ids of the caller's users ("" skips a face), checked before any work.
        user_ids = [namespace.user(u, f"user_ids[{i}]") if u else "" for i, u in enumerate(request.user_ids)]
        options = resolve_options(request)
        templates: list[np.ndarray | None] = [
            decode_image(data, field=f"templates[{i}]") for i, data in enumerate(request.templates)
        ] or [None]  # None: painted from text, one per image
        base_seed = options.seed if options.seed is not None else secrets.randbits(63)
        images = len(templates) * options.images_per_template
        per_image = planned_steps(options, sum(map(bool, user_ids))) + (from_text.steps if from_text else 0)
        steps = _RequestSteps(images * per_image, self._metrics, send)
        raise_if_stopped = _stopper(context)
        response = generator_pb2.GenerateResponse(model_family=self._model_family())
        timings: dict[str, float] = {}
        skipped: dict[str, str] = {}
        with self._admission.slot(raise_if_stopped), request_deadline(context.time_remaining()):
            orchestrator = self._orchestrator()
            for index, given in enumerate(templates):
                for k in range(options.images_per_template):
                    seed = (base_seed + k) % 2**64  # a uint64 on the wire: the last seed wraps
                    template = given
                    if template is None:
                        assert from_text is not None
                        painted_at = time.perf_counter()
                        template = orchestrator.paint_template(
                            from_text, seed, steps.for_template(index), raise_if_stopped
                        )
                        timings["template_from_text"] = (
                            timings.get("template_from_text", 0.0) + time.perf_counter() - painted_at
                        )
                    generation = orchestrator.generate(
                        template,
                        user_ids,
                        options,
                        seed,
                        steps.for_template(index),
                        raise_if_stopped,
                        field_name=f"templates[{index}]" if given is not None else "template_from_text",
                    )
                    painted = sum(1 for face in generation.faces if face.user_id)
                    self._metrics.image(generation.timings, painted, steps.take_image_steps())
                    message = _image_message(index, generation, namespace)
                    if given is None:
                        message.template_png = encode_png(template)
                    response.images.append(message)
                    for stage, seconds in generation.timings.items():
                        timings[stage] = timings.get(stage, 0.0) + seconds
                    skipped.update(generation.skipped)
        timings["request"] = time.perf_counter() - started
        response.timings.extend(common_pb2.StageTiming(stage=k, seconds=v) for k, v in timings.items())
        response.timings.extend(
            common_pb2.StageTiming(stage=k, skipped=True, reason=why)
            for k, why in skipped.items()
            if k not in timings
        )
        log.info("generated %d image(s) for %s in %.2fs", len(response.images), user_ids, timings["request"])
        return response


def _stopper(context: grpc.ServicerContext) -> Callable[[], None]:
    """Raises Cancelled once the client went away, DeadlineExceeded once its deadline passed."""

    def raise_if_stopped() -> None:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("the request's deadline passed during generation")
        if not context.is_active():
            log.info("client cancelled; stopping")
            raise Cancelled("the client cancelled the request")

    return raise_if_stopped


@dataclass
class _RequestSteps:
    """Counts the request's denoising steps as the orchestrator reports them: step metrics, and
    progress messages placed in the whole request (template, step of ``total``) for ``send``."""

    total: int
    metrics: GeneratorMetrics
    send: Callable[[generator_pb2.Progress], None] | None
    done: int = 0
    image_steps: Counter[str] = field(default_factory=Counter)

    def for_template(self, template_index: int) -> Callable[[Progress], None]:
        return partial(self._step, template_index)

    def take_image_steps(self) -> dict[str, int]:
        """Steps by stage since the last call (one image's)."""
        steps, self.image_steps = dict(self.image_steps), Counter()
        return steps

    def _step(self, template_index: int, p: Progress) -> None:
        self.done += 1
        self.image_steps[p.stage] += 1
        self.metrics.step(p.stage)
        if self.send is not None:
            self.send(
                generator_pb2.Progress(
                    stage=p.stage,
                    template_index=template_index,
                    face_index=p.face_index,
                    step=p.step,
                    total_steps=p.total_steps,
                    elapsed_seconds=p.elapsed,
                    request_step=self.done,
                    request_total_steps=max(self.total, self.done),
                )
            )


def _image_message(
    template_index: int, generation: Generation, namespace: Namespace
) -> generator_pb2.GeneratedImage:
    message = generator_pb2.GeneratedImage(
        template_index=template_index, seed=generation.seed, png=encode_png(generation.image)
    )
    for outcome in generation.faces:
        x0, y0, x1, y1 = outcome.face.box
        face = common_pb2.Face(
            box=common_pb2.Box(x0=x0, y0=y0, x1=x1, y1=y1),
            score=outcome.face.score,
            landmarks=[common_pb2.Point(x=float(x), y=float(y)) for x, y in outcome.face.landmarks],
        )
        result = generator_pb2.FaceResult(user_id=namespace.shown(outcome.user_id), face=face)
        if outcome.identity_score is not None:
            result.identity_score = outcome.identity_score
        if outcome.user_version is not None:
            result.user_version = outcome.user_version
        message.faces.append(result)
    message.intermediates.extend(
        common_pb2.NamedImage(name=name, png=encode_png(image)) for name, image in generation.intermediates
    )
    return message
