"""The face stack's numbers for ``docs/benchmarks.md``: detections per sample photo, the
same/different identity gap, and CPU time per role."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from easyphoto.diffusion.passes import PassOptions
from easyphoto.engines.backends.torch_backend import TorchBackend
from easyphoto.engines.faces.detect import SAME_PERSON_THRESHOLD
from easyphoto.engines.faces.models import default_face_models
from easyphoto.engines.interface import Engines
from easyphoto.engines.models.loading import tiny_family
from easyphoto.fixtures.photos import PHOTOS, sample_photo
from easyphoto.fixtures.users import publish_photo_user
from easyphoto.imaging.geometry import fit_size, grow_box, int_box, resize
from easyphoto.users.store import UserStore

from .options import GenerateOptions
from .pipeline import Orchestrator

MARK_BEGIN = "<!-- bench:faces:begin -->"
MARK_END = "<!-- bench:faces:end -->"


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def face_section(repeats: int = 5) -> str:
    models = default_face_models()
    analyzer = models.analyzer(TorchBackend(faces=models, device="cpu"))
    lines = [
        MARK_BEGIN,
        "### Face stack (MTCNN + dlib ResNet, CPU fp32)",
        "",
        "| photo | size | faces | scores | detect ms |",
    ]
    lines.append("| --- | --- | --- | --- | --- |")
    for name in PHOTOS:
        image = sample_photo(name)
        faces = analyzer.detect(image)
        ms = 1000 * _median_seconds(lambda image=image: analyzer.detect(image), repeats)  # type: ignore[misc]
        scores = ", ".join(f"{f.score:.3f}" for f in faces) or "-"
        lines.append(f"| {name} | {image.shape[1]}x{image.shape[0]} | {len(faces)} | {scores} | {ms:.0f} |")

    astronaut = sample_photo("astronaut")
    reference = analyzer.embed(astronaut, [analyzer.largest(astronaut)])[0]
    mirrored = np.ascontiguousarray(astronaut[:, ::-1])
    same = float(analyzer.embed(mirrored, [analyzer.largest(mirrored)])[0] @ reference)
    group = sample_photo("group")
    others = analyzer.embed(group, analyzer.detect(group))
    different = float((others @ reference).max())
    pairwise = others @ others.T
    group_max = float(pairwise[~np.eye(len(pairwise), dtype=bool)].max())
    face = analyzer.largest(astronaut)
    chip = models.aligner(astronaut, face)
    batch = torch.from_numpy(chip[None]).permute(0, 3, 1, 2).contiguous()
    align_ms = 1000 * _median_seconds(lambda: models.aligner(astronaut, face), repeats)
    net_ms = 1000 * _median_seconds(
        lambda: analyzer.backend.infer("face_embedder", {"faces": batch}), repeats
    )
    total_ms = 1000 * _median_seconds(
        lambda: analyzer.embed(astronaut, [analyzer.largest(astronaut)]), repeats
    )
    lines += [
        "",
        f"Identity (cosine of L2-normalised dlib descriptors): astronaut vs mirrored **{same:.3f}**;"
        f" astronaut vs the closest of 6 other people **{different:.3f}**; gap **{same - different:.3f}**."
        f" Most similar pair among the 6 people of the group photo: {group_max:.3f}.",
        f"dlib's cosine scale is compressed; the same-person threshold used is **{SAME_PERSON_THRESHOLD}**.",
        "",
        "| role / step | ms per face |",
        "| --- | --- |",
        f"| dlib 5-point alignment to a 150² chip | {align_ms:.1f} |",
        f"| face_embedder role (dlib ResNet, one chip) | {net_ms:.1f} |",
        f"| detect + align + embed, astronaut 512² | {total_ms:.1f} |",
        *classical_lines(classical_work(repeats)),
        MARK_END,
    ]
    return "\n".join(lines)


CLASSICAL_CROP_SIDE = 512
CLASSICAL_TARGET_MS = 50


@dataclass(frozen=True)
class ClassicalWork:
    """Per face at a 512 px crop with every diffusion pass off (t1.jpg, its first 3 faces)."""

    ms_per_face: float  # fusion, masks, colour shifts, pose source, paste back
    redetect_ms_per_face: float  # what detecting the face again in its crop would cost
    carried_vs_redetected_px: float  # the largest landmark difference between the two


def classical_work(repeats: int = 5) -> ClassicalWork:
    """The orchestrator's work outside the models on each painted face: a Generate with every
    pass off, less its template detection and its scoring, per face."""
    models = default_face_models()
    analyzer = models.analyzer(TorchBackend(faces=models, device="cpu"))
    family = replace(tiny_family(), image_sizes=(256, 512, 1024))  # crops of 512 px, not 256
    engines = Engines(TorchBackend(family, "cpu"), family.tokenizer, float(family.vae.config.scaling_factor))
    group, astronaut = sample_photo("group"), sample_photo("astronaut")
    off = PassOptions(False, 1, 0.5, 7.0)
    options = GenerateOptions(
        first_pass=off, second_pass=off, seam_pass=off, crop_short_side=CLASSICAL_CROP_SIDE
    )
    with tempfile.TemporaryDirectory() as data:
        store = UserStore(Path(data))
        publish_photo_user(store, "bench", astronaut)
        orchestrator = Orchestrator(engines, family.scheduler_config, models, analyzer, store)
        try:
            faces = 3

            def outside_models() -> float:
                timings = orchestrator.generate(group, ["bench"] * faces, options, seed=1).timings
                return timings["total"] - timings["detect"] - timings["score"] - timings["lora_switch"]

            outside_models()
            per_face = statistics.median(outside_models() for _ in range(repeats)) / faces
        finally:
            orchestrator.close()
    redetect, differences = [], []
    for face in analyzer.detect(group)[:faces]:
        box = int_box(grow_box(face.box, options.crop_scale, group.shape[1], group.shape[0]))
        size = fit_size(box[2] - box[0], box[3] - box[1], CLASSICAL_CROP_SIDE, 64, 1024)
        crop = resize(group[box[1] : box[3], box[0] : box[2]], *size)
        redetect.append(_median_seconds(lambda crop=crop: analyzer.largest(crop), repeats))  # type: ignore[misc]
        carried = face.in_crop(box, size).landmarks
        differences.append(float(np.abs(analyzer.largest(crop).landmarks - carried).max()))
    return ClassicalWork(1000 * per_face, 1000 * statistics.mean(redetect), max(differences))


def classical_lines(work: ClassicalWork) -> list[str]:
    return [
        "",
        f"Per-face work outside the models at a {CLASSICAL_CROP_SIDE} px crop (every pass off, t1.jpg,"
        " 3 faces; fusion twice, masks, two colour shifts, pose source, paste back):"
        f" **{work.ms_per_face:.1f} ms** a face (target at most {CLASSICAL_TARGET_MS} ms).",
        f"Each face is detected once, in the template, and carried into its crop: that saves"
        f" {work.redetect_ms_per_face:.0f} ms a face; MTCNN run again in the crop would move the"
        f" landmarks by up to {work.carried_vs_redetected_px:.1f} px (MTCNN at another scale and with"
        " the other faces painted white; neither is ground truth).",
    ]
