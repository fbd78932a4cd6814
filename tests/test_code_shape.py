"""The package's shape rules that can be measured: no function over 80 lines; the model never
imports the data package or the training loop."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sctd_dist"
MAX_LINES = 80


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_is_longer_than_80_lines():
    long = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted(PACKAGE.rglob("*.py")) for node in _functions(path)
            if node.end_lineno - node.lineno + 1 > MAX_LINES]
    assert long == []
    assert sum(1 for _ in _functions(PACKAGE / "run.py")) > 5  # the walk sees the functions


def test_the_model_imports_neither_the_data_package_nor_the_loop():
    banned = ("sctd_dist.data", "sctd_dist.train", "sctd_dist.run", "sctd_dist.checkpoint")
    found = []
    for path in sorted((PACKAGE / "model").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.name}: {n}" for n in names if n.startswith(banned)]
    assert found == []
