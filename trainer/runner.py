"""Runs training jobs one at a time: prepare → train (checkpoint + validate every interval) → merge
→ publish → tell the serving side. Everything a job needs to resume lives in its folder:

``<data>/jobs/<id>/photos/NNN.bin`` the uploads · ``prepared/`` crops, faces, reference and
embeddings · ``checkpoints/step-N.{safetensors,pt}`` · ``validation/`` images and
``validation.json`` · each written whole (temporary name, then rename). A trainer killed mid-job
finds the job RUNNING at start-up and resumes it from its last checkpoint.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import queue
import shutil
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
from easyphoto.engines.lora import load_lora, save_lora
from easyphoto.engines.models.family import ModelFamily
from easyphoto.imaging.codec import decode_image, encode_png
from easyphoto.imaging.geometry import Face
from easyphoto.rpc.errors import Cancelled, EasyPhotoError, InvalidArgument
from easyphoto.users.durable import flush_to_disk, write_atomically
from easyphoto.users.store import LORA_FILE, UserStore
from easyphoto.v1 import trainer_pb2

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
# What a finished job keeps: validation images and scores. Photos, crops and checkpoints go.
DISCARDED_WHEN_FINISHED = ("photos", "prepared", "checkpoints")


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


class JobRunner:
    def __init__(self, store: JobStore, users: UserStore, config: RunnerConfig) -> None:
        self.store = store
        self.users = users
        self.config = config
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._stopping = False

    def job_dir(self, job_id: str) -> Path:
        return self.config.data / "jobs" / job_id

    # ---- lifecycle ----

    def start(self) -> None:
        """Resumes what a previous process left running, then serves the queue."""
        for leftover in self.users.clean_staging():
            log.warning("removed a half-published version: %s", leftover)
        self._remove_orphan_folders()
        self._remove_stale_training_marks()
        for job in self.store.list(states=(RUNNING,), limit=10_000):
            self._requeue_after_crash(job)
        for job in self.store.list(states=(QUEUED,), limit=10_000):
            self._queue.put(job.job_id)
        self._worker = threading.Thread(target=self._work, name="trainer-jobs", daemon=True)
        self._worker.start()

    def _requeue_after_crash(self, job: JobRecord) -> None:
        if job.attempts >= MAX_ATTEMPTS:
            log.error("job %s stopped the trainer %d times; failing it", job.job_id, job.attempts)
            error = CrashLoop(f"the trainer stopped {job.attempts} times while running this job")
            self.store.update(job.job_id, state=FAILED, error=error_record(error), eta_seconds=0.0)
            self.ended(job)
            return
        log.warning("job %s was running when the trainer stopped; resuming at step %d", job.job_id, job.step)
        self.store.update(
            job.job_id,
            state=QUEUED,
            warnings=[*job.warnings, f"resumed after a trainer restart (was at step {job.step})"],
        )

    def _remove_stale_training_marks(self) -> None:
        """Marks of jobs that ended (or were never recorded) while no trainer could remove them."""
        known = self.store.job_ids()
        for user_id in self.users.marked_users():
            for job_id in self.users.training_jobs(user_id):
                if job_id not in known or self.store.get(job_id).finished:
                    log.warning("job %s of %s has ended; removing its training mark", job_id, user_id)
                    self.users.unmark_training(user_id, job_id)

    def _remove_orphan_folders(self) -> None:
        """Job folders whose job row was never written (killed inside ``submit``) or was deleted."""
        folder = self.config.data / "jobs"
        if not folder.is_dir():
            return
        known = self.store.job_ids()
        for path in folder.iterdir():
            if path.name not in known:
                log.warning("removing job folder %s: no such job", path)
                shutil.rmtree(path, ignore_errors=True)

    def stop(self, timeout: float = 30.0) -> bool:
        """Asks the worker to stop after its current job (which is cancelled at its next step and
        resumes on the next start); True when it stopped within ``timeout``."""
        with self._lock:
            self._stopping = True
        self._queue.put(None)
        if self._worker is None:
            return True
        self._worker.join(timeout=timeout)
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
        self._queue.put(job.job_id)
        log.info("job %s queued for user %s with %d photos", job.job_id, user_id, len(photos))
        return job

    def cancel(self, job_id: str) -> JobRecord:
        cancelled = self.store.transition(job_id, (QUEUED,), state=CANCELLED, stage="cancelled")
        if cancelled is not None:
            self.ended(cancelled)
            return cancelled
        with self._lock:  # RUNNING: the worker sees this at its next step
            self._cancelled.add(job_id)
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
            while (job_id := self._queue.get()) is not None:
                try:
                    job = self.store.get(job_id)
                    if job.state == QUEUED:
                        self.run(job)
                except Exception:  # the worker must outlive any one job's failure to record its end
                    log.exception("the trainer worker could not run job %s", job_id)
        finally:
            if not self._stopping:
                log.critical("the trainer worker ended unexpectedly; no job will run until a restart")

    # ---- one job ----

    def run(self, job: JobRecord) -> JobRecord:
        """Runs (or resumes) ``job`` to its end; the final record. A job no longer QUEUED (cancelled
        meanwhile) is returned as it is."""
        started = time.time()
        running = self.store.transition(job.job_id, (QUEUED,), state=RUNNING, attempts=job.attempts + 1)
        if running is None:
            return self.store.get(job.job_id)
        try:
            final = self._run(running)
        finally:
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
        try:
            version = _Job(self, job).run()
        except Cancelled:
            if self._stopping:  # the trainer is shutting down: the job resumes on the next start
                log.info("job %s paused at step %d for shutdown", job.job_id, self.store.get(job.job_id).step)
                return self.store.update(job.job_id, state=QUEUED, stage="queued", eta_seconds=0.0)
            log.info("job %s cancelled at step %d", job.job_id, self.store.get(job.job_id).step)
            self.ended(job)
            return self.store.update(job.job_id, state=CANCELLED, stage="cancelled", eta_seconds=0.0)
        except EasyPhotoError as error:
            log.warning("job %s failed: %s %s", job.job_id, error.reason, error.message)
            self.ended(job)
            return self.store.update(job.job_id, state=FAILED, error=error_record(error), eta_seconds=0.0)
        except Exception as exc:
            log.exception("job %s failed", job.job_id)
            self.ended(job)
            internal = EasyPhotoError(f"{type(exc).__name__}: {str(exc)[:MAX_ERROR_CHARS]}")
            return self.store.update(job.job_id, state=FAILED, error=error_record(internal), eta_seconds=0.0)
        finally:
            with self._lock:
                self._cancelled.discard(job.job_id)
        log.info("job %s published %s v%d in %.1fs", job.job_id, job.user_id, version, time.time() - started)
        return self.store.get(job.job_id)

    def raise_if_stopped(self, job_id: str) -> None:
        """Cancelled when the trainer is stopping or the job was cancelled."""
        with self._lock:
            if self._stopping:
                raise Cancelled("the trainer is stopping")
            if job_id in self._cancelled:
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
        self.job = self.runner.store.update(self.job.job_id, **values)

    def raise_if_stopped(self) -> None:
        self.runner.raise_if_stopped(self.job.job_id)

    def run(self) -> int:
        published = self.runner.users.version_of_job(self.job.user_id, self.job.job_id)
        if published is not None:  # the trainer stopped between publishing and recording it
            log.info("job %s already published %s v%d", self.job.job_id, self.job.user_id, published)
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
        return self.publish(prepared, results, family, validator)

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
        self.update(stage="publish")
        report = self.report(results, chosen, family)

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
        self, results: list[ValidationImage], chosen: list[ValidationImage], family: ModelFamily
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
