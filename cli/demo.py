"""``easyphoto demo``: the main job end to end on the embedded default (tiny models, CPU).

1. Train a demo user through the trainer's job runner from four photos of one person (a portrait
   scikit-image ships, mirrored, re-cropped and re-lit) with real face detection and filtering,
   a peft LoRA, validation and merge, published like any user.
2. Generate with that user on a one-person and a two-person template cut from insightface's group
   photo: the full per-face loop, the seam pass between the two faces, identity scores.
3. Write a contact sheet of every stage per template, the final images and ``summary.json``.

The tiny family has random weights: it paints noise into the faces. Point ``--models`` at a real
SD 1.5 folder or file (with its ControlNets) to paint faces.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from easyphoto.engines.backends.torch_backend import TorchBackend, default_device
from easyphoto.engines.faces.detect import FaceAnalyzer
from easyphoto.engines.faces.models import FaceModels, default_face_models
from easyphoto.engines.interface import Engines
from easyphoto.engines.models.loading import resolve_family
from easyphoto.fixtures.photos import person_photos, sample_photo
from easyphoto.imaging.codec import encode_png
from easyphoto.server.options import GenerateOptions
from easyphoto.server.pipeline import Generation, Orchestrator, Progress
from easyphoto.trainer.jobs import SUCCEEDED, JobStore
from easyphoto.trainer.options import TINY_FAMILY_TRAINING, TrainingOptions
from easyphoto.trainer.runner import JobRunner, RunnerConfig
from easyphoto.users.store import UserStore

from .sheets import contact_sheet_rows

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_NOTE = "tiny RANDOM weights: faces are painted with noise, not faces"
DEMO_USER = "demo"
# Group photo regions (x0, y0, x1, y1) holding one face and two faces.
TEMPLATES = {"one_person": (640, 230, 940, 620), "two_person": (180, 60, 660, 560)}
# The tiny family's defaults with fewer steps: the demo trains in seconds.
DEMO_TRAINING = replace(
    TINY_FAMILY_TRAINING, steps_per_photo=4, max_train_steps=16, validation_interval=8, seed=0
)
STAGE_TILES = (
    "crop", "openpose", "inpaint_mask", "first_diffusion_canny", "first_diffusion_color",
    "first_diffusion", "second_mask", "second_diffusion_tile", "second_diffusion", "seam_mask", "seam_pass",
)  # fmt: skip


@dataclass
class DemoResult:
    out_dir: Path
    model: str
    is_random: bool
    seconds: dict[str, float] = field(default_factory=dict)
    training: dict[str, object] = field(default_factory=dict)
    generations: dict[str, dict[str, object]] = field(default_factory=dict)


def run_demo(
    out_dir: Path,
    models: str = "tiny",
    steps: int = 0,
    seed: int = 0,
    training: TrainingOptions = DEMO_TRAINING,
    say: Callable[[str], None] = print,
) -> DemoResult:
    """``steps`` > 0 overrides every diffusion pass's step count (quick runs)."""
    data = out_dir / "data"
    _check_demo_data(data)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    family = resolve_family(models)
    face_models = default_face_models()
    face_backend = TorchBackend(None, faces=face_models)
    analyzer = face_models.analyzer(face_backend)
    result = DemoResult(out_dir, family.name, family.is_random)
    result.seconds["load_models"] = time.perf_counter() - started

    shutil.rmtree(data, ignore_errors=True)  # the demo user starts fresh every run
    result.training = _train_user(data, models, face_models, analyzer, training, say)
    result.seconds["train_user"] = float(result.training["seconds"])  # type: ignore[arg-type]

    backend = TorchBackend(family, faces=face_models)
    engines = Engines(backend, family.tokenizer, float(family.vae.config.scaling_factor))
    orchestrator = Orchestrator(engines, family.scheduler_config, face_models, analyzer, UserStore(data))
    options = _options(steps, seed)
    group = sample_photo("group")
    banner = RANDOM_WEIGHTS_NOTE if family.is_random else f"model: {family.source}"
    for name, (x0, y0, x1, y1) in TEMPLATES.items():
        template = np.ascontiguousarray(group[y0:y1, x0:x1])
        faces = len(analyzer.detect(template))
        say(f"generating {name} ({faces} face{'s' * (faces != 1)}) ...")
        generation = orchestrator.generate(template, [DEMO_USER] * faces, options, seed, _reporter(say))
        (out_dir / f"{name}.png").write_bytes(encode_png(generation.image))
        sheet = contact_sheet_rows(_sheet_rows(template, generation), height=160, banner=banner)
        (out_dir / f"{name}_stages.png").write_bytes(encode_png(sheet))
        result.generations[name] = {
            "scores": [o.identity_score for o in generation.faces],
            "seconds": generation.timings,
        }
        result.seconds[f"generate_{name}"] = generation.timings["total"]
    summary = {k: v for k, v in vars(result).items() if k != "out_dir"}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return result


class DataInUse(ValueError):
    """``--out`` holds users other than the demo's, which a run would delete."""


def _check_demo_data(data: Path) -> None:
    """Each run deletes ``data``: only a folder holding no user but the demo's may be deleted."""
    users = data / "users"
    others = sorted(p.name for p in users.iterdir() if p.name != DEMO_USER) if users.is_dir() else []
    if others:
        raise DataInUse(
            f"{data} holds users other than the demo's ({', '.join(others[:3])}); choose another --out"
        )


def _train_user(
    data: Path,
    models: str,
    face_models: FaceModels,
    analyzer: FaceAnalyzer,
    options: TrainingOptions,
    say: Callable[[str], None],
) -> dict[str, object]:
    """Trains the demo user through the trainer's runner (no server), as a job like any other."""
    store = JobStore(data / "trainer.sqlite3")
    users = UserStore(data)
    config = RunnerConfig(data, str(default_device()), lambda: resolve_family(models), face_models, analyzer)
    runner = JobRunner(store, users, config)
    photos = [encode_png(p) for p in person_photos()]
    say(f"training user {DEMO_USER!r} from {len(photos)} photos ...")
    started = time.perf_counter()
    job = runner.run(runner.submit(DEMO_USER, photos, options, int(options.seed or 0), ""))
    store.close()
    if job.state != SUCCEEDED:
        raise RuntimeError(f"demo training failed: {job.error}")
    kept = sum(1 for photo in job.photos if photo["kept"])
    say(f"  trained {job.step} steps, kept {kept}/{len(photos)} photos, published v{job.published_version}")
    return {
        "job_id": job.job_id,
        "steps": job.step,
        "kept_photos": kept,
        "version": job.published_version,
        "seconds": time.perf_counter() - started,
    }


def _options(steps: int, seed: int) -> GenerateOptions:
    options = GenerateOptions(seed=seed, return_intermediates=True)
    if steps > 0:
        passes = ("first_pass", "second_pass", "seam_pass")
        options = replace(options, **{name: replace(getattr(options, name), steps=steps) for name in passes})
    return options


def _reporter(say: Callable[[str], None]) -> Callable[[Progress], None]:
    def report(progress: Progress) -> None:
        if progress.step == progress.total_steps:
            stage = f"face {progress.face_index} {progress.stage}"
            say(f"  {stage}: {progress.total_steps} steps, {progress.elapsed:.1f}s since the start")

    return report


def _sheet_rows(template: np.ndarray, generation: Generation) -> list[list[tuple[str, np.ndarray]]]:
    rows = [[("template", template), ("final", generation.image)]]
    kept = dict(generation.intermediates)
    for index in range(len(generation.faces)):
        row = [(tile, kept[f"face{index}_{tile}"]) for tile in STAGE_TILES if f"face{index}_{tile}" in kept]
        rows.append([(f"face {index}: {tile}", image) for tile, image in row])
    return rows
