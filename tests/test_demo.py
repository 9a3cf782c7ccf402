"""The demo job end to end (small size and step count), and the CLI around it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from easyphoto.cli.main import main
from easyphoto.server.demo import RANDOM_WEIGHTS_NOTE, run_demo


def test_demo_writes_sheet_and_marks_random_weights(tmp_path: Path) -> None:
    result = run_demo(tmp_path, size=64, steps=4)
    sheet = np.asarray(Image.open(result.sheet))
    assert sheet.shape[0] > 64 and sheet.shape[1] >= 7 * 64  # banner + seven captioned tiles
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["is_random"] is True and summary["model"] == "tiny"
    stages = {"load_models", "face_preprocessing", "encode_prompts", "first_diffusion"}
    assert set(summary["seconds"]) == stages
    assert "RANDOM" in RANDOM_WEIGHTS_NOTE


def test_models_command_prints_manifest(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["models", "--models", "tiny"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["is_random"] is True
    assert manifest["roles"]["unet"]["inputs"][0]["name"] == "sample"
    assert len(manifest["roles"]["unet"]["inputs"]) == 3 + 13
