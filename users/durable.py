"""Files that survive a crash: written whole under a temporary name, fsynced, renamed into place,
and their folder fsynced, so a reader or a restart sees the old file or the whole new one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def flush_to_disk(*paths: Path) -> None:
    """fsyncs files, and directories so that renames in them last: after a power loss each file
    written before is whole on disk, not the empty file some filesystems leave behind."""
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def replace_durably(temporary: Path, path: Path) -> None:
    """Renames a fully written ``temporary`` onto ``path``: readers, and a restart after a crash,
    see the old file or the whole new one, never a part."""
    flush_to_disk(temporary)
    os.replace(temporary, path)
    flush_to_disk(path.parent)


def write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    replace_durably(temporary, path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
