"""Folders of the model cache that are built once and then only read (the tiny family, the
tokenizer): each builder writes its own staging copy and renames it into place, so a reader never
sees a half-written folder and processes starting together on a cold cache do not collide."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path


def build_once(folder: Path, marker: str, write: Callable[[Path], None]) -> None:
    """``write`` fills a new folder that becomes ``folder`` unless ``folder/marker`` exists; the
    first rename wins and later builders drop their copy."""
    if (folder / marker).is_file():
        return
    staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(staging, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    write(staging)
    if folder.is_dir() and not (folder / marker).is_file():
        shutil.rmtree(folder, ignore_errors=True)  # left half-built by an older release
    try:
        staging.rename(folder)
    except OSError:  # another process's complete copy got there first
        shutil.rmtree(staging, ignore_errors=True)
