"""The step engine: every diffusion pass of every request is a job, and one loop owns the engines.

Requests are data moving through one step loop (as in vLLM). A pass handed to :meth:`StepEngine.run`
by any thread becomes a :class:`_Job` holding its own state (an :class:`InpaintState`: latents,
scheduler, step index, embeddings, controls, adapter, generator) with its deadline and stop hook.
The loop thread takes the runnable jobs, groups those whose tensors can share a call (the same
phase and shapes; for a step, the same latent size, ControlNets and UNet variant), makes one
batched model call per group (up to the roles' batch limit) with each row's timestep, ControlNet
weight and adapter, and hands each job its rows for its own scheduler step and mask blend. Jobs
join and leave between steps: a new pass waits at most ``batch_wait`` for others to form a batch.
The VAE encode and decode calls of the passes batch the same way, and so do the text encoder's
calls for prompts not yet cached (:meth:`StepEngine.encode_text`, which the orchestrator's
engines call).

Each job checks its stop hook and deadline before each of its steps, in the loop; a job that fails
(stopped, past its deadline, or its call failed when run alone) fails its own request only: a
group's call that fails is retried one job at a time before anyone is failed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from easyphoto.engines.adapters import AdapterRows, concat_rows
from easyphoto.engines.interface import ControlInput, Engines
from easyphoto.rpc.deadline import deadline_at, request_deadline_at
from easyphoto.rpc.errors import DeadlineExceeded, EngineInputError, EngineUnavailable
from easyphoto.rpc.heap import HeapTrimmer

from .inpaint import InpaintPass, InpaintState, StepInputs

log = logging.getLogger(__name__)

# How long a runnable job waits for others to join its first call when the loop is idle.
BATCH_WAIT_SECONDS = 0.005
TEXT, ENCODE, DENOISE, DECODE, DONE = "text", "encode", "denoise", "decode", "done"


@dataclass(eq=False, kw_only=True)
class _Job:
    deadline: float | None  # time.monotonic() seconds; the request's, seen by the loop thread
    phase: str
    result: torch.Tensor | None = None
    error: BaseException | None = None
    finished: threading.Event = field(default_factory=threading.Event)
    joined: float = field(default_factory=time.monotonic)

    def group_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys share a call."""
        raise NotImplementedError

    @property
    def rows(self) -> int:
        """Rows this job adds to its group's call."""
        raise NotImplementedError

    def check(self) -> None:
        """Raises when the job must stop: its request went away, or its deadline passed."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise DeadlineExceeded("the request's deadline passed while its models ran")

    def fail(self, error: BaseException) -> None:
        self.error, self.phase = error, DONE
        self.finished.set()

    def done(self, result: torch.Tensor) -> None:
        self.result, self.phase = result, DONE
        self.finished.set()


@dataclass(eq=False, kw_only=True)
class _PassJob(_Job):
    """A diffusion pass: encoded, denoised a step at a time, decoded."""

    state: InpaintState
    phase: str = ENCODE

    def group_key(self) -> tuple[Any, ...]:
        state = self.state
        if self.phase == ENCODE:
            return (ENCODE, tuple(state.image.shape[1:]))
        if self.phase == DECODE:
            return (DECODE, state.latent_shape)
        kinds = tuple(control.kind for control in state.controls)
        return (DENOISE, state.latent_shape, kinds, state.inpaint.unet_variant)

    @property
    def rows(self) -> int:
        return self.state.rows if self.phase == DENOISE else self.state.image.shape[0]

    def check(self) -> None:
        super().check()
        self.state.inpaint.raise_if_stopped()


@dataclass(eq=False, kw_only=True)
class _TextJob(_Job):
    """Prompts to embed, each row with its adapter (or None)."""

    ids: torch.Tensor
    adapters: AdapterRows | None
    phase: str = TEXT

    def group_key(self) -> tuple[Any, ...]:
        return (TEXT, tuple(self.ids.shape[1:]))

    @property
    def rows(self) -> int:
        return self.ids.shape[0]


class StepEngine:
    """Runs the passes of every thread through one loop that owns ``engines`` (see the module)."""

    def __init__(
        self,
        engines: Engines,
        scheduler_config: dict[str, Any],
        max_batch: int | None = None,
        batch_wait: float = BATCH_WAIT_SECONDS,
        on_call: Callable[[str, int, int], None] | None = None,
    ) -> None:
        self.engines = engines
        self.scheduler_config = scheduler_config
        # Rows per call: the UNet's batch profile (16 for the families here).
        self.max_batch = max_batch or engines.roles["unet"].axes["batch"].max
        self.batch_wait = batch_wait
        self.on_call = on_call  # (phase, jobs, rows) of every model call, for metrics and tests
        self._jobs: list[_Job] = []
        self._wake = threading.Condition()
        self._stopping = False
        # Batches of every size fragment the heap: its free pages go back after each round.
        self._trim_heap = HeapTrimmer()
        self._thread = threading.Thread(target=self._loop, name="step-engine", daemon=True)
        self._thread.start()

    def run(self, inpaint: InpaintPass) -> torch.Tensor:
        """The pass run in the loop with everyone else's; the decoded image in [-1, 1] (NCHW).
        Raises what stopped it (Cancelled, DeadlineExceeded, an engine's error)."""
        state = InpaintState(self.engines, inpaint, self.scheduler_config)
        return self._submit(_PassJob(state=state, deadline=deadline_at()))

    def encode_text(self, ids: torch.Tensor, adapters: AdapterRows | None) -> torch.Tensor:
        """The text encoder's last hidden states of ``ids`` (each row with its adapter), in the loop
        with everyone else's prompts: what :meth:`Engines.encode_prompts` calls for the prompts it
        has not cached."""
        return self._submit(_TextJob(ids=ids, adapters=adapters, deadline=deadline_at()))

    def _submit(self, job: _Job) -> torch.Tensor:
        with self._wake:
            if self._stopping:
                raise EngineUnavailable("the orchestrator is stopping; retry on another replica")
            self._jobs.append(job)
            self._wake.notify()
        while not job.finished.wait(1.0):
            if not self._thread.is_alive():  # never wait on a loop that is gone
                raise EngineUnavailable("the step engine stopped")
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    @property
    def pending(self) -> int:
        """Jobs in the loop now (passes and prompt batches), running or waiting for their call."""
        with self._wake:
            return sum(job.phase != DONE for job in self._jobs)

    @property
    def alive(self) -> bool:
        """Whether the loop runs (readiness: a dead loop serves nothing)."""
        return self._thread.is_alive() and not self._stopping

    def close(self, timeout: float = 60.0) -> bool:
        """Stops the loop (jobs waiting fail, the call in flight ends first); whether it stopped
        within ``timeout`` (else the engines are still in use and must not be closed)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=timeout)
        return not self._thread.is_alive()

    # ---- the loop ----

    def _loop(self) -> None:
        try:
            while (jobs := self._runnable()) is not None:
                for group in self._groups(jobs):
                    self._run_group(group)
                self._trim_heap()
                with self._wake:
                    self._jobs = [job for job in self._jobs if job.phase != DONE]
        except BaseException as error:  # a bug: fail every pass rather than leave them waiting
            log.critical("the step engine's loop failed", exc_info=True)
            with self._wake:
                self._stopping = True
                for job in self._jobs:
                    job.fail(EngineUnavailable(f"the step engine failed: {error}"))
                self._jobs.clear()

    def _runnable(self) -> list[_Job] | None:
        """Every job waiting for its next call (None once stopping); when the loop was idle, it
        waits ``batch_wait`` first, so that passes arriving together share their first call."""
        with self._wake:
            if not self._jobs:
                while not self._jobs and not self._stopping:
                    self._wake.wait()
                until = time.monotonic() + self.batch_wait
                while not self._stopping and (left := until - time.monotonic()) > 0:
                    self._wake.wait(left)
            if self._stopping:
                for job in self._jobs:
                    job.fail(EngineUnavailable("the orchestrator is stopping; retry on another replica"))
                self._jobs.clear()
                return None
            return list(self._jobs)

    def _groups(self, jobs: list[_Job]) -> list[list[_Job]]:
        """Jobs that share a call, oldest first, each group within the batch limit."""
        live = []
        for job in jobs:
            try:
                job.check()
                live.append(job)
            except BaseException as error:  # stopped or past its deadline: out of the batch
                job.fail(error)
        by_key: dict[tuple[Any, ...], list[list[_Job]]] = {}
        for job in sorted(live, key=lambda job: job.joined):
            chunks = by_key.setdefault(job.group_key(), [[]])
            if sum(j.rows for j in chunks[-1]) + job.rows > self.max_batch:
                chunks.append([])
            chunks[-1].append(job)
        return [chunk for chunks in by_key.values() for chunk in chunks if chunk]

    def _run_group(self, group: list[_Job]) -> None:
        """The group's call, each job then taking its rows. When a batched call fails for what may
        be one job's inputs, each job's call alone, so that only the job that cannot run fails (an
        engine that is unavailable or a deadline fails the group at once: alone it would fail
        again, holding up everyone)."""
        try:
            shares = _split(self._call(group), group)
        except (EngineUnavailable, DeadlineExceeded) as error:
            for job in group:
                job.fail(error)
            return
        except Exception as error:
            if len(group) == 1:
                group[0].fail(error)
                return
            log.warning(
                "a batched %s call of %d passes failed (%s); one by one", group[0].phase, len(group), error
            )
            for job in group:
                self._run_group([job])
            return
        if self.on_call is not None:
            self.on_call(group[0].phase, len(group), sum(job.rows for job in group))
        for job, rows in zip(group, shares, strict=True):
            try:
                self._take(job, rows)
            except Exception as error:
                job.fail(error)

    def _call(self, group: list[_Job]) -> torch.Tensor:
        """One model call for the whole group (the text encoder's hidden states, the VAE encoder's
        moments, the step's noise prediction, or the decoded images), every job's rows in order."""
        phase = group[0].phase
        deadlines = [job.deadline for job in group]
        # The call serves every job: it may run until the latest deadline among them.
        limit = None if None in deadlines else max(d for d in deadlines if d is not None)
        with request_deadline_at(limit):
            if phase == TEXT:
                texts = [job for job in group if isinstance(job, _TextJob)]
                outputs = self._text(texts)
            elif phase == ENCODE:
                outputs = self.engines.vae_moments(_cat([_state(job).image for job in group]))
            elif phase == DENOISE:
                outputs = self.engines.predict_noise(*_batched_step([_state(job) for job in group]))
            else:
                outputs = self.engines.vae_decode(_cat([_state(job).latents for job in group]))
        return outputs

    def _text(self, group: list[_TextJob]) -> torch.Tensor:
        adapters = concat_rows([(job.adapters, job.rows) for job in group])
        return self.engines.embed_in_backend(_cat([job.ids for job in group]), adapters)

    def _take(self, job: _Job, rows: torch.Tensor) -> None:
        """The job's share of its group's call: its next phase."""
        if not isinstance(job, _PassJob):
            job.done(rows)
        elif job.phase == ENCODE:
            job.state.begin(rows)
            job.phase = DENOISE
        elif job.phase == DENOISE:
            job.state.advance(rows)
            if job.state.done:
                job.phase = DECODE
        else:
            job.done(rows)


def _state(job: _Job) -> InpaintState:
    assert isinstance(job, _PassJob)
    return job.state


def _split(tensor: torch.Tensor, group: Sequence[_Job]) -> list[torch.Tensor]:
    rows = [job.rows for job in group]
    if tensor.shape[0] != sum(rows):
        raise EngineInputError("step-engine", "outputs", f"{tensor.shape[0]} rows for a call of {sum(rows)}")
    return list(torch.split(tensor, rows))


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One job's tensor as it is (so shared memory sees the same tensor step after step and writes
    it once), several jobs' concatenated."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _batched_step(group: list[InpaintState]) -> StepInputs:
    """The group's next step as one call: each pass's rows, in order, with their own timesteps,
    ControlNet weights and adapters (one pass's inputs as they are)."""
    inputs = [state.step_inputs() for state in group]
    if len(inputs) == 1:
        return inputs[0]
    controls = [
        ControlInput(
            control.kind,
            torch.cat([i.controls[index].image for i in inputs]),
            torch.cat([i.controls[index].scale_tensor(i.sample) for i in inputs]),
        )
        for index, control in enumerate(inputs[0].controls)
    ]
    return StepInputs(
        torch.cat([i.sample for i in inputs]),
        torch.cat([i.timesteps for i in inputs]),
        torch.cat([i.embeds for i in inputs]),
        controls,
        concat_rows([(i.adapters, len(i.sample)) for i in inputs]),
        inputs[0].variant,
    )
