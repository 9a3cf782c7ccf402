"""The package layout: every folder ships, and dependencies point one way."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What each package may import of ours: dependencies point one way, from the services down to rpc.
# rpc (errors, gRPC plumbing) <- imaging <- engines <- diffusion, users <- server, trainer <- cli;
# export writes what engines load; fixtures serve tests, the demo and benchmarks.
ALLOWED = {
    "rpc": {"easyphoto.rpc"},
    "imaging": {"easyphoto.imaging", "easyphoto.rpc"},
    "engines": {"easyphoto.engines", "easyphoto.imaging", "easyphoto.rpc"},
    "users": {"easyphoto.users", "easyphoto.imaging", "easyphoto.rpc"},
    "diffusion": {"easyphoto.diffusion", "easyphoto.engines", "easyphoto.imaging", "easyphoto.rpc"},
    "fixtures": {"easyphoto.fixtures", "easyphoto.engines", "easyphoto.imaging", "easyphoto.users"},
    "export": {"easyphoto.export", "easyphoto.diffusion", "easyphoto.engines", "easyphoto.rpc"},
    "server": {
        "easyphoto.server", "easyphoto.diffusion", "easyphoto.engines", "easyphoto.users",
        "easyphoto.imaging", "easyphoto.rpc", "easyphoto.fixtures", "easyphoto.v1",
    },
    "trainer": {
        "easyphoto.trainer", "easyphoto.diffusion", "easyphoto.engines", "easyphoto.users",
        "easyphoto.imaging", "easyphoto.rpc", "easyphoto.v1",
    },
}  # fmt: skip


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


def test_every_package_has_a_dependency_rule() -> None:
    folders = set(_config()["package-dir"].values())
    unruled = folders - set(ALLOWED) - {"cli", "proto/easyphoto/v1"}  # cli may import everything
    assert not unruled, f"{sorted(unruled)} need an entry in ALLOWED"
