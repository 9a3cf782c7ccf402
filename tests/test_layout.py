"""The package layout: every folder ships, and dependencies point one way."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What each package may import of ours (ARCHITECTURE.md): engines never imports the services.
ALLOWED = {
    "engines": {"easyphoto.engines"},
    "server": {"easyphoto.engines", "easyphoto.server", "easyphoto.v1"},
    "trainer": {"easyphoto.engines", "easyphoto.trainer", "easyphoto.v1"},
    "export": {"easyphoto.engines", "easyphoto.export"},
}


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_python_folder_is_a_listed_package() -> None:
    config = _config()
    listed = set(config["packages"])
    for package, folder in config["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            name = ".".join([package, *relative.parts])
            assert name in listed, f"{name} ({init.parent}) is missing from [tool.setuptools] packages"


def _our_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.startswith("easyphoto.")}


def test_dependencies_point_one_way() -> None:
    for folder, allowed in ALLOWED.items():
        for path in (ROOT / folder).rglob("*.py"):
            for name in _our_imports(path):
                assert any(name == a or name.startswith(a + ".") for a in allowed), f"{path} imports {name}"
