"""User artifacts on disk: the trainer publishes them, the orchestrator reads them.

Layout under the data root: ``users/<user_id>/v<N>/`` holding ``lora.safetensors`` (peft keys),
``face_id.png`` (the best validation image), ``reference.png`` (the "roop" photo),
``embeddings.npy``, ``report.json`` and ``meta.json`` (with the face geometry of both images);
``users/<user_id>/CURRENT`` names the published version. A version is written under a hidden
temporary name and renamed into place, and ``CURRENT`` is replaced atomically, so a reader sees a
whole version or none. Version numbers are never reused, even after the user is deleted
(``version-counters/<user_id>`` keeps the last one), so a cache keyed by (user, version) cannot
serve a deleted identity. A user's versions change under ``locks/<user_id>`` (``flock``, removed
with the user), so processes sharing the root (trainer replicas, the serving side's admin calls)
take turns, and a job publishes at most one version even when two replicas both believe they own it.

``training/<user_id>/<job_id>`` marks a training job that is queued or running: the trainer writes
it at submission and removes it when the job publishes, fails or is cancelled. Every orchestrator
replica reading the same root can so tell a user still training from an unknown one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from easyphoto.imaging.codec import decode_image
from easyphoto.imaging.geometry import Face
from easyphoto.rpc.errors import InvalidArgument, UnknownUser, UserNotReady
from easyphoto.rpc.tenants import TENANT_NAME

from .durable import fsync_tree, sha256_file, write_atomically

USER_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
TENANT_SEPARATOR = "+"  # in no user id and no tenant name


VERSION = re.compile(r"^v(\d+)$")


LORA_FILE = "lora.safetensors"


def adapter_prefix(user_id: str) -> str:
    """How every adapter name of ``user_id``'s versions begins (``user@v``; see adapter_name)."""
    return f"{user_id}@v"


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

    @property
    def adapter_name(self) -> str:
        """What serving calls this version's LoRA (its adapters, their factor files): ``user@vN``."""
        return f"{adapter_prefix(self.user_id)}{self.version}"

    @property
    def lora_sha256(self) -> str:
        """Recorded at publish time; hashed here only for versions published before that."""
        recorded = self.meta.get("lora_sha256")
        if recorded:
            return str(recorded)
        return sha256_file(self.lora_path) if self.lora_path.is_file() else ""

    def face(self, image: str) -> Face | None:
        """The face the trainer recorded for ``face_id`` or ``reference`` (None: detect it)."""
        recorded = self.meta.get("faces", {}).get(image)
        return Face.from_json(recorded) if recorded else None


def default_data_root() -> Path:
    """Where user artifacts and jobs live (``$EASYPHOTO_DATA`` or ``~/.local/share/easyphoto``)."""
    return Path(os.environ.get("EASYPHOTO_DATA", Path.home() / ".local" / "share" / "easyphoto"))


def check_user_id(user_id: str, field_name: str) -> None:
    """A user id as a client names it (its tenant's namespace is added by ``users.namespace``)."""
    # A leading dot is reserved for the store's own hidden folders.
    if not USER_ID.match(user_id) or user_id.startswith("."):
        raise InvalidArgument(
            f"user id {user_id!r} must match {USER_ID.pattern} and not start with '.'", field=field_name
        )


def split_stored_id(user_id: str) -> tuple[str, str]:
    """A stored id's tenant ("" for the open server's users) and the id its tenant's clients use."""
    tenant, _, own = user_id.rpartition(TENANT_SEPARATOR)
    return tenant, own


def check_stored_id(user_id: str, field_name: str) -> None:
    """A user id as the store keeps it: ``tenant+id`` for a named tenant's user, else the id."""
    tenant, own = split_stored_id(user_id)
    if TENANT_SEPARATOR in user_id and not TENANT_NAME.match(tenant):
        raise InvalidArgument(f"user id {user_id!r} names no tenant", field=field_name)
    check_user_id(own, field_name)


class UserStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def adapter_dir(self) -> Path:
        """Where serving keeps users' adapter factors for the engines to read (derived from the
        published LoRAs, named ``user@vN.<target>.npz``; removed with the user)."""
        return self.root / "adapters"

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
        if not users.is_dir():
            return []
        return sorted(p.name for p in users.iterdir() if p.is_dir() and not p.name.startswith("."))

    def mark_training(self, user_id: str, job_id: str) -> None:
        """Records that ``job_id`` trains ``user_id`` (queued or running)."""
        check_stored_id(user_id, "user_id")
        folder = self.root / "training" / user_id
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(folder / job_id, json.dumps({"job_id": job_id}).encode())

    def unmark_training(self, user_id: str, job_id: str) -> None:
        """The job has ended (published, failed or cancelled); safe to call more than once."""
        folder = self.root / "training" / user_id
        (folder / job_id).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # another job of the user is still marked, or it is gone
            folder.rmdir()

    def training_jobs(self, user_id: str) -> list[str]:
        """The user's jobs marked queued or running."""
        folder = self.root / "training" / user_id
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))  # not half-written

    def training_mark_age(self, user_id: str, job_id: str) -> float:
        """Seconds since ``job_id``'s training mark was written (0 when there is none)."""
        mark = self.root / "training" / user_id / job_id
        return max(0.0, time.time() - mark.stat().st_mtime) if mark.is_file() else 0.0

    def marked_users(self) -> list[str]:
        folder = self.root / "training"
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def load(self, user_id: str, field_name: str = "user_ids") -> UserArtifacts:
        check_stored_id(user_id, field_name)
        directory = self.user_dir(user_id)
        version = self.current_version(user_id)
        if version is None:
            if jobs := self.training_jobs(user_id):
                raise UserNotReady(
                    f"user {user_id!r} has no published version yet: training job {jobs[0]} is queued"
                    " or running; retry when it has succeeded",
                    field=field_name,
                    metadata={"user_id": user_id, "job_id": jobs[0]},
                )
            if not directory.is_dir():
                raise UnknownUser(f"no user {user_id!r}", field=field_name)
            raise UserNotReady(f"user {user_id!r} has no published version", field=field_name)
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
        ``v<N>`` and then named by ``CURRENT``. Returns N. When ``meta["job_id"]`` already
        published a version, that version is named current and returned; ``write`` is not called."""
        check_stored_id(user_id, "user_id")
        directory = self.user_dir(user_id)
        with self._user_lock(user_id):
            directory.mkdir(parents=True, exist_ok=True)
            job_id = meta.get("job_id")
            if job_id and (published := self.version_of_job(user_id, str(job_id))) is not None:
                self._name_current_unless_newer(user_id, published)
                return published
            version = max([*self.versions(user_id), self._last_version(user_id)]) + 1
            # Counted before anything is written: a publisher killed after its rename and before
            # CURRENT, then a delete, must not let the next publish take the same number.
            self._counter(user_id).parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self._counter(user_id), str(version).encode())
            staging = directory / f".staging-v{version}-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            try:
                write(staging)
                lora = staging / LORA_FILE
                recorded = {**meta, "version": version}
                if lora.is_file():
                    recorded["lora_sha256"] = sha256_file(lora)
                (staging / "meta.json").write_text(json.dumps(recorded, indent=2))
                fsync_tree(staging)
                os.rename(staging, directory / f"v{version}")
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            self._name_current(user_id, version)
        return version

    def name_current(self, user_id: str, version: int) -> None:
        """Names ``version`` by ``CURRENT`` unless a newer one is named: a publish's last step,
        redone by a resumed job whose trainer stopped between the rename and the pointer."""
        with self._user_lock(user_id):
            self._name_current_unless_newer(user_id, version)

    @contextlib.contextmanager
    def _user_lock(self, user_id: str) -> Iterator[None]:
        """Exclusive use of ``user_id``'s versions among every thread and process on this root
        (each ``open`` is its own lock holder for ``flock``, so threads of one process wait too)."""
        path = self.root / "locks" / user_id
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            with path.open("a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                # A delete removes the file while holding it: who waited on it locks the new one.
                if _is_file_at(handle, path):
                    yield  # closing the file releases the lock, also when this process dies
                    return

    def _name_current_unless_newer(self, user_id: str, version: int) -> None:
        current = self.current_version(user_id)
        if current is None or current < version:
            self._name_current(user_id, version)

    def _name_current(self, user_id: str, version: int) -> None:
        write_atomically(self.user_dir(user_id) / "CURRENT", str(version).encode())

    def _counter(self, user_id: str) -> Path:
        return self.root / "version-counters" / user_id

    def _last_version(self, user_id: str) -> int:
        counter = self._counter(user_id)
        return int(counter.read_text().strip()) if counter.is_file() else 0

    def version_of_job(self, user_id: str, job_id: str) -> int | None:
        """The version that job ``job_id`` published, if any (a resumed job must not publish twice)."""
        for version in self.versions(user_id):
            meta_path = self.user_dir(user_id) / f"v{version}" / "meta.json"
            if meta_path.is_file() and json.loads(meta_path.read_text()).get("job_id") == job_id:
                return version
        return None

    def delete(self, user_id: str) -> int:
        """Removes every version of the user; returns how many there were."""
        check_stored_id(user_id, "user_id")
        if not self.user_dir(user_id).is_dir():  # asked before the lock, so an unknown id leaves no file
            raise UnknownUser(f"no user {user_id!r}", field="user_id")
        with self._user_lock(user_id):
            count = len(self.versions(user_id))
            if not self.user_dir(user_id).is_dir():
                raise UnknownUser(f"no user {user_id!r}", field="user_id")
            # Renamed first so that no reader sees a half-deleted user.
            doomed = self.root / "users" / f".deleting-{user_id}-{os.getpid()}"
            os.rename(self.user_dir(user_id), doomed)
            shutil.rmtree(doomed)
            # The factors serving derived from the LoRA must not outlive it.
            for derived in self.adapter_dir.glob(f"{adapter_prefix(user_id)}*"):
                derived.unlink(missing_ok=True)
            (self.root / "locks" / user_id).unlink()
        return count

    def clean_staging(self, older_than: float = 0.0) -> list[Path]:
        """Removes half-written versions left by a killed publisher (call at start-up); with
        ``older_than``, only those that old (another trainer may be publishing the rest)."""
        users = self.root / "users"
        found = [*users.glob("*/.staging-*"), *users.glob(".deleting-*")] if users.is_dir() else []
        leftovers = [path for path in found if time.time() - path.stat().st_mtime >= older_than]
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)
        return leftovers


def _is_file_at(handle: IO[str], path: Path) -> bool:
    """Whether the open ``handle`` is still the file named ``path`` (not removed or replaced)."""
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except FileNotFoundError:
        return False
