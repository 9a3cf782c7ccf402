"""Finding files that installed packages ship, without importing those packages (several import
torchvision, pkg_resources or network clients at import time)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


class PackageDataMissing(FileNotFoundError):
    pass


def package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PackageDataMissing(f"{package} is not installed; `make setup` installs it ({install_hint})")
    return Path(next(iter(spec.submodule_search_locations)))
