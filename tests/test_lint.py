"""The tree is ruff clean (pyflakes and import order, pyproject's [tool.ruff]): part of the test command."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str] | None:
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    found = shutil.which("ruff")
    return [found] if found else None


@pytest.mark.skipif(_ruff() is None, reason="ruff not installed (pip install -e '.[test]')")
def test_ruff_is_clean():
    result = subprocess.run([*_ruff(), "check", "--no-cache", "--output-format", "concise", str(ROOT)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, "ruff check . (fix with: ruff check --fix .)\n" + result.stdout + result.stderr


# import name → distribution name, where they differ
DISTRIBUTION = {"skimage": "scikit-image", "yaml": "pyyaml"}


def _third_party_imports() -> set[str]:
    import ast

    names = set()
    for path in (ROOT / "cryopick").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("cryopick", "__future__")}


def test_every_third_party_import_is_declared_in_pyproject():
    import re

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    declared = {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in requirements}
    missing = {n for n in _third_party_imports() if DISTRIBUTION.get(n, n).lower() not in declared}
    assert not missing, f"imported by cryopick/ but not declared in pyproject.toml: {sorted(missing)}"
