"""Every SQL statement in busd/ is written once (DESIGN: each query and migration is written
once for both stores; a dialect layer holds the differences).

Reads the source, not the running stores: every string constant (f-strings with their
{fields} kept) that holds SQL, split into statements and normalised the way a reader
would compare them: case, whitespace, placeholder style (`?`, `:name`, `%s`,
`%(name)s`) and MAX/GREATEST do not make two statements different.

Fast tier (`PY -m pytest tests/fast`).
"""
from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

BUSD = Path(__file__).resolve().parent.parent.parent / "busd"

STATEMENT = re.compile(r"(SELECT|INSERT INTO|UPDATE \w+ SET|DELETE FROM|CREATE (UNIQUE )?(TABLE|"
                       r"INDEX)|ALTER TABLE|WITH \w+ AS|BEGIN|COMMIT|ROLLBACK|PRAGMA|LISTEN)\b")


def strings(tree: ast.AST):
    """(line, text) of every string constant but docstrings; an f-string's fields as {source}."""
    skipped = {id(value) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr)
               for value in node.values}
    skipped |= {id(node.body[0].value) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                     ast.AsyncFunctionDef))
                and node.body and isinstance(node.body[0], ast.Expr)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in skipped:
            yield node.lineno, node.value
        elif isinstance(node, ast.JoinedStr):
            yield node.lineno, "".join(
                value.value if isinstance(value, ast.Constant)
                else "{" + ast.unparse(value.value) + "}" for value in node.values)


def normalised(statement: str) -> str:
    text = statement.lower()
    text = re.sub(r"%\(\w+\)s|%s|\?|(?<![:\w]):\w+", "?", text)
    text = re.sub(r"\bgreatest\(", "max(", text)
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r" ?([(),=<>]) ?", r"\1", text)


def statements() -> dict[str, list[str]]:
    """Normalised statement -> where it is written (file:line)."""
    found: dict[str, list[str]] = defaultdict(list)
    for path in sorted(BUSD.rglob("*.py")):
        for line, text in strings(ast.parse(path.read_text(), str(path))):
            for piece in re.sub(r"--[^\n]*", "", text).split(";"):
                if STATEMENT.match(piece.strip()):
                    found[normalised(piece)].append(f"{path.relative_to(BUSD)}:{line}")
    return found


def test_the_extractor_sees_the_stores_statements():
    found = statements()
    assert len(found) >= 50, len(found)
    assert normalised("SELECT value FROM meta WHERE key = %s") in found
    assert normalised("select VALUE from meta\n where key = ?") in found


def test_no_sql_statement_is_written_twice():
    repeated = {sql: places for sql, places in statements().items() if len(places) > 1}
    assert not repeated, "\n".join(f"{', '.join(places)}: {sql[:100]}"
                                   for sql, places in repeated.items())
