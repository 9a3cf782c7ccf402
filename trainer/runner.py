"""Runs training jobs one at a time: prepare → train (checkpoint + validate every interval) → merge
→ identity reward (when asked) → publish → tell the serving side. Everything a job needs to
resume lives in its folder:

``<data>/jobs/<id>/photos/NNN.bin`` the uploads · ``prepared/`` crops, faces, reference and
embeddings · ``checkpoints/step-N.{safetensors,pt}`` · ``validation/`` images and
``validation.json`` · ``reward/`` the identity-reward stage's iterations · each written whole
(temporary name, then rename). A trainer killed mid-job finds the job RUNNING at start-up and
resumes it from its last checkpoint.
"""

from __future__ import annotations

import gc
import importlib.metadata
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from easyphoto.engines.faces.detect import FaceAnalyzer
from easyphoto.engines.faces.models import FaceModels
from easyphoto.engines.lora import LoraWeights, load_lora, save_lora
from easyphoto.engines.models.family import ModelFamily
from easyphoto.imaging.codec import decode_image, encode_png
from easyphoto.imaging.geometry import Face
from easyphoto.rpc.errors import Cancelled, EasyPhotoError, InvalidArgument
from easyphoto.rpc.heap import trim_heap
from easyphoto.users.durable import flush_to_disk, write_atomically
from easyphoto.users.store import LORA_FILE, UserStore
from easyphoto.v1 import trainer_pb2

from .identity_reward import REWARD_DIR, IdentityRewardTuner, RewardReport
from .jobs import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobRecord, JobStore, error_record, new_job_id
from .lora_training import LoraTrainer, TrainingImages, checkpoint_path, checkpoint_step, checkpoints
from .merge import merge_checkpoints
from .metrics import TrainerMetrics
from .options import TrainingOptions
from .photos import PhotoReport, PreparedPhotos, prepare_photos
from .validation import ValidationImage, Validator

log = logging.getLogger(__name__)

Notify = Callable[[str, int], None]
MAX_ERROR_CHARS = 500
# A job that was running when the trainer died this many times is failed rather than resumed again.
MAX_ATTEMPTS = 3
# A job folder, training mark or staging folder with no job this old was left by a killed process
# (younger, another replica may be writing it right now).
LEFTOVER_SECONDS = 120.0
CANCEL_POLL_SECONDS = 0.5
# What a finished job keeps: validation images and scores. Photos, crops and checkpoints go.
DISCARDED_WHEN_FINISHED = ("photos", "prepared", "checkpoints", REWARD_DIR)


class CrashLoop(EasyPhotoError):
    reason = "JOB_CRASH_LOOP"


@dataclass
class RunnerConfig:
    data: Path
    device: str
    load_family: Callable[[], ModelFamily]
    face_models: FaceModels
    analyzer: FaceAnalyzer
    notify: Notify | None = None  # tells the serving side a user version is ready
    option_defaults: str = "reference (SD 1.5)"  # which defaults unset options took (the report says)
    metrics: TrainerMetrics = field(default_factory=lambda: TrainerMetrics(CollectorRegistry()))
    # Who this trainer is among the replicas sharing the job store; the same name after a restart
    # (a pod's, a host's) lets it take back its own jobs at once instead of after their leases.
    replica: str = field(default_factory=socket.gethostname)
    lease_seconds: float = 30.0  # a job whose owner stops renewing this long goes to another
    poll_seconds: float = 1.0  # how often an idle worker looks for jobs other replicas queued


class JobRunner:
    def __init__(self, store: JobStore, users: UserStore, config: RunnerConfig) -> None:
        self.store = store
        self.users = users
        self.config = config
        self._wake = threading.Event()  # a job was queued here, or the trainer is stopping
        self._cancelled: set[str] = set()
        self._lost: set[str] = set()  # jobs whose lease another replica took over
        self._running: str | None = None
        self._cancel_checked = 0.0
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._heartbeat: threading.Thread | None = None
        self._stopping = False

    def job_dir(self, job_id: str) -> Path:
        return self.config.data / "jobs" / job_id

    # ---- lifecycle ----

    def start(self) -> None:
        """Cleans what a killed process left behind, takes back this replica's own jobs, then
        claims jobs from the shared store until stopped."""
        for leftover in self.users.clean_staging(older_than=LEFTOVER_SECONDS):
            log.warning("removed a half-published version: %s", leftover)
        self._remove_orphan_folders()
        self._remove_stale_training_marks()
        released = self.store.release(self.config.replica)
        if released:
            log.warning(
                "%d job(s) of %s were running when it stopped; resuming", released, self.config.replica
            )
        self._fail_crash_loops()
        self._worker = threading.Thread(target=self._work, name="trainer-jobs", daemon=True)
        self._heartbeat = threading.Thread(target=self._renew_leases, name="trainer-leases", daemon=True)
        self._worker.start()
        self._heartbeat.start()

    def _fail_crash_loops(self) -> None:
        """Jobs whose owners died while running them too often: failed, never claimed again."""
        now = time.time()
        for job in self.store.list(states=(RUNNING,), limit=10_000):
            if job.lease_until < now and self._crash_looping(job, job.attempts):
                self._fail_crash_loop(job)

    def _crash_looping(self, job: JobRecord, deaths: int) -> bool:
        """Whether ``job`` killed its trainers too often to run again. A job that published its
        version before the last death is not: resuming it only records that version."""
        if deaths < MAX_ATTEMPTS:
            return False
        return self.users.version_of_job(job.user_id, job.job_id) is None

    def _fail_crash_loop(self, job: JobRecord) -> None:
        log.error("job %s stopped a trainer %d times; failing it", job.job_id, job.attempts)
        error = CrashLoop(f"the trainer stopped {job.attempts} times while running this job")
        self.store.update(job.job_id, state=FAILED, error=error_record(error), eta_seconds=0.0, owner="")
        self.ended(job)

    def _remove_stale_training_marks(self) -> None:
        """Marks of jobs that ended (or were never recorded) while no trainer could remove them. A
        mark of an unknown job is only stale once old: another replica may be submitting it."""
        known = self.store.job_ids()
        for user_id in self.users.marked_users():
            for job_id in self.users.training_jobs(user_id):
                ended = job_id in known and self.store.get(job_id).finished
                unknown = (
                    job_id not in known and self.users.training_mark_age(user_id, job_id) > LEFTOVER_SECONDS
                )
                if ended or unknown:
                    log.warning("job %s of %s has ended; removing its training mark", job_id, user_id)
                    self.users.unmark_training(user_id, job_id)

    def _remove_orphan_folders(self) -> None:
        """Job folders whose job row was never written (killed inside ``submit``) or was deleted,
        once old enough that no replica can still be writing them."""
        folder = self.config.data / "jobs"
        if not folder.is_dir():
            return
        known = self.store.job_ids()
        for path in folder.iterdir():
            if path.name not in known and time.time() - path.stat().st_mtime > LEFTOVER_SECONDS:
                log.warning("removing job folder %s: no such job", path)
                shutil.rmtree(path, ignore_errors=True)

    def stop(self, timeout: float = 30.0) -> bool:
        """Asks the worker to stop after its current job (which is cancelled at its next step and
        resumes on the next start); True when it stopped within ``timeout``."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        if self._worker is None:
            return True
        self._worker.join(timeout=timeout)
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=max(0.0, timeout))
        return not self._worker.is_alive()

    @property
    def alive(self) -> bool:
        """Whether the worker runs: once it is gone, jobs would be accepted and never run."""
        return self._worker is not None and self._worker.is_alive()

    def submit(
        self, user_id: str, photos: list[bytes], options: TrainingOptions, seed: int, request_id: str
    ) -> JobRecord:
        """Writes the photos, then the job row (a crash in between leaves only an orphan folder)."""
        job_id = new_job_id()
        folder = self.job_dir(job_id) / "photos"
        folder.mkdir(parents=True)
        try:
            for index, data in enumerate(photos):
                write_atomically(folder / f"{index:03d}.bin", data)
            # Marked before the row exists: serving may say "training" a moment early, never late.
            self.users.mark_training(user_id, job_id)
            job = self.store.create(user_id, options, seed, len(photos), request_id, job_id=job_id)
        except BaseException:
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
            self.users.unmark_training(user_id, job_id)
            raise
        if job.job_id != job_id:  # a retried request_id: the earlier job answers
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
            self.users.unmark_training(user_id, job_id)
            return job
        self._wake.set()
        log.info("job %s queued for user %s with %d photos", job.job_id, user_id, len(photos))
        return job

    def cancel(self, job_id: str) -> JobRecord:
        cancelled = self.store.transition(job_id, (QUEUED,), state=CANCELLED, stage="cancelled")
        if cancelled is not None:
            self.ended(cancelled)
            return cancelled
        with self._lock:  # RUNNING: its worker (on any replica) sees this at its next step
            self._cancelled.add(job_id)
        self.store.transition(job_id, (RUNNING,), cancel_requested=1)
        job = self.store.get(job_id)
        if job.finished:
            with self._lock:
                self._cancelled.discard(job_id)
        return job

    def delete_user_jobs(self, user_id: str) -> int:
        """Removes the user's finished jobs and their folders; returns how many."""
        removed = self.store.delete_user_jobs(user_id)
        for job_id in removed:
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        return len(removed)

    def ended(self, job: JobRecord) -> None:
        """What a job that will not run again leaves behind: its large files and its training mark."""
        self.discard_files(job.job_id)
        self.users.unmark_training(job.user_id, job.job_id)

    def discard_files(self, job_id: str) -> None:
        for name in DISCARDED_WHEN_FINISHED:
            shutil.rmtree(self.job_dir(job_id) / name, ignore_errors=True)

    def _work(self) -> None:
        try:
            while not self._stopping:
                try:
                    claimed = self.store.claim(self.config.replica, self.config.lease_seconds)
                    if claimed is None:
                        self._wake.wait(self.config.poll_seconds)
                        self._wake.clear()
                        continue
                    self.run_claimed(*claimed)
                except Exception:  # the worker must outlive any one job's failure to record its end
                    log.exception("the trainer worker could not run a job")
                    self._wake.wait(self.config.poll_seconds)
        finally:
            if not self._stopping:
                log.critical("the trainer worker ended unexpectedly; no job will run until a restart")

    def _renew_leases(self) -> None:
        """Keeps this replica's hold on the job it runs; a hold lost (this process stalled past its
        lease and another replica took the job) stops the job here at its next step."""
        while not self._stopping:
            with self._lock:
                job_id = self._running
            if job_id is not None and not self.store.renew(
                job_id, self.config.replica, self.config.lease_seconds
            ):
                log.error("job %s: this trainer's lease was taken over; stopping it here", job_id)
                with self._lock:
                    self._lost.add(job_id)
            self._wake_or_sleep(self.config.lease_seconds / 3)

    def _wake_or_sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < deadline:
            time.sleep(min(0.2, seconds))

    # ---- one job ----

    def run(self, job: JobRecord) -> JobRecord:
        """Runs ``job`` here and now if it is still QUEUED (taking it as the worker would); the
        final record. A job no longer QUEUED (cancelled meanwhile) is returned as it is."""
        held = self.store.transition(
            job.job_id, (QUEUED,), state=RUNNING, attempts=job.attempts + 1, owner=self.config.replica,
            lease_until=time.time() + self.config.lease_seconds,
        )  # fmt: skip
        if held is None:
            return self.store.get(job.job_id)
        return self._execute(held)

    def run_claimed(self, job: JobRecord, claimed_from: int) -> JobRecord:
        """Runs a job this replica claimed; one claimed from RUNNING was its dead owner's, and
        resumes (or fails, when it keeps killing trainers)."""
        if claimed_from == RUNNING:
            if self._crash_looping(job, job.attempts - 1):
                self._fail_crash_loop(job)
                return self.store.get(job.job_id)
            log.warning(
                "job %s was running when its trainer stopped; resuming at step %d", job.job_id, job.step
            )
            resumed = [*job.warnings, f"resumed after a trainer restart (was at step {job.step})"]
            job = (
                self.store.transition(job.job_id, (RUNNING,), held_by=self.config.replica, warnings=resumed)
                or job
            )
        return self._execute(job)

    def _execute(self, job: JobRecord) -> JobRecord:
        started = time.time()
        with self._lock:
            self._running = job.job_id
        try:
            final = self._run(job)
        finally:
            with self._lock:
                self._running = None
                self._lost.discard(job.job_id)
            # The job's family (gigabytes at full size) is in reference cycles (modules and their
            # hooks): freed now, not at the interpreter's next full collection, and its pages
            # returned to the system.
            gc.collect()
            trim_heap()
            metrics = self.config.metrics
            metrics.job_seconds.observe(time.time() - started)
        record = self.store.get(job.job_id)
        metrics.jobs_finished.labels(trainer_pb2.JobState.Name(record.state)).inc()
        for photo in record.photos:
            if not photo["kept"]:
                metrics.photos_dropped.labels(photo["reason"]).inc()
        return final

    def _run(self, job: JobRecord) -> JobRecord:
        started = time.time()
        log.info("job %s started for user %s (attempt %d)", job.job_id, job.user_id, job.attempts)
        try:
            version = _Job(self, job).run()
        except Cancelled:
            if job.job_id in self._lost:  # another replica runs it now: write nothing more
                return self.store.get(job.job_id)
            if self._stopping:  # the trainer is shutting down: the job resumes on a replica's claim
                log.info("job %s paused at step %d for shutdown", job.job_id, self.store.get(job.job_id).step)
                return self._finish(
                    job, state=QUEUED, stage="queued", eta_seconds=0.0, owner="", lease_until=0.0
                )
            log.info("job %s cancelled at step %d", job.job_id, self.store.get(job.job_id).step)
            self.ended(job)
            return self._finish(job, state=CANCELLED, stage="cancelled", eta_seconds=0.0)
        except EasyPhotoError as error:
            log.warning("job %s failed: %s %s", job.job_id, error.reason, error.message)
            self.ended(job)
            return self._finish(job, state=FAILED, error=error_record(error), eta_seconds=0.0)
        except Exception as exc:
            log.exception("job %s failed", job.job_id)
            self.ended(job)
            internal = EasyPhotoError(f"{type(exc).__name__}: {str(exc)[:MAX_ERROR_CHARS]}")
            return self._finish(job, state=FAILED, error=error_record(internal), eta_seconds=0.0)
        finally:
            with self._lock:
                self._cancelled.discard(job.job_id)
        log.info("job %s published %s v%d in %.1fs", job.job_id, job.user_id, version, time.time() - started)
        return self.store.get(job.job_id)

    def _finish(self, job: JobRecord, **values: Any) -> JobRecord:
        """The job's last write, made only while this replica still holds it."""
        return self.hold(job.job_id, **values) if job.job_id not in self._lost else self.store.get(job.job_id)

    def hold(self, job_id: str, **values: Any) -> JobRecord:
        """``values`` written to a job this replica runs; Cancelled when another replica has it."""
        record = self.store.transition(job_id, (), held_by=self.config.replica, **values)
        if record is None:
            with self._lock:
                self._lost.add(job_id)
            raise Cancelled(f"job {job_id} is held by another trainer now")
        return record

    def raise_if_stopped(self, job_id: str) -> None:
        """Cancelled when the trainer is stopping, the job was cancelled (through any replica: the
        store is asked at most twice a second) or another replica took it over."""
        with self._lock:
            if self._stopping:
                raise Cancelled("the trainer is stopping")
            if job_id in self._lost:
                raise Cancelled(f"job {job_id} is held by another trainer now")
            if job_id in self._cancelled:
                raise Cancelled(f"job {job_id} was cancelled")
            ask = time.monotonic() - self._cancel_checked > CANCEL_POLL_SECONDS
            if ask:
                self._cancel_checked = time.monotonic()
        if ask and self.store.get(job_id).cancel_requested:
            with self._lock:
                self._cancelled.add(job_id)
            raise Cancelled(f"job {job_id} was cancelled")


class _Job:
    """The stages of one job, resuming from whatever its folder already holds."""

    def __init__(self, runner: JobRunner, job: JobRecord) -> None:
        self.runner = runner
        self.config = runner.config
        self.job = job
        self.options = job.training_options
        self.folder = runner.job_dir(job.job_id)
        self.timings: dict[str, float] = {}

    def update(self, **values: Any) -> None:
        self.job = self.runner.hold(self.job.job_id, **values)

    def raise_if_stopped(self) -> None:
        self.runner.raise_if_stopped(self.job.job_id)

    def run(self) -> int:
        published = self.runner.users.version_of_job(self.job.user_id, self.job.job_id)
        if published is not None:  # the trainer stopped between publishing and recording it
            log.info("job %s already published %s v%d", self.job.job_id, self.job.user_id, published)
            self.runner.users.name_current(self.job.user_id, published)
            self.finish(published)
            return published
        prepared = self.prepare()
        if not prepared.crops:
            raise prepared.no_usable_photos()
        total = self.options.train_steps(len(prepared.crops))
        self.update(stage="train", total_steps=total)
        family = self.config.load_family()
        trainer = LoraTrainer(
            family,
            TrainingImages(prepared.crops, self.options.resolution, self.options.random_flip),
            self.options,
            self.job.seed,
            self.config.device,
        )
        validator = Validator(
            family,
            self.config.analyzer,
            prepared.crops,
            prepared.crop_faces,
            prepared.embeddings,
            self.options,
            self.job.seed,
            self.config.device,
        )
        if validator.warnings:
            self.update(warnings=[*self.job.warnings, *validator.warnings])
        results = self.train(trainer, validator, total)
        return self.publish(prepared, results, family, validator, trainer)

    # ---- stages ----

    def prepare(self) -> PreparedPhotos:
        folder = self.folder / "prepared"
        if (folder / "prepared.json").is_file():
            return _load_prepared(folder)
        started = time.perf_counter()
        self.update(stage="validate")
        photo_dir = self.folder / "photos"
        photos = [photo_dir.joinpath(f"{i:03d}.bin").read_bytes() for i in range(self.job.photo_count)]
        prepared = prepare_photos(
            photos,
            self.options,
            self.config.analyzer,
            self.config.face_models,
            lambda s: self.update(stage=s),
        )
        self.update(
            photos=[vars(r) for r in prepared.reports], warnings=[*self.job.warnings, *prepared.warnings]
        )
        if prepared.crops:
            _save_prepared(prepared, folder)
        self.timings["prepare"] = time.perf_counter() - started
        return prepared

    def train(self, trainer: LoraTrainer, validator: Validator, total: int) -> list[ValidationImage]:
        results = self._load_results()
        start = self._resume(trainer)
        if start:
            results = [r for r in results if r.step <= start]
            if not any(r.step == start for r in results):
                results += self.validate(trainer, validator, start, results)
            log.info("job %s resumes at step %d of %d", self.job.job_id, start, total)
        began = time.perf_counter()
        for step in range(start + 1, total + 1):
            self.raise_if_stopped()
            stepped = time.perf_counter()
            loss = trainer.train_step(step)
            self.config.metrics.steps.inc()
            self.config.metrics.step_seconds.observe(time.perf_counter() - stepped)
            per_step = (time.perf_counter() - began) / (step - start)
            self.update(stage="train", step=step, loss=loss, eta_seconds=per_step * (total - step))
            if step % self.options.validation_interval == 0 or step == total:
                trainer.save_checkpoint(self.folder / "checkpoints", step)
                results += self.validate(trainer, validator, step, results)
        self.timings["train"] = time.perf_counter() - began
        return results

    def _resume(self, trainer: LoraTrainer) -> int:
        """Loads the newest checkpoint that reads back whole and returns its step (0: none). One
        that does not (a disk fault, a crash the filesystem did not order) is removed."""
        for path in reversed(checkpoints(self.folder / "checkpoints")):
            try:
                trainer.load_checkpoint(path)
                return checkpoint_step(path)
            except Exception as exc:
                log.warning(
                    "job %s: checkpoint %s is unreadable (%s); using the one before",
                    self.job.job_id,
                    path.name,
                    exc,
                )
                self.update(
                    warnings=[*self.job.warnings, f"checkpoint {path.name} was unreadable and was dropped"]
                )
                path.unlink(missing_ok=True)
                path.with_suffix(".pt").unlink(missing_ok=True)
        return 0

    def validate(
        self, trainer: LoraTrainer, validator: Validator, step: int, earlier: list[ValidationImage]
    ) -> list[ValidationImage]:
        self.update(stage="validate_lora")
        started = time.perf_counter()
        trainer.eval()
        new = validator.run(step, self.folder, raise_if_stopped=self.raise_if_stopped)
        write_atomically(
            self.folder / "validation.json", json.dumps([r.to_json() for r in [*earlier, *new]]).encode()
        )
        self.timings["validate"] = self.timings.get("validate", 0.0) + time.perf_counter() - started
        return new

    def _load_results(self) -> list[ValidationImage]:
        path = self.folder / "validation.json"
        return [ValidationImage(**r) for r in json.loads(path.read_text())] if path.is_file() else []

    def publish(
        self,
        prepared: PreparedPhotos,
        results: list[ValidationImage],
        family: ModelFamily,
        validator: Validator,
        trainer: LoraTrainer,
    ) -> int:
        self.update(stage="merge")
        if not results:
            raise InvalidArgument("no validation image was produced", field="options.validation_templates")
        folder = self.folder / "checkpoints"
        merged, chosen = merge_checkpoints(
            results,
            self.options.merge_top_k,
            lambda step: load_lora(checkpoint_path(folder, step)),
            name=f"{self.job.user_id}:{self.job.job_id}",
        )
        best = chosen[0]
        reward = None
        if self.options.identity_reward:
            merged, reward = self.tune(trainer, validator, merged)
        self.update(stage="publish")
        report = self.report(results, chosen, family, reward)

        def write(staging: Path) -> None:
            save_lora(merged, staging / LORA_FILE)
            shutil.copyfile(self.folder / best.path, staging / "face_id.png")
            (staging / "reference.png").write_bytes(encode_png(prepared.reference))
            np.save(staging / "embeddings.npy", prepared.embeddings)
            (staging / "report.json").write_text(json.dumps(report, indent=2))

        faces = {"face_id": validator.template_face(best.template).to_json()}
        if prepared.reference_face is not None:
            faces["reference"] = prepared.reference_face.to_json()
        meta = {"job_id": self.job.job_id, "base_model": family.source, "family": family.name, "faces": faces}
        version = self.runner.users.publish(self.job.user_id, write, meta)
        self.finish(version)
        return version

    def tune(
        self, trainer: LoraTrainer, validator: Validator, merged: LoraWeights
    ) -> tuple[LoraWeights, RewardReport]:
        """The identity-reward stage on the merged LoRA (resumed from ``reward/`` after a restart);
        the LoRA to publish and what the stage did, in the job's progress as it goes."""
        total = self.options.reward_iterations
        self.update(stage="identity_reward", step=0, total_steps=total, eta_seconds=0.0)
        started = time.perf_counter()

        def progress(report: RewardReport) -> None:
            done = len(report.iterations)
            left = report.seconds / done * (total - done) if done else 0.0
            self.update(
                stage="identity_reward", step=done, identity_reward=report.progress(), eta_seconds=left
            )

        tuner = IdentityRewardTuner(
            trainer, validator, self.options, self.job.seed, self.folder,
            on_iteration=progress, raise_if_stopped=self.raise_if_stopped,
        )  # fmt: skip
        lora, report = tuner.run(merged)
        warnings = self.job.warnings
        if report.kept == "pre_rl":
            warnings = [
                *warnings,
                f"identity reward did not rise ({report.before:.4f} -> {report.after:.4f}):"
                " the pre-RL LoRA is published",
            ]
        self.update(identity_reward=report.progress(), warnings=warnings)
        self.timings["identity_reward"] = time.perf_counter() - started
        return lora, report

    def finish(self, version: int) -> None:
        self.update(published_version=version)
        self.notify(version)
        # Before SUCCEEDED, so that a watcher seeing the job done finds its large files gone (the
        # report keeps the checkpoints' scores) and serving no longer says "training"; a crash in
        # between resumes into this same finish (the version is found by its job id).
        self.runner.ended(self.job)
        self.update(state=SUCCEEDED, stage="done", eta_seconds=0.0)

    def notify(self, version: int) -> None:
        if self.config.notify is None:
            return
        try:
            self.config.notify(self.job.user_id, version)
        except Exception as exc:  # the version is published; the serving side loads it on first use
            log.warning("could not tell the serving side about %s v%d: %s", self.job.user_id, version, exc)
            self.update(warnings=[*self.job.warnings, f"serving side not told of v{version}: {exc}"])

    def report(
        self,
        results: list[ValidationImage],
        chosen: list[ValidationImage],
        family: ModelFamily,
        reward: RewardReport | None = None,
    ) -> dict[str, Any]:
        return {
            "job_id": self.job.job_id,
            "user_id": self.job.user_id,
            "seed": self.job.seed,
            "options": self.options.to_json(),
            "option_defaults": self.config.option_defaults,
            "photos": self.job.photos,
            "warnings": self.job.warnings,
            "validation": [r.to_json() for r in results],
            "merged_from": [r.to_json() for r in chosen],
            "identity_reward": reward.to_json() if reward is not None else None,
            "timings": self.timings,
            "base_model": {"name": family.name, "source": family.source, "random_weights": family.is_random},
            "versions": {
                p: _version(p) for p in ("easyphoto-serve", "torch", "diffusers", "peft", "transformers")
            },
        }


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _save_prepared(prepared: PreparedPhotos, folder: Path) -> None:
    staging = folder.with_name(".prepared.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for index, crop in enumerate(prepared.crops):
        (staging / f"crop-{index:03d}.png").write_bytes(encode_png(crop))
    (staging / "reference.png").write_bytes(encode_png(prepared.reference))
    np.save(staging / "embeddings.npy", prepared.embeddings)
    manifest = {
        "faces": [face.to_json() for face in prepared.crop_faces],
        "reference_face": prepared.reference_face.to_json() if prepared.reference_face else None,
        "reports": [vars(r) for r in prepared.reports],
        "warnings": prepared.warnings,
    }
    (staging / "prepared.json").write_text(json.dumps(manifest))
    flush_to_disk(*staging.iterdir(), staging)
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(staging, folder)
    flush_to_disk(folder.parent)


def _load_prepared(folder: Path) -> PreparedPhotos:
    manifest = json.loads((folder / "prepared.json").read_text())
    count = len(manifest["faces"])
    return PreparedPhotos(
        crops=[decode_image((folder / f"crop-{i:03d}.png").read_bytes(), min_side=1) for i in range(count)],
        crop_faces=[Face.from_json(face) for face in manifest["faces"]],
        reference=decode_image((folder / "reference.png").read_bytes(), min_side=1),
        reference_face=Face.from_json(manifest["reference_face"]) if manifest["reference_face"] else None,
        embeddings=np.load(folder / "embeddings.npy"),
        reports=[PhotoReport(**r) for r in manifest["reports"]],
        warnings=manifest["warnings"],
    )
