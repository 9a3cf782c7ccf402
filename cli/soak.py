"""The soak (``make soak``, ``easyphoto soak``): both services under steady load for a bounded time,
watching each process's memory, open files and threads for leaks.

``easyphoto serve`` (the orchestrator) and ``easyphoto trainer`` (``--device cpu``, told to refresh
the orchestrator on each publication) run as their own processes on loopback, on free ports, over
one temporary data root where a few users were published as the benchmark harness publishes them
(``cli/load_bench.py``). ``--concurrency`` client threads in all load them for ``--minutes``
(warm-up included): most send Generate (one 1-face template, the users in turn, small steps); one
or two (two from concurrency 8) each train their own user again and again with tiny options: a
CreateTrainingJob of four photos, WatchJob until it ends, then GetJob and ListJobs. Every RPC has a
deadline. When the time is up no new request is sent, those in flight finish, and both processes
get SIGTERM.

Every ``--sample-seconds`` it records, for each service process, its RSS (``VmRSS`` of
``/proc/PID/status``), its open files (the entries of ``/proc/PID/fd``) and its threads (those of
``/proc/PID/task``), and from the clients the requests done, the errors so far and the p95 latency
of the Generates that finished in the last :data:`P95_WINDOW_S` seconds. ``--out`` gets
``samples.csv``, ``soak.png``, ``summary.json`` and both services' logs; ``--doc FILE`` writes the
section between ``<!-- soak:begin -->`` and ``<!-- soak:end -->`` there (the plot copied into
``images/soak.png`` beside it).

The run FAILS (exit status 1, each reason printed) when

* any RPC failed (its status code and message are kept), or a training job ended other than
  SUCCEEDED;
* either process exited during the run, or after SIGTERM exited with a status other than 0 (or
  not within :data:`STOP_TIMEOUT_S` seconds);
* a process's RSS grew by more than :data:`RSS_GROWTH_LIMIT` (5 %) from warm-up to the end: the
  median of its last :data:`MEDIAN_SAMPLES` samples taken at or before the end of warm-up, against
  the median of its last :data:`MEDIAN_SAMPLES` samples taken while the load still ran (at or
  before ``--minutes``; samples while in-flight requests drain are plotted, not compared).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc

from easyphoto.cli.client import ServiceError
from easyphoto.cli.load_bench import QUICK, free_port, publish_users, quantile, rss_mb, wait_ready
from easyphoto.engines.models.loading import resolve_family
from easyphoto.fixtures.photos import person_photos, sample_photo
from easyphoto.imaging.codec import encode_png
from easyphoto.server.bench import device_name, write_section
from easyphoto.users.store import UserStore
from easyphoto.v1 import generator_pb2, generator_pb2_grpc, trainer_pb2, trainer_pb2_grpc

MARK_BEGIN, MARK_END = "<!-- soak:begin -->", "<!-- soak:end -->"
PROCESSES = ("serve", "trainer")
RSS_GROWTH_LIMIT = 0.05  # end over warm-up end, as a fraction
MEDIAN_SAMPLES = 5  # samples whose median stands for the RSS at a point of the run
P95_WINDOW_S = 60.0  # a sample's Generate p95 is over the Generates finished in this many seconds before it
GENERATE_DEADLINE_S = 600.0
TRAINING_DEADLINE_S = 900.0  # CreateTrainingJob is answered at once; this bounds its WatchJob
CALL_DEADLINE_S = 30.0  # CreateTrainingJob, GetJob, ListJobs
READY_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 120.0
ERROR_BACKOFF_S = 1.0  # a worker whose call failed waits this long before its next one
KEPT_ERRORS = 100  # errors listed in summary.json (all are counted)
# A training job as small as one can be (tests/test_trainer_replicas.py's FAST options).
TRAINING_OPTIONS: dict[str, Any] = {
    "rank": 4, "alpha": 4.0, "resolution": 64, "gradient_accumulation_steps": 1, "steps_per_photo": 2,
    "max_train_steps": 6, "validation_interval": 3, "validation_steps": 2, "validation_templates": 1,
    "merge_top_k": 2,
}  # fmt: skip
TERMINAL = (trainer_pb2.JOB_STATE_SUCCEEDED, trainer_pb2.JOB_STATE_FAILED, trainer_pb2.JOB_STATE_CANCELLED)

T = TypeVar("T")


class SoakFailure(RuntimeError):
    """The soak could not run (a service never became ready)."""


@dataclass(frozen=True)
class SoakConfig:
    minutes: float = 10.0  # the whole load, warm-up included
    warmup_minutes: float = 2.0
    concurrency: int = 16
    out: Path = Path("bench-out/soak")
    doc: Path | None = None
    models: str = "tiny"
    sample_seconds: float = 5.0
    users: int = 4  # published users the Generate clients take in turn
    lora_rank: int = 8
    first_steps: int = 10
    second_steps: int = 10

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_minutes < self.minutes:
            raise ValueError("--warmup-minutes must be at least 0 and less than --minutes")
        if self.concurrency < 2:
            raise ValueError("--concurrency must be at least 2 (Generate and training clients)")
        if self.sample_seconds <= 0:
            raise ValueError("--sample-seconds must be positive")

    @property
    def training_clients(self) -> int:
        return 2 if self.concurrency >= 8 else 1

    @property
    def generate_clients(self) -> int:
        return self.concurrency - self.training_clients


@dataclass(frozen=True)
class ProcessStats:
    rss_mb: float
    open_files: int
    threads: int


def process_stats(pid: int) -> ProcessStats:
    """RSS, open files and threads of a live process, from ``/proc``."""
    proc = Path(f"/proc/{pid}")
    return ProcessStats(rss_mb(pid), len(os.listdir(proc / "fd")), len(os.listdir(proc / "task")))


@dataclass(frozen=True)
class Sample:
    seconds: float  # since the load started
    phase: str  # "warm-up" (at or before its end), "load", or "drain" (after --minutes)
    requests: int  # RPCs that succeeded so far (a WatchJob counts once)
    generates: int
    training_jobs: int  # jobs that ended
    errors: int
    generate_p95_s: float | None  # None: no Generate finished in the window
    processes: dict[str, ProcessStats]

    def row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "seconds": round(self.seconds, 2),
            "minutes": round(self.seconds / 60, 4),
            "phase": self.phase,
            "requests": self.requests,
            "generates": self.generates,
            "training_jobs": self.training_jobs,
            "errors": self.errors,
            "generate_p95_s": "" if self.generate_p95_s is None else round(self.generate_p95_s, 4),
        }
        for name, stats in self.processes.items():
            row[f"{name}_rss_mb"] = round(stats.rss_mb, 2)
            row[f"{name}_open_files"] = stats.open_files
            row[f"{name}_threads"] = stats.threads
        return row


@dataclass(frozen=True)
class Growth:
    """A process's RSS at the end of warm-up and at the end (each a median of samples)."""

    process: str
    warmup_mb: float
    end_mb: float
    limit: float = RSS_GROWTH_LIMIT

    @property
    def percent(self) -> float:
        return 100 * (self.end_mb / self.warmup_mb - 1) if self.warmup_mb else math.inf

    @property
    def ok(self) -> bool:
        return self.end_mb <= self.warmup_mb * (1 + self.limit)


def rss_growth(samples: list[Sample], process: str, window: int = MEDIAN_SAMPLES) -> Growth:
    """The median RSS of the last ``window`` warm-up samples against that of the last ``window``
    load samples (drain samples are left out)."""
    warmup = [s.processes[process].rss_mb for s in samples if s.phase == "warm-up"]
    load = [s.processes[process].rss_mb for s in samples if s.phase == "load"]
    if not warmup or not load:
        raise ValueError(f"{process}: RSS needs samples both in and after the warm-up")
    return Growth(process, statistics.median(warmup[-window:]), statistics.median(load[-window:]))


@dataclass(frozen=True)
class RpcFailure:
    seconds: float
    method: str
    code: str  # a grpc.StatusCode name, or the job's end state
    message: str


@dataclass
class Ledger:
    """What the clients did, shared between their threads."""

    started: float = field(default_factory=time.monotonic)
    calls: Counter[str] = field(default_factory=Counter)
    generates: list[tuple[float, float]] = field(default_factory=list)  # (finished at, seconds)
    errors: list[RpcFailure] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> float:
        return time.monotonic() - self.started

    def done(self, method: str, seconds: float | None = None) -> None:
        with self.lock:
            self.calls[method] += 1
            if seconds is not None:
                self.generates.append((self.now(), seconds))

    def failed(self, method: str, code: str, message: str) -> None:
        failure = RpcFailure(self.now(), method, code, " ".join(message.split()))
        with self.lock:
            self.errors.append(failure)
        print(f"error at {_clock(failure.seconds)}: {method} {code}: {failure.message}", flush=True)

    def generate_p95(self, since: float) -> float | None:
        with self.lock:
            recent = [seconds for finished, seconds in self.generates if finished > since]
        return quantile(recent, 0.95) if recent else None


# ---- the services ----


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    address: str
    metrics_port: int
    log: Path
    exit_status: int | None = None
    died: bool = False  # exited while the load ran (a failure already recorded)


@contextmanager
def _service(name: str, arguments: list[str], data: Path, out: Path) -> Iterator[Service]:
    """``easyphoto NAME`` on loopback free ports over ``data``; SIGTERM (then SIGKILL) on leaving
    if it still runs."""
    port, metrics_port = free_port(), free_port()
    command = [
        sys.executable, "-m", "easyphoto.cli.main", name, "--host", "127.0.0.1", "--port", str(port),
        "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port), "--data", str(data), *arguments,
    ]  # fmt: skip
    log = out / f"{name}.log"
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=os.environ.copy())
    service = Service(name, process, f"127.0.0.1:{port}", metrics_port, log)
    try:
        yield service
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _ready(service: Service) -> None:
    try:
        wait_ready(service.process, service.metrics_port, READY_TIMEOUT_S)
    except (RuntimeError, TimeoutError) as why:
        status = service.process.poll()
        state = f"exited with {status}" if status is not None else "never became ready"
        raise SoakFailure(f"easyphoto {service.name} {state} (see {service.log})") from why


def _stop(service: Service) -> str | None:
    """SIGTERM and the exit status; a failure in words, or None."""
    if service.process.poll() is not None:
        service.exit_status = service.process.returncode
        if service.died:
            return None
        return f"{service.name} had already exited with status {service.exit_status} (see {service.log})"
    service.process.send_signal(signal.SIGTERM)
    try:
        service.exit_status = service.process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        service.process.kill()
        service.exit_status = service.process.wait()
        return f"{service.name} did not exit within {STOP_TIMEOUT_S:.0f} s of SIGTERM (killed)"
    if service.exit_status != 0:
        return f"{service.name} exited with status {service.exit_status} after SIGTERM (see {service.log})"
    return None


# ---- the clients ----


def _rpc(ledger: Ledger, method: str, call: Callable[[], T]) -> T | None:
    """``call()``; None (the failure recorded) when it raised an RPC error."""
    try:
        result = call()
    except grpc.RpcError as error:
        failure = ServiceError.from_rpc(error)
        ledger.failed(method, failure.code.name, failure.message)
        return None
    return result


class Load:
    """The client threads: Generate clients and training clients, until :meth:`stop`."""

    def __init__(self, config: SoakConfig, serve: str, trainer: str, users: list[str]) -> None:
        self.config, self.users = config, users
        self.ledger = Ledger()
        self._stop = threading.Event()
        self._turn = itertools.count()
        self._template = encode_png(sample_photo("astronaut"))
        self._photos = [encode_png(photo) for photo in person_photos()]
        options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        self._channels = [grpc.insecure_channel(a, options=options) for a in (serve, trainer)]
        self._generator = generator_pb2_grpc.GeneratorStub(self._channels[0])
        self._trainer = trainer_pb2_grpc.TrainerStub(self._channels[1])
        self._threads = [
            threading.Thread(target=self._generate_client, name=f"generate-{i}", daemon=True)
            for i in range(config.generate_clients)
        ] + [
            threading.Thread(target=self._training_client, args=(i,), name=f"train-{i}", daemon=True)
            for i in range(config.training_clients)
        ]

    def start(self) -> None:
        self.ledger.started = time.monotonic()
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """No new request from now on."""
        self._stop.set()

    def running(self) -> int:
        return sum(thread.is_alive() for thread in self._threads)

    def join(self, timeout: float) -> bool:
        """Waits up to ``timeout`` seconds for every client to return; whether they all did."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not self.running()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def _next_user(self) -> str:
        with self.ledger.lock:
            return self.users[next(self._turn) % len(self.users)]

    def _generate_client(self) -> None:
        while not self._stop.is_set():
            if not self._generate_once(self._next_user()):
                self._stop.wait(ERROR_BACKOFF_S)

    def _generate_once(self, user: str) -> bool:
        request = generator_pb2.GenerateRequest(templates=[self._template], user_ids=[user], seed=1)
        request.first_pass.steps = self.config.first_steps
        request.second_pass.steps = self.config.second_steps
        started = time.perf_counter()
        call = self._generator.Generate
        if _rpc(self.ledger, "Generate", lambda: call(request, timeout=GENERATE_DEADLINE_S)) is None:
            return False
        self.ledger.done("Generate", time.perf_counter() - started)
        return True

    def _training_client(self, index: int) -> None:
        """Trains ``trainee{index}`` over and over: each job starts once the previous one ended."""
        user = f"trainee{index}"
        while not self._stop.is_set():
            if not self._train_once(user):
                self._stop.wait(ERROR_BACKOFF_S)

    def _train_once(self, user: str) -> bool:
        request = trainer_pb2.CreateTrainingJobRequest(
            user_id=user, photos=self._photos, options=trainer_pb2.TrainingOptions(**TRAINING_OPTIONS)
        )
        ledger, stub = self.ledger, self._trainer
        job = _rpc(
            ledger, "CreateTrainingJob", lambda: stub.CreateTrainingJob(request, timeout=CALL_DEADLINE_S)
        )
        if job is None:
            return False
        ledger.done("CreateTrainingJob")
        watch = trainer_pb2.WatchJobRequest(job_id=job.job_id)
        states = _rpc(ledger, "WatchJob", lambda: list(stub.WatchJob(watch, timeout=TRAINING_DEADLINE_S)))
        if states is None:
            return False
        last = states[-1] if states else job
        if last.state not in TERMINAL:
            ledger.failed(
                "WatchJob", "STREAM_ENDED", f"job {job.job_id} still {trainer_pb2.JobState.Name(last.state)}"
            )
            return False
        ledger.done("WatchJob")
        if last.state != trainer_pb2.JOB_STATE_SUCCEEDED:
            state = trainer_pb2.JobState.Name(last.state)
            ledger.failed("WatchJob", state, f"job {job.job_id}: {last.error.reason} {last.error.message}")
            return False
        ledger.done("training job")
        got = _rpc(
            ledger,
            "GetJob",
            lambda: stub.GetJob(trainer_pb2.GetJobRequest(job_id=job.job_id), timeout=CALL_DEADLINE_S),
        )
        if got is None:
            return False
        ledger.done("GetJob")
        if got.state != last.state or got.published_version != last.published_version:
            ledger.failed(
                "GetJob", "MISMATCH", f"job {job.job_id}: GetJob disagrees with WatchJob's last state"
            )
            return False
        listing = trainer_pb2.ListJobsRequest(user_id=user, page_size=10)
        if _rpc(ledger, "ListJobs", lambda: stub.ListJobs(listing, timeout=CALL_DEADLINE_S)) is None:
            return False
        ledger.done("ListJobs")
        return True


# ---- the run ----


@dataclass
class SoakResult:
    config: SoakConfig
    device: str
    date: str
    samples: list[Sample] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    errors: list[RpcFailure] = field(default_factory=list)
    exit_status: dict[str, int | None] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # besides the RPC errors and RSS growth
    growth: list[Growth] = field(default_factory=list)
    generate_seconds: list[tuple[float, float]] = field(default_factory=list)  # (finished at, seconds)

    @property
    def verdict_failures(self) -> list[str]:
        """Every reason the run failed (none: it passed)."""
        reasons = list(self.failures)
        if self.errors:
            codes = Counter(f"{e.method} {e.code}" for e in self.errors)
            listed = ", ".join(f"{name} x{count}" for name, count in codes.most_common())
            reasons.append(f"{len(self.errors)} RPC errors ({listed}); first: {self.errors[0].message}")
        reasons += [
            f"{g.process} RSS grew {g.percent:+.1f} % ({g.warmup_mb:.0f} MB at warm-up end, {g.end_mb:.0f} MB"
            f" at the end; limit +{100 * g.limit:.0f} %)"
            for g in self.growth
            if not g.ok
        ]
        return reasons


def run_soak(config: SoakConfig) -> SoakResult:
    """Starts both services, loads them for ``config.minutes``, stops them; writes every output."""
    config.out.mkdir(parents=True, exist_ok=True)
    result = SoakResult(config, device_name(), datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))
    with tempfile.TemporaryDirectory(prefix="easyphoto-soak-") as folder, ExitStack() as stack:
        data = Path(folder) / "data"
        print(f"publishing {config.users} users into {data}", flush=True)
        publish_users(
            resolve_family(config.models),
            UserStore(data),
            replace(QUICK, users=config.users, lora_rank=config.lora_rank),
        )
        # Room for every client at once: no request is refused (RESOURCE_EXHAUSTED).
        sizes = ["--max-running", str(config.concurrency), "--max-waiting", str(max(8, config.concurrency))]
        serve = stack.enter_context(_service("serve", ["--models", config.models, *sizes], data, config.out))
        trainer_args = ["--models", config.models, "--device", "cpu", "--orchestrator", serve.address]
        trainer = stack.enter_context(_service("trainer", trainer_args, data, config.out))
        services = {"serve": serve, "trainer": trainer}
        print("waiting for easyphoto serve and easyphoto trainer to be ready", flush=True)
        for service in services.values():
            _ready(service)
        load = Load(config, serve.address, trainer.address, [f"user{i}" for i in range(config.users)])
        try:
            _drive(load, services, result)
        finally:
            load.stop()
            load.close()
        for service in services.values():
            if (why := _stop(service)) is not None:
                result.failures.append(why)
        result.exit_status = {name: s.exit_status for name, s in services.items()}
    result.calls = dict(load.ledger.calls)
    result.errors = list(load.ledger.errors)
    result.generate_seconds = list(load.ledger.generates)
    with suppress(ValueError):  # no samples after warm-up: a service died (a failure already)
        result.growth = [rss_growth(result.samples, name) for name in PROCESSES]
    write_outputs(result)
    return result


def _drive(load: Load, services: dict[str, Service], result: SoakResult) -> None:
    """Starts the clients and samples every ``sample_seconds`` until the time is up (or a service
    died); then stops sending and keeps sampling while the requests in flight finish."""
    config = result.config
    total, warmup, every = 60 * config.minutes, 60 * config.warmup_minutes, config.sample_seconds
    print(
        f"load: {config.generate_clients} Generate clients, {config.training_clients} training clients,"
        f" {config.minutes:g} minutes ({config.warmup_minutes:g} of warm-up)",
        flush=True,
    )
    load.start()
    for tick in itertools.count():
        due = tick * every
        if due > total:
            break
        time.sleep(max(0.0, due - load.ledger.now()))
        if not _alive(services, result):
            return
        _record(result, _sample(load.ledger, "warm-up" if due <= warmup else "load", services), total)
    load.stop()
    print(f"time is up: waiting for the {load.running()} clients' requests in flight", flush=True)
    while not load.join(every):
        if not _alive(services, result):
            return
        _record(result, _sample(load.ledger, "drain", services), total)


def _alive(services: dict[str, Service], result: SoakResult) -> bool:
    """Whether both services still run; a failure recorded for each that does not."""
    for service in services.values():
        if service.process.poll() is not None and not service.died:
            service.died = True
            result.failures.append(
                f"{service.name} exited with status {service.process.returncode} during the run"
                f" (see {service.log})"
            )
    return not any(service.died for service in services.values())


def _record(result: SoakResult, sample: Sample, total: float) -> None:
    result.samples.append(sample)
    print(_progress(sample, total), flush=True)


def _sample(ledger: Ledger, phase: str, services: dict[str, Service]) -> Sample:
    now = ledger.now()
    with ledger.lock:
        jobs = ledger.calls["training job"]  # a job is counted by its RPCs in requests
        calls, generates = sum(ledger.calls.values()) - jobs, ledger.calls["Generate"]
        errors = len(ledger.errors)
    return Sample(
        now, phase, calls, generates, jobs, errors, ledger.generate_p95(now - P95_WINDOW_S),
        {name: process_stats(s.process.pid) for name, s in services.items()},
    )  # fmt: skip


def _progress(sample: Sample, total: float) -> str:
    p95 = "-" if sample.generate_p95_s is None else f"{sample.generate_p95_s:.1f} s"
    rss = ", ".join(f"{name} {stats.rss_mb:.0f} MB" for name, stats in sample.processes.items())
    return (
        f"[{_clock(sample.seconds)} / {_clock(total)}] {sample.phase:7s} requests {sample.requests}"
        f" (Generate {sample.generates}, jobs {sample.training_jobs}) errors {sample.errors}"
        f" p95 {p95} RSS {rss}"
    )


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


# ---- outputs ----


def write_outputs(result: SoakResult) -> None:
    out = result.config.out
    write_samples(result.samples, out / "samples.csv")
    summary = summarize(result)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if result.samples:
        plot(result, out / "soak.png")
    if result.config.doc is not None:
        images = result.config.doc.parent / "images"
        images.mkdir(parents=True, exist_ok=True)
        if result.samples:
            shutil.copyfile(out / "soak.png", images / "soak.png")
        write_section(result.config.doc, markdown(result, summary))


def write_samples(samples: list[Sample], path: Path) -> None:
    rows = [sample.row() for sample in samples]
    with path.open("w", newline="") as handle:
        if rows:
            table = csv.DictWriter(handle, fieldnames=list(rows[0]))
            table.writeheader()
            table.writerows(rows)


def _p95_at(samples: list[Sample], phase: str) -> float | None:
    """The Generate p95 of the last sample of a phase (over the window before it)."""
    found = [s.generate_p95_s for s in samples if s.phase == phase]
    return found[-1] if found else None


def _last(samples: list[Sample], phase: str, process: str) -> ProcessStats | None:
    found = [s.processes[process] for s in samples if s.phase == phase]
    return found[-1] if found else None


def summarize(result: SoakResult) -> dict[str, Any]:
    config, samples = result.config, result.samples
    warmup_s = 60 * config.warmup_minutes
    measured = [seconds for finished, seconds in result.generate_seconds if finished > warmup_s]
    processes: dict[str, Any] = {}
    growth = {g.process: g for g in result.growth}
    for name in PROCESSES:
        series = [s.processes[name] for s in samples if name in s.processes]
        ends = [_last(samples, phase, name) for phase in ("warm-up", "load")]
        entry: dict[str, Any] = {"exit_status": result.exit_status.get(name)}
        if name in growth:
            entry |= {
                "rss_mb_warmup_end": growth[name].warmup_mb,
                "rss_mb_end": growth[name].end_mb,
                "rss_growth_percent": growth[name].percent,
                "rss_ok": growth[name].ok,
            }
        if series:
            entry["rss_mb_max"] = max(s.rss_mb for s in series)
        if None not in ends:  # the last sample of warm-up and of the load
            entry["open_files_warmup_end_end"] = [e.open_files for e in ends if e is not None]
            entry["threads_warmup_end_end"] = [e.threads for e in ends if e is not None]
        processes[name] = entry
    failures = result.verdict_failures
    return {
        "verdict": "fail" if failures else "pass",
        "failures": failures,
        "date": result.date,
        "device": result.device,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "generate_clients": config.generate_clients,
        "training_clients": config.training_clients,
        "requests": sum(v for k, v in result.calls.items() if k != "training job"),
        "calls": result.calls,
        "training_jobs_succeeded": result.calls.get("training job", 0),
        "errors": len(result.errors),
        "errors_by_call": dict(Counter(f"{e.method} {e.code}" for e in result.errors)),
        "error_list": [asdict(e) for e in result.errors[:KEPT_ERRORS]],
        "generate_p95_s_warmup_end": _p95_at(samples, "warm-up"),
        "generate_p95_s_end": _p95_at(samples, "load"),
        "generate_p50_s_after_warmup": quantile(measured, 0.5) if measured else None,
        "generate_p95_s_after_warmup": quantile(measured, 0.95) if measured else None,
        "rss_rule": f"median of the last {MEDIAN_SAMPLES} samples at or before warm-up end vs of the last"
        f" {MEDIAN_SAMPLES} before the load stopped; fails above +{100 * RSS_GROWTH_LIMIT:.0f} %",
        "processes": processes,
        "samples": len(samples),
    }


def plot(result: SoakResult, path: Path) -> None:
    """RSS of each process, Generate p95, and open files and threads, against minutes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config, samples = result.config, result.samples
    minutes = [s.seconds / 60 for s in samples]
    colours = {"serve": "tab:blue", "trainer": "tab:orange"}
    figure, (rss, latency, counts) = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    for name in PROCESSES:
        colour = colours[name]
        rss.plot(minutes, [s.processes[name].rss_mb for s in samples], marker=".", color=colour, label=name)
        counts.plot(
            minutes, [s.processes[name].open_files for s in samples], color=colour, label=f"{name} open files"
        )
        counts.plot(
            minutes,
            [s.processes[name].threads for s in samples],
            color=colour,
            linestyle="--",
            label=f"{name} threads",
        )
    for growth in result.growth:
        rss.axhline(
            growth.warmup_mb * (1 + growth.limit),
            color=colours[growth.process],
            linestyle=":",
            linewidth=1,
            label=f"{growth.process}: warm-up end +{100 * growth.limit:.0f} %",
        )
    p95 = [
        (m, s.generate_p95_s) for m, s in zip(minutes, samples, strict=True) if s.generate_p95_s is not None
    ]
    latency.plot([m for m, _ in p95], [v for _, v in p95], marker=".", color="tab:red", label="Generate p95")
    verdict = "pass" if not result.verdict_failures else "FAIL"
    rss.set_title(
        f"soak ({verdict}): {config.concurrency} clients, {config.models} models, {result.device}",
        fontsize=10,
    )
    rss.set_ylabel("RSS (MB)")
    latency.set_ylabel(f"Generate p95 (s)\nover the last {P95_WINDOW_S:.0f} s")
    latency.set_ylim(bottom=0)
    counts.set_ylabel("open files, threads")
    counts.set_xlabel("minutes since the load started")
    for axis in (rss, latency, counts):
        axis.axvline(
            config.warmup_minutes, color="black", linestyle="--", linewidth=1, label="end of warm-up"
        )
        axis.axvline(config.minutes, color="grey", linestyle="-.", linewidth=1, label="load stops")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def markdown(result: SoakResult, summary: dict[str, Any]) -> str:
    config = result.config
    verdict = "**pass**" if summary["verdict"] == "pass" else "**FAIL**: " + "; ".join(summary["failures"])

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    calls = ", ".join(
        f"{name} {count}" for name, count in sorted(result.calls.items()) if name != "training job"
    )
    lines = [
        MARK_BEGIN,
        f"### Soak: both services under load for {config.minutes:g} min",
        "",
        f"`easyphoto soak --minutes {config.minutes:g} --warmup-minutes {config.warmup_minutes:g}"
        f" --concurrency {config.concurrency}` on {result.date}, {result.device}: `easyphoto serve`"
        f" ({config.models} models, steps {config.first_steps}/{config.second_steps}, {config.users} users"
        f" with random rank-{config.lora_rank} LoRAs) and `easyphoto trainer` (`--device cpu`) as their own"
        f" processes on loopback; {config.generate_clients} clients sending Generate (users in turn) and"
        f" {config.training_clients} training their own user again and again (4 photos, rank 4 at 64 px,"
        f" 6 steps; WatchJob to the end, then GetJob and ListJobs). Warm-up: the first"
        f" {config.warmup_minutes:g} min. Verdict: {verdict}.",
        "",
        "| | value |",
        "| --- | --- |",
        f"| requests | {summary['requests']} ({calls}) |",
        f"| training jobs succeeded | {summary['training_jobs_succeeded']} |",
        f"| errors | {summary['errors']} |",
        f"| Generate p95 s, last {P95_WINDOW_S:.0f} s of warm-up / of the load | "
        f"{seconds(summary['generate_p95_s_warmup_end'])} / {seconds(summary['generate_p95_s_end'])} |",
        f"| Generate p50 / p95 s after warm-up | {seconds(summary['generate_p50_s_after_warmup'])} /"
        f" {seconds(summary['generate_p95_s_after_warmup'])} |",
        "",
        "| process | RSS MB at warm-up end | RSS MB at the end | growth | open files (warm-up end, end) |"
        " threads (warm-up end, end) | exit status after SIGTERM |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in PROCESSES:
        entry = summary["processes"][name]
        warm, end = entry.get("rss_mb_warmup_end"), entry.get("rss_mb_end")
        growth = entry.get("rss_growth_percent")
        lines.append(
            f"| {name} | {'-' if warm is None else f'{warm:.0f}'} | {'-' if end is None else f'{end:.0f}'}"
            f" | {'-' if growth is None else f'{growth:+.1f} %'}"
            f" | {', '.join(map(str, entry.get('open_files_warmup_end_end', ['-'])))}"
            f" | {', '.join(map(str, entry.get('threads_warmup_end_end', ['-'])))} | {entry['exit_status']} |"
        )
    lines += [
        "",
        f"RSS at a point is the median of {MEDIAN_SAMPLES} samples (every {config.sample_seconds:g} s):"
        f" the last ones at or before the end of warm-up, and the last ones before the load stopped; the run"
        f" fails above +{100 * RSS_GROWTH_LIMIT:.0f} %.",
        "",
        "![soak](images/soak.png)",
        MARK_END,
    ]
    return "\n".join(lines)


def soak(config: SoakConfig) -> int:
    """``easyphoto soak``: 0 when it passed, 1 (the reasons printed) when it failed."""
    try:
        result = run_soak(config)
    except SoakFailure as why:
        print(f"soak FAILED: {why}", file=sys.stderr)
        return 1
    summary = json.loads((config.out / "summary.json").read_text())
    for name in PROCESSES:
        entry = summary["processes"][name]
        if "rss_mb_end" in entry:
            print(
                f"{name}: RSS {entry['rss_mb_warmup_end']:.0f} MB at warm-up end,"
                f" {entry['rss_mb_end']:.0f} MB at the end ({entry['rss_growth_percent']:+.1f} %),"
                f" exit status {entry['exit_status']}"
            )
    print(f"requests {summary['requests']}, errors {summary['errors']}; outputs in {config.out}")
    if failures := result.verdict_failures:
        for reason in failures:
            print(f"soak FAILED: {reason}", file=sys.stderr)
        return 1
    print("soak passed")
    return 0
