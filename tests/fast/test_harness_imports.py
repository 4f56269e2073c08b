"""tests/ and bench/ start their servers, daemons and load through one harness package and
never import each other; the harness imports neither.

Fast tier: pure logic in-process (`PY -m pytest tests/fast`).
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def imported(path: Path) -> set[str]:
    """The top-level packages a file imports (relative imports stay in their package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_tests_and_bench_share_the_harness_and_never_import_each_other():
    rules = {"harness": {"tests", "bench"}, "bench": {"tests"}, "tests": {"bench"}}
    crossings = [f"{path.relative_to(REPO)} imports {sorted(imported(path) & forbidden)}"
                 for folder, forbidden in rules.items()
                 for path in sorted((REPO / folder).rglob("*.py"))
                 if imported(path) & forbidden]
    assert crossings == []
