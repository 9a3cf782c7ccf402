"""The trainer's own metrics (the per-call gRPC ones come from ``rpc.metrics``)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from easyphoto.rpc.metrics import LATENCY_BUCKETS

# Seconds per training step, from a tiny CPU model to SD 1.5 with accumulation on a GPU.
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
JOB_BUCKETS = (*LATENCY_BUCKETS, 1800, 3600, 7200)


class TrainerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.jobs_finished = Counter(
            "easyphoto_training_jobs_finished_total", "Training jobs that ended, by final state.", ["state"],
            registry=registry,
        )  # fmt: skip
        self.job_seconds = Histogram(
            "easyphoto_training_job_seconds", "Seconds a job ran (this process) until it ended.",
            buckets=JOB_BUCKETS, registry=registry,
        )  # fmt: skip
        self.steps = Counter("easyphoto_training_steps_total", "Optimizer steps taken.", registry=registry)
        self.step_seconds = Histogram(
            "easyphoto_training_step_seconds", "Seconds per optimizer step (all accumulation micro-batches).",
            buckets=STEP_BUCKETS, registry=registry,
        )  # fmt: skip
        self.jobs_queued = Gauge(
            "easyphoto_training_jobs_queued", "Jobs waiting in the shared job store for a trainer.",
            registry=registry,
        )  # fmt: skip
        self.jobs_running = Gauge(
            "easyphoto_training_jobs_running",
            "Jobs a trainer (any replica) is running now.",
            registry=registry,
        )
        self.photos_dropped = Counter(
            "easyphoto_training_photos_dropped_total", "Uploaded photos not used for training, by reason.",
            ["reason"], registry=registry,
        )  # fmt: skip

    def follow_store(self, count: Callable[[int], int], queued: int, running: int) -> None:
        """The queued and running gauges read from the job store (``count(state)``) at each scrape."""
        self.jobs_queued.set_function(lambda: count(queued))
        self.jobs_running.set_function(lambda: count(running))
