"""The dependency rule: serving and indexing never import torch or the training package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"torch", "training", "safetensors", "timm", "transformers", "sentence_transformers"}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", ["service", "index_builder"])
def test_no_torch_or_training_in_source(package):
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported_roots(path) & FORBIDDEN)
        for path in (ROOT / package).rglob("*.py")
        if _imported_roots(path) & FORBIDDEN
    }
    assert offenders == {}


def test_importing_serving_side_loads_no_torch():
    code = (
        "import sys, importlib, pkgutil\n"
        "import service, index_builder\n"
        "for pkg in (service, index_builder):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(m.name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_top_level_layout():
    for name in (
        "pyproject.toml",
        "README.md",
        "Dockerfile",
        "service",
        "training",
        "index_builder",
        "tests",
        "deploy",
    ):
        assert (ROOT / name).exists(), name
