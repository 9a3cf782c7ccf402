"""The demo job end to end (small size and step count), and the CLI around it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from easyphoto.cli.demo import RANDOM_WEIGHTS_NOTE, run_demo
from easyphoto.cli.main import main
from easyphoto.trainer.options import TrainingOptions

QUICK_TRAINING = TrainingOptions(
    rank=4, alpha=4.0, resolution=64, steps_per_photo=1, max_train_steps=2, gradient_accumulation_steps=1,
    validation_interval=2, validation_steps=2, validation_templates=1, seed=0,
)  # fmt: skip


def test_demo_trains_a_user_and_generates_one_and_two_person_templates(tmp_path: Path) -> None:
    lines: list[str] = []
    result = run_demo(tmp_path, steps=4, training=QUICK_TRAINING, say=lines.append)
    assert result.training["version"] == 1 and result.training["kept_photos"] == 4
    assert (tmp_path / "data" / "users" / "demo" / "v1" / "lora.safetensors").is_file()
    for name, faces in (("one_person", 1), ("two_person", 2)):
        scores = result.generations[name]["scores"]
        assert len(scores) == faces and all(-1 <= s <= 1 for s in scores)  # type: ignore[operator]
        sheet = np.asarray(Image.open(tmp_path / f"{name}_stages.png"))
        assert sheet.shape[0] > (1 + faces) * 160  # banner, the template row, one row per face
        assert (tmp_path / f"{name}.png").is_file()
    assert "seam_pass" in result.generations["two_person"]["seconds"]  # type: ignore[operator]
    assert "seam_pass" not in result.generations["one_person"]["seconds"]  # type: ignore[operator]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["is_random"] is True and summary["model"] == "tiny"
    assert "RANDOM" in RANDOM_WEIGHTS_NOTE and any("training user" in line for line in lines)


def test_models_command_prints_manifest(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["models", "--models", "tiny"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["is_random"] is True
    assert manifest["roles"]["unet"]["inputs"][0]["name"] == "sample"
    assert len(manifest["roles"]["unet"]["inputs"]) == 3 + 13


def test_the_demo_never_deletes_other_users_data(tmp_path: Path) -> None:
    alice = tmp_path / "data" / "users" / "alice" / "v1"
    alice.mkdir(parents=True)
    with pytest.raises(ValueError, match="alice"):
        run_demo(tmp_path, steps=4, training=QUICK_TRAINING, say=lambda line: None)
    assert alice.is_dir()
    assert main(["demo", "--out", str(tmp_path), "--steps", "4"]) == 2
    assert alice.is_dir()
