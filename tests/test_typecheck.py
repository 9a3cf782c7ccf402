"""``make lint``'s type check follows types across packages: a call in ``server`` that breaks an
``engines`` signature fails it (it passed silently while ``easyphoto.*`` imports did not resolve)."""

from __future__ import annotations

from pathlib import Path

from typecheck import package_dirs, type_check

PROBE = """\
from easyphoto.engines.shapes import Dim


def latent_height() -> int:
    return Dim("latent_height").resolve({ARGUMENT})
"""


def _check_probe(tmp_path: Path, name: str, argument: str) -> tuple[int, str]:
    """A ``server`` package with one more module, type-checked the way ``make lint`` does, in one
    tree for every probe (mypy's cache there spares the second the libraries' analysis)."""
    packages = package_dirs()
    server = tmp_path / name / "server"
    server.mkdir(parents=True)
    for path in packages["easyphoto.server"].glob("*.py"):
        (server / path.name).symlink_to(path)
    (server / "probe.py").write_text(PROBE.replace("{ARGUMENT}", argument))
    probed = {**packages, "easyphoto.server": server}
    result = type_check(probed, tmp_path / "tree", ["easyphoto.server.probe"])
    return result.returncode, result.stdout


def test_a_cross_package_type_error_fails_the_type_check(tmp_path: Path) -> None:
    code, report = _check_probe(tmp_path, "bad", "3")  # resolve takes the symbols' values, a dict
    assert code == 1, report
    assert 'Argument 1 to "resolve" of "Dim" has incompatible type "int"' in report, report
    code, report = _check_probe(tmp_path, "good", '{"latent_height": 3}')
    assert code == 0, report
