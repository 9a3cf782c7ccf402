"""``easyphoto faces``: JSON lines per face, stderr for photos without one, --compare."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from easyphoto.cli.faces import compare_faces, list_faces
from easyphoto.engines.faces.detect import FaceAnalyzer
from easyphoto.fixtures.photos import sample_path, sample_photo
from easyphoto.imaging.codec import encode_png


@pytest.fixture
def photos(tmp_path: Path) -> dict[str, str]:
    paths = {}
    for name in ("astronaut", "coffee"):
        path = tmp_path / f"{name}.png"
        path.write_bytes(encode_png(sample_photo(name)))
        paths[name] = str(path)
    mirrored = tmp_path / "mirrored.png"
    mirrored.write_bytes(encode_png(np.ascontiguousarray(sample_photo("astronaut")[:, ::-1])))
    paths["mirrored"] = str(mirrored)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    paths["broken"] = str(tmp_path / "broken.jpg")
    paths["group"] = str(sample_path("group"))
    return paths


def test_faces_prints_one_json_line_per_face(faces: FaceAnalyzer, photos: dict[str, str], capsys) -> None:  # type: ignore[no-untyped-def]
    assert list_faces([photos["group"], photos["coffee"]], faces) == 0
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 6 and {line["image"] for line in lines} == {photos["group"]}
    assert all(len(line["box"]) == 4 and len(line["landmarks"]) == 5 for line in lines)
    assert "coffee.png: no face found" in err


def test_faces_reports_unreadable_photo(faces: FaceAnalyzer, photos: dict[str, str], capsys) -> None:  # type: ignore[no-untyped-def]
    assert list_faces([photos["broken"]], faces) == 1
    assert "not a readable image" in capsys.readouterr().err


def test_compare_scores_same_person_above_other(faces: FaceAnalyzer, photos: dict[str, str], capsys) -> None:  # type: ignore[no-untyped-def]
    assert compare_faces(photos["astronaut"], photos["mirrored"], faces) == 0
    same = json.loads(capsys.readouterr().out)["similarity"]
    assert compare_faces(photos["astronaut"], photos["group"], faces) == 0
    other = json.loads(capsys.readouterr().out)["similarity"]
    assert same > other
    assert compare_faces(photos["astronaut"], photos["coffee"], faces) == 1
    assert "no face found" in capsys.readouterr().err
