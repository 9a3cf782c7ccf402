"""The orchestrator's own metrics (the per-call gRPC ones come from ``rpc.metrics``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from easyphoto.rpc.metrics import LATENCY_BUCKETS

# Denoising steps per second, from a full-size model on CPU to a batched GPU.
STEP_RATE_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)


class GeneratorMetrics:
    """Per generated image: seconds per stage (the keys of its ``timings``: detect,
    first_diffusion, second_diffusion, seam_pass, background_restore, lora_switch, score, total),
    denoising steps per second of diffusion time, images and painted faces; per step: steps by stage."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.stage_seconds = Histogram(
            "easyphoto_generate_stage_seconds",
            "Seconds one generated image spent in each orchestrator stage.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.steps = Counter(
            "easyphoto_denoising_steps_total",
            "Denoising (UNet) steps run, by stage.",
            ["stage"],
            registry=registry,
        )
        self.steps_per_second = Histogram(
            "easyphoto_denoising_steps_per_second",
            "Denoising steps per second of diffusion-stage time, per generated image.",
            buckets=STEP_RATE_BUCKETS,
            registry=registry,
        )
        self.engine_calls = Counter(
            "easyphoto_engine_calls_total",
            "Batched model calls the step engine made, by phase (text, encode, denoise, decode).",
            ["phase"],
            registry=registry,
        )
        self.call_jobs = Histogram(
            "easyphoto_engine_call_passes",
            "Jobs (diffusion passes; one request's prompts for text) sharing one model call, by phase.",
            ["phase"],
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
            registry=registry,
        )
        self.images = Counter("easyphoto_images_generated_total", "Images generated.", registry=registry)
        self.faces = Counter("easyphoto_faces_painted_total", "Faces painted with a user.", registry=registry)
        # What the autoscaler reads (deploy/kubernetes: an HPA on in-flight requests per pod).
        self.in_flight = Gauge(
            "easyphoto_generate_in_flight",
            "Generate requests running now (their steps batched).",
            registry=registry,
        )
        self.waiting = Gauge(
            "easyphoto_generate_waiting", "Generate requests waiting for a slot to run.", registry=registry
        )

    def follow_admission(self, running: Callable[[], int], waiting: Callable[[], int]) -> None:
        """The in-flight and waiting gauges read, at each scrape, from the admission's counts."""
        self.in_flight.set_function(running)
        self.waiting.set_function(waiting)

    def engine_call(self, phase: str, passes: int, rows: int) -> None:
        """One call of the step engine: ``passes`` passes' ``rows`` in one model evaluation."""
        self.engine_calls.labels(phase).inc()
        self.call_jobs.labels(phase).observe(passes)

    def step(self, stage: str) -> None:
        self.steps.labels(stage).inc()

    def image(self, timings: Mapping[str, float], painted: int, steps: Mapping[str, int]) -> None:
        """One finished image: its stage ``timings``, its ``painted`` faces and its ``steps`` by stage."""
        for stage, seconds in timings.items():
            self.stage_seconds.labels(stage).observe(seconds)
        diffusion_seconds = sum(timings.get(stage, 0.0) for stage in steps)
        if diffusion_seconds > 0:
            self.steps_per_second.observe(sum(steps.values()) / diffusion_seconds)
        self.images.inc()
        self.faces.inc(painted)
