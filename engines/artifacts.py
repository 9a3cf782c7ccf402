"""User artifacts on disk: the trainer publishes them, the orchestrator reads them.

Layout under the data root: ``users/<user_id>/v<N>/`` holding ``lora.safetensors`` (peft keys),
``face_id.png`` (the best validation image), ``reference.png`` (the "roop" photo),
``embeddings.npy``, ``report.json`` and ``meta.json`` (with the face geometry of both images);
``users/<user_id>/CURRENT`` names the published version. A version is written under a hidden
temporary name and renamed into place, and ``CURRENT`` is replaced atomically, so a reader sees a
whole version or none.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InvalidArgument, UnknownUser, UserNotReady
from .faces.detect import Face
from .imaging import decode_image

USER_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
VERSION = re.compile(r"^v(\d+)$")
LORA_FILE = "lora.safetensors"


@dataclass
class UserArtifacts:
    user_id: str
    version: int
    directory: Path
    face_id: np.ndarray
    reference: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def lora_path(self) -> Path:
        return self.directory / LORA_FILE

    def face(self, image: str) -> Face | None:
        """The face the trainer recorded for ``face_id`` or ``reference`` (None: detect it)."""
        recorded = self.meta.get("faces", {}).get(image)
        return Face.from_json(recorded) if recorded else None


def default_data_root() -> Path:
    """Where user artifacts and jobs live (``$EASYPHOTO_DATA`` or ``~/.local/share/easyphoto``)."""
    return Path(os.environ.get("EASYPHOTO_DATA", Path.home() / ".local" / "share" / "easyphoto"))


def check_user_id(user_id: str, field_name: str) -> None:
    if not USER_ID.match(user_id) or user_id in (".", ".."):
        raise InvalidArgument(f"user id {user_id!r} must match {USER_ID.pattern}", field=field_name)


def write_atomically(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never a part."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


class UserStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._publish_lock = threading.Lock()

    def user_dir(self, user_id: str) -> Path:
        return self.root / "users" / user_id

    def current_version(self, user_id: str) -> int | None:
        pointer = self.user_dir(user_id) / "CURRENT"
        return int(pointer.read_text().strip()) if pointer.is_file() else None

    def versions(self, user_id: str) -> list[int]:
        directory = self.user_dir(user_id)
        if not directory.is_dir():
            return []
        return sorted(int(m.group(1)) for p in directory.iterdir() if (m := VERSION.match(p.name)))

    def user_ids(self) -> list[str]:
        users = self.root / "users"
        return sorted(p.name for p in users.iterdir() if p.is_dir()) if users.is_dir() else []

    def load(self, user_id: str, field_name: str = "user_ids") -> UserArtifacts:
        check_user_id(user_id, field_name)
        directory = self.user_dir(user_id)
        if not directory.is_dir():
            raise UnknownUser(f"no user {user_id!r}", field=field_name)
        version = self.current_version(user_id)
        if version is None:
            raise UserNotReady(
                f"user {user_id!r} has no published version yet (still training?)", field=field_name
            )
        folder = directory / f"v{version}"
        meta_path = folder / "meta.json"
        return UserArtifacts(
            user_id=user_id,
            version=version,
            directory=folder,
            face_id=decode_image((folder / "face_id.png").read_bytes(), field=f"{user_id}/face_id.png"),
            reference=decode_image((folder / "reference.png").read_bytes(), field=f"{user_id}/reference.png"),
            meta=json.loads(meta_path.read_text()) if meta_path.is_file() else {},
        )

    def publish(self, user_id: str, write: Callable[[Path], None], meta: dict[str, Any]) -> int:
        """Publishes a new version: ``write`` fills a temporary folder, which is renamed to
        ``v<N>`` and then named by ``CURRENT``. Returns N."""
        check_user_id(user_id, "user_id")
        directory = self.user_dir(user_id)
        directory.mkdir(parents=True, exist_ok=True)
        with self._publish_lock:
            version = max(self.versions(user_id), default=0) + 1
            staging = directory / f".staging-v{version}-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            try:
                write(staging)
                (staging / "meta.json").write_text(json.dumps({**meta, "version": version}, indent=2))
                _fsync_tree(staging)
                os.rename(staging, directory / f"v{version}")
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            write_atomically(directory / "CURRENT", str(version).encode())
        return version

    def delete(self, user_id: str) -> int:
        """Removes every version of the user; returns how many there were."""
        check_user_id(user_id, "user_id")
        count = len(self.versions(user_id))
        if not self.user_dir(user_id).is_dir():
            raise UnknownUser(f"no user {user_id!r}", field="user_id")
        shutil.rmtree(self.user_dir(user_id))
        return count

    def clean_staging(self) -> list[Path]:
        """Removes half-written versions left by a killed publisher (call at start-up)."""
        users = self.root / "users"
        leftovers = list(users.glob("*/.staging-*")) if users.is_dir() else []
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)
        return leftovers


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
