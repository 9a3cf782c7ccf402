"""Reading a user's published artifacts (the trainer writes them; see ARCHITECTURE.md).

Layout under the data root: ``users/<user_id>/v<N>/`` holding ``lora.safetensors``,
``face_id.png`` (the best validation image), ``reference.png`` (the "roop" photo) and
``meta.json``; ``users/<user_id>/CURRENT`` names the published version. Versions are published by
atomic rename, so a reader sees a whole version or none.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from easyphoto.engines.errors import InvalidArgument, UnknownUser, UserNotReady
from easyphoto.engines.imaging import decode_image

USER_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


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
        return self.directory / "lora.safetensors"


def check_user_id(user_id: str, field_name: str) -> None:
    if not USER_ID.match(user_id):
        raise InvalidArgument(f"user id {user_id!r} must match {USER_ID.pattern}", field=field_name)


class UserStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def user_dir(self, user_id: str) -> Path:
        return self.root / "users" / user_id

    def current_version(self, user_id: str) -> int | None:
        pointer = self.user_dir(user_id) / "CURRENT"
        return int(pointer.read_text().strip()) if pointer.is_file() else None

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
