"""The soak's pure parts, for real and without servers: the RSS-growth rule, the samples CSV and
summary it writes, and the section it writes into a markdown file (``cli/soak.py``)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from easyphoto.cli.soak import (
    MARK_BEGIN,
    MARK_END,
    MEDIAN_SAMPLES,
    Growth,
    ProcessStats,
    RpcFailure,
    Sample,
    SoakConfig,
    SoakResult,
    rss_growth,
    write_outputs,
)

EVERY = 5.0


def _series(serve: list[float], trainer: list[float], warmup: float, total: float) -> list[Sample]:
    """Samples every EVERY seconds with these RSS values, phased as the soak phases them."""
    samples = []
    for index, (serve_mb, trainer_mb) in enumerate(zip(serve, trainer, strict=True)):
        seconds = index * EVERY
        phase = "warm-up" if seconds <= warmup else "load" if seconds <= total else "drain"
        processes = {"serve": ProcessStats(serve_mb, 13, 50), "trainer": ProcessStats(trainer_mb, 16, 25)}
        p95 = None if index < 3 else 20.0 + index / 10
        samples.append(Sample(seconds, phase, 4 * index, 3 * index, index // 4, 0, p95, processes))
    return samples


def test_a_growing_rss_fails_and_a_flat_noisy_one_passes() -> None:
    noise = random.Random(7)
    count, warmup, total = 121, 120.0, 600.0  # ten minutes, two of warm-up
    flat = [1500 + noise.gauss(0, 15) for _ in range(count)]
    flat[-2] += 300  # a spike among the last samples: the median does not see it
    flat[24] -= 300  # nor one at the end of warm-up
    growing = [900 + 1.5 * i for i in range(count)]  # a leak: +1.5 MB a sample
    samples = _series(flat, growing, warmup, total)

    serve, trainer = rss_growth(samples, "serve"), rss_growth(samples, "trainer")
    assert serve.ok and abs(serve.percent) < 2
    assert not trainer.ok and trainer.percent > 5
    # The medians are of the last MEDIAN_SAMPLES samples of each phase.
    warm = [s.processes["trainer"].rss_mb for s in samples if s.phase == "warm-up"][-MEDIAN_SAMPLES:]
    assert trainer.warmup_mb == sorted(warm)[MEDIAN_SAMPLES // 2]
    assert trainer.end_mb == 900 + 1.5 * (count - 1 - MEDIAN_SAMPLES // 2)

    # Samples while requests drain (after --minutes) are left out of the comparison.
    draining = _series(flat + [5000.0] * 6, growing + [900.0] * 6, warmup, total)
    assert draining[-1].phase == "drain" and rss_growth(draining, "serve") == serve

    # The limit: 5 % above passes, more fails.
    assert Growth("serve", 1000, 1050).ok and not Growth("serve", 1000, 1051).ok
    with pytest.raises(ValueError, match="samples both in and after"):
        rss_growth(samples[:10], "serve")  # the run never left warm-up


def _result(tmp_path: Path, errors: list[RpcFailure]) -> SoakResult:
    config = SoakConfig(
        minutes=1, warmup_minutes=0.5, out=tmp_path / "out", doc=tmp_path / "docs" / "benchmarks.md"
    )
    samples = _series([1500.0] * 14, [900.0 + i for i in range(14)], 30.0, 60.0)
    result = SoakResult(config, "Test CPU (2 cores)", "2026-01-02 03:04 UTC", samples=samples)
    result.calls = {"Generate": 30, "CreateTrainingJob": 3, "WatchJob": 3, "GetJob": 3, "ListJobs": 3}
    result.calls["training job"] = 3
    result.errors = errors
    result.exit_status = {"serve": 0, "trainer": 0}
    result.generate_seconds = [(10.0 + i, 20.0 + i / 10) for i in range(30)]
    result.growth = [rss_growth(samples, "serve"), rss_growth(samples, "trainer")]
    config.out.mkdir()
    return result


def test_samples_csv_summary_and_plot_are_written(tmp_path: Path) -> None:
    result = _result(tmp_path, [])
    write_outputs(result)
    out = result.config.out

    rows = list(csv.DictReader((out / "samples.csv").open()))
    assert len(rows) == 14 and rows[0]["phase"] == "warm-up" and rows[-1]["phase"] == "drain"
    assert float(rows[1]["minutes"]) == pytest.approx(EVERY / 60, abs=1e-4)
    assert rows[0]["generate_p95_s"] == "" and float(rows[5]["generate_p95_s"]) == 20.5
    assert [float(r["trainer_rss_mb"]) for r in rows] == [900.0 + i for i in range(14)]
    assert {"serve_open_files", "serve_threads", "trainer_open_files", "trainer_threads"} <= set(rows[0])

    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "pass" and summary["failures"] == []
    assert summary["requests"] == 42 and summary["training_jobs_succeeded"] == 3 and summary["errors"] == 0
    trainer = summary["processes"]["trainer"]
    assert trainer["rss_mb_warmup_end"] == 904 and trainer["rss_mb_end"] == 910  # medians of 5
    assert trainer["rss_growth_percent"] == pytest.approx(100 * 6 / 904)
    assert trainer["threads_warmup_end_end"] == [25, 25] and trainer["exit_status"] == 0
    assert summary["generate_p95_s_warmup_end"] == 20.6 and summary["generate_p95_s_end"] == 21.2
    assert (out / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_fail_the_run_with_their_codes_and_messages(tmp_path: Path) -> None:
    errors = [
        RpcFailure(40.0, "Generate", "DEADLINE_EXCEEDED", "Deadline Exceeded"),
        RpcFailure(41.0, "Generate", "DEADLINE_EXCEEDED", "Deadline Exceeded"),
        RpcFailure(45.0, "WatchJob", "JOB_STATE_FAILED", "job j1: NO_FACE no face in any photo"),
    ]
    result = _result(tmp_path, errors)
    write_outputs(result)
    summary = json.loads((result.config.out / "summary.json").read_text())
    assert summary["verdict"] == "fail" and summary["errors"] == 3
    assert summary["errors_by_call"] == {"Generate DEADLINE_EXCEEDED": 2, "WatchJob JOB_STATE_FAILED": 1}
    assert summary["error_list"][2]["message"] == "job j1: NO_FACE no face in any photo"
    assert "Generate DEADLINE_EXCEEDED x2" in summary["failures"][0]


def test_the_doc_section_is_written_then_replaced_in_place(tmp_path: Path) -> None:
    result = _result(tmp_path, [])
    doc = result.config.doc
    assert doc is not None
    doc.parent.mkdir()
    doc.write_text(f"# Benchmarks\n\nbefore\n\n{MARK_BEGIN}\nan old soak\n{MARK_END}\n\nafter\n")
    write_outputs(result)
    first = doc.read_text()
    assert first.startswith("# Benchmarks\n\nbefore\n\n") and first.endswith("\n\nafter\n")
    assert "an old soak" not in first and first.count(MARK_BEGIN) == first.count(MARK_END) == 1
    section = first[first.index(MARK_BEGIN) : first.index(MARK_END)]
    assert "Test CPU (2 cores)" in section and "2026-01-02 03:04 UTC" in section
    assert "| trainer | 904 | 910 | +0.7 % |" in section and "| errors | 0 |" in section
    assert "Verdict: **pass**" in section and "![soak](images/soak.png)" in section
    assert (doc.parent / "images" / "soak.png").is_file()

    result.errors = [RpcFailure(40.0, "GetJob", "UNAVAILABLE", "Connection refused")]
    write_outputs(result)
    second = doc.read_text()
    assert second.count(MARK_BEGIN) == 1 and "before" in second and "after" in second
    assert "Verdict: **FAIL**" in second and "GetJob UNAVAILABLE x1" in second and "| errors | 1 |" in second
