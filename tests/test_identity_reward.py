"""The identity-reward stage on the tiny family (random weights: its mechanics, not its gains):
the same seed gives the same LoRA and rewards, a stage stopped mid-way resumes to the LoRA an
uninterrupted one ends with, the pre-RL LoRA is kept unless the reward rose, and the time bound
stops it. That the estimator raises a reward is shown on a toy policy (tests/test_ddpo.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from easyphoto.engines.faces.detect import FaceAnalyzer
from easyphoto.engines.lora import LoraWeights
from easyphoto.engines.models.loading import tiny_family
from easyphoto.fixtures.photos import person_photos
from easyphoto.rpc.errors import Cancelled
from easyphoto.trainer.identity_reward import IdentityRewardTuner, Reward, RewardReport
from easyphoto.trainer.lora_training import LoraTrainer, TrainingImages
from easyphoto.trainer.options import TINY_FAMILY_TRAINING
from easyphoto.trainer.validation import Validator

OPTIONS = replace(
    TINY_FAMILY_TRAINING,
    resolution=64,
    validation_templates=1,  # per-template normalisation: tests/test_ddpo.py and the job's test
    validation_steps=4,
    reward_samples_per_template=2,
    reward_iterations=2,
    reward_learning_rate=1e-3,
    identity_reward=True,
)


def _tuner(
    faces: FaceAnalyzer, folder: Path, seed: int = 1, reward: Reward | None = None, **changes: object
) -> tuple[IdentityRewardTuner, LoraWeights]:
    """A tuner over a fresh family (peft adapters go into its modules) and the LoRA it starts from."""
    photo = person_photos()[0]
    face = faces.largest(photo)
    options = replace(OPTIONS, **changes)  # type: ignore[arg-type]
    trainer = LoraTrainer(
        tiny_family(), TrainingImages([photo], options.resolution, False), options, seed, "cpu"
    )
    trainer.train_step(1)  # a LoRA whose up factors are not zero, as a merged one
    validator = Validator(
        trainer.family, faces, [photo], [face], faces.embed(photo, [face]), options, seed, "cpu"
    )
    tuner = IdentityRewardTuner(trainer, validator, options, seed, folder, reward=reward)
    return tuner, trainer.lora("merged")


def _same(a: LoraWeights, b: LoraWeights) -> bool:
    return all(
        torch.equal(x.up, y.up) and torch.equal(x.down, y.down)
        for x, y in zip(a.layers, b.layers, strict=True)
    )


def _rising() -> Reward:
    """A reward that only grows with each call: the evaluation after beats the one before."""
    calls = iter(range(10_000))
    return lambda image, index: float(next(calls))


def test_the_same_seed_gives_the_same_stage_and_a_stopped_stage_resumes_to_it(
    faces: FaceAnalyzer, tmp_path: Path
) -> None:
    # Every run starts from this one merged LoRA: the training step that made it is reproducible
    # only to float noise across fresh trainers (Adam's first step on near-zero gradients
    # amplifies it; seen 3.5e-5 between a process's first trainer and its second).
    tuner, merged = _tuner(faces, tmp_path / "whole", reward=_rising())
    whole, report = tuner.run(merged)
    assert report.kept == "tuned" and len(report.iterations) == 2 and report.stopped_by == "iterations"
    assert not _same(whole, merged)  # the UNet's LoRA moved...
    unet = [layer for layer in whole.layers if layer.target == "unet"]
    text = {layer.module: layer for layer in merged.layers if layer.target == "text_encoder"}
    assert unet and all(  # ...and the text encoder's stayed as merged
        torch.equal(layer.up, text[layer.module].up)
        for layer in whole.layers
        if layer.target == "text_encoder"
    )
    again, _ = _tuner(faces, tmp_path / "again", reward=_rising())[0].run(merged)
    assert _same(again, whole)  # determinism by seed
    other, _ = _tuner(faces, tmp_path / "other", seed=2, reward=_rising(), reward_iterations=1)[0].run(merged)
    assert not _same(other, whole)

    # Killed after its first iteration: a fresh tuner (a restarted trainer) resumes from reward/.
    stopped, _ = _tuner(faces, tmp_path / "stopped", reward=_rising())
    checks = iter(range(100))  # iteration 1: the loop's check, then one per template
    stopped.raise_if_stopped = lambda: (
        None if next(checks) < 2 else (_ for _ in ()).throw(Cancelled("killed"))
    )
    with pytest.raises(Cancelled):
        stopped.run(merged)
    state = (tmp_path / "stopped" / "reward" / "reward.json").read_text()
    assert '"iteration": 1' in state and '"iteration": 2' not in state
    resumed_tuner, _ = _tuner(faces, tmp_path / "stopped", reward=_rising())
    resumed, resumed_report = resumed_tuner.run(merged)
    assert _same(resumed, whole)
    assert [r["iteration"] for r in resumed_report.iterations] == [1, 2]  # both recorded


def test_the_pre_rl_lora_is_kept_unless_the_reward_rose(faces: FaceAnalyzer, tmp_path: Path) -> None:
    tuner, merged = _tuner(faces, tmp_path, reward=lambda image, index: 0.5, reward_iterations=1)
    kept, report = tuner.run(merged)
    assert kept is merged and report.kept == "pre_rl"
    assert report.before == report.after == 0.5
    assert report.progress() == {"before": 0.5, "mean_rewards": [0.5], "kept": "pre_rl", "after": 0.5}


def test_the_identity_score_is_the_default_reward_and_progress_comes_per_iteration(
    faces: FaceAnalyzer, tmp_path: Path
) -> None:
    tuner, merged = _tuner(faces, tmp_path, reward_iterations=1)
    seen: list[RewardReport] = []
    tuner.on_iteration = seen.append
    lora, report = tuner.run(merged)
    assert [len(r.iterations) for r in seen] == [1] and seen[0].kept == ""
    scores = [report.before, report.after, *(r["mean_reward"] for r in report.iterations)]
    assert all(-1.0 <= score <= 1.0 for score in scores)  # cosines of face embeddings
    assert report.kept == ("tuned" if report.after > report.before else "pre_rl")
    assert _same(lora, merged) == (report.kept == "pre_rl")


def test_the_time_bound_stops_the_stage_between_iterations(faces: FaceAnalyzer, tmp_path: Path) -> None:
    ticks = iter(np.arange(0, 1e6, 1000.0))
    tuner, merged = _tuner(faces, tmp_path, reward=_rising(), reward_iterations=5, reward_max_seconds=10.0)
    tuner.clock = lambda: float(next(ticks))  # every reading 1000 s after the one before
    _, report = tuner.run(merged)
    assert report.stopped_by == "time" and len(report.iterations) == 1
