"""The type check of ``make lint``: mypy over every package, under the names it is imported by.

The editable install maps ``easyphoto.engines`` to ``engines/`` (and each other package to its
folder, ``[tool.setuptools] package-dir``) through an import hook, which mypy cannot follow: run on
the folders, it would see ``easyphoto.*`` imports as missing and check nothing across packages.
So the same mapping is made as a tree of links, ``build/typecheck/easyphoto/engines ->
engines/``, and mypy runs in that tree, where every ``easyphoto.*`` import is a file.

Run as ``python tests/typecheck.py`` (what ``make lint`` does); the tests call :func:`type_check`
on a tree with a deliberate error in it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "typecheck"


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """Each import package and its folder, as the install maps them."""
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: root / folder for name, folder in config["package-dir"].items()}


def link_tree(tree: Path, packages: dict[str, Path]) -> None:
    """``tree/easyphoto/<name>`` links to each package's folder (stale links are replaced)."""
    for name, folder in packages.items():
        link = tree.joinpath(*name.split("."))
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(folder, link.parent), target_is_directory=True)


def type_check(
    packages: dict[str, Path], tree: Path, modules: Sequence[str] = (), config: Path = ROOT / "pyproject.toml"
) -> subprocess.CompletedProcess[str]:
    """mypy with ``config`` over ``modules`` (default: every package but the generated API) as
    imported from ``tree``; the completed process, with mypy's report on stdout."""
    link_tree(tree, packages)
    names = list(modules) or [name for name in packages if name != "easyphoto.v1"]
    flag = "-m" if modules else "-p"
    args = [arg for name in names for arg in (flag, name)]
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), *args],
        cwd=tree,
        capture_output=True,
        text=True,
        check=False,
    )


def main() -> int:
    result = type_check(package_dirs(), TREE)
    print(result.stdout, end="")
    print(result.stderr, end="", file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
