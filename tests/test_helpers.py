"""The test helpers keep their contracts: the float64 oracle is independent of the package it
checks (it imports torch only), and no test module imports another test module."""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module or "")
    return names


def test_oracle_imports_torch_only():
    assert _imports(TESTS / "helpers" / "oracle.py") <= {"__future__", "torch"}


def test_no_test_module_imports_a_test_module():
    for path in TESTS.rglob("*.py"):
        bad = sorted(n for n in _imports(path) if n.split(".")[-1].startswith("test_") or n.startswith("tests"))
        assert not bad, f"{path.relative_to(TESTS)} imports {bad}: shared code belongs in tests/helpers/"
