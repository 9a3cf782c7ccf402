"""``easyphoto faces``: check photos and templates before training or generating."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from easyphoto.engines.backends.torch_backend import TorchBackend
from easyphoto.engines.faces.detect import FaceAnalyzer
from easyphoto.engines.faces.models import load_face_models
from easyphoto.imaging.codec import decode_image
from easyphoto.rpc.errors import EasyPhotoError


def default_analyzer(pack: Path | None = None) -> FaceAnalyzer:
    models = load_face_models(pack)
    return models.analyzer(TorchBackend(faces=models))


def list_faces(paths: list[str], analyzer: FaceAnalyzer | None = None) -> int:
    """One JSON line per face; a line on stderr for a photo with none. Exit 1 if any photo failed."""
    analyzer = analyzer or default_analyzer()
    failed = False
    for path in paths:
        try:
            image = decode_image(Path(path).read_bytes(), field=path)
        except (OSError, EasyPhotoError) as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            failed = True
            continue
        faces = analyzer.detect(image)
        if not faces:
            print(f"{path}: no face found", file=sys.stderr)
        for face in faces:
            print(json.dumps({"image": path, **face.to_json()}))
    return 1 if failed else 0


def compare_faces(first: str, second: str, analyzer: FaceAnalyzer | None = None) -> int:
    """``{"similarity": s}``: cosine of the largest face of each photo."""
    analyzer = analyzer or default_analyzer()
    embeddings = []
    for path in (first, second):
        try:
            image = decode_image(Path(path).read_bytes(), field=path)
            embeddings.append(analyzer.embed(image, [analyzer.largest(image, field=path)])[0])
        except (OSError, EasyPhotoError) as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            return 1
    print(json.dumps({"similarity": round(analyzer.similarity(*embeddings), 4)}))
    return 0
