"""The face stack's numbers for ``docs/benchmarks.md``: detections per sample photo, the
same/different identity gap, and CPU time per role."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from easyphoto.engines.backends.torch_backend import TorchBackend
from easyphoto.engines.faces.detect import SAME_PERSON_THRESHOLD
from easyphoto.engines.faces.models import default_face_models
from easyphoto.fixtures.photos import PHOTOS, sample_photo

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
        MARK_END,
    ]
    return "\n".join(lines)
