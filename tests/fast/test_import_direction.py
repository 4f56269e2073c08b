"""Imports run one way (docs/architecture.md), read from the source with ast.

Each module of busd/ belongs to a layer and may import only from the layers the table
below allows; nothing below cli/ reads the environment or the command line; the store
knows no HTTP; the client side never reaches the database or the server.
"""
from __future__ import annotations

import ast
from pathlib import Path

BUSD = Path(__file__).resolve().parents[2] / "busd"

# Layer of each module (by its dotted name below busd, a package's modules by prefix).
LAYERS = {
    # what every side shares: pure rules and formats, no network, no database
    "base": ["model", "errors", "jqtext", "fileio", "framing", "receipts", "secretguard",
             "handoff", "signing", "notify", "logs", "metrics", "ratelimit", "agent_card",
             "waiters", "__init__"],
    "store": ["store", "store_core", "store_sql", "store_sqlite", "store_pg", "store_factory",
              "identity"],
    "server": ["roster", "service", "direct", "api", "server"],
    "client": ["client", "receive", "listener"],
    "agent": ["agent"],
    "mailbox": ["mailbox", "mcp_server", "hooks"],
    "cli": ["cli", "__main__", "cli_hook"],
}
ALLOWED = {
    "base": {"base"},
    "store": {"base", "store"},
    "server": {"base", "store", "server"},
    "client": {"base", "client"},
    "agent": {"base", "client", "agent"},
    "mailbox": {"base", "client", "agent", "mailbox"},
    "cli": set(LAYERS),
}
HTTP_MODULES = {"aiohttp", "requests", "urllib3", "http", "urllib.request", "httpx"}


def layer_of(module: str) -> str:
    first = module.split(".")[0]
    for layer, names in LAYERS.items():
        if module in names or first in names:
            return layer
    raise AssertionError(f"busd.{module} belongs to no layer: add it to LAYERS here and to "
                         "docs/architecture.md")


def sources():
    for path in sorted(BUSD.rglob("*.py")):
        parts = path.relative_to(BUSD).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)
        yield module, path, ast.parse(path.read_text(), str(path))


def imports(module: str, path: Path, tree: ast.Module):
    """(line, 'busd.x.y' or an outside module name) for every import in the file."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                yield node.lineno, node.module or ""
                continue
            base = package[:len(package) - node.level + 1]
            if node.module:
                yield node.lineno, "busd." + ".".join(base + node.module.split("."))
            else:  # from . import a, b: each name may be a module
                for alias in node.names:
                    yield node.lineno, "busd." + ".".join(base + [alias.name])


def test_every_import_runs_the_allowed_way():
    wrong = []
    for module, path, tree in sources():
        layer = layer_of(module)
        for line, target in imports(module, path, tree):
            if not target.startswith("busd.") or target == "busd.__version__":
                continue
            inner = target[len("busd."):]
            if inner.split(".")[0] == module.split(".")[0] and layer != "cli":
                continue  # within one package or module
            try:
                target_layer = layer_of(inner)
            except AssertionError:
                continue  # a name imported from a package (from .. import __version__)
            if target_layer not in ALLOWED[layer]:
                wrong.append(f"busd/{path.relative_to(BUSD)}:{line}: {layer} imports {target} "
                             f"({target_layer})")
    assert not wrong, "imports against the direction:\n" + "\n".join(wrong)


def test_nothing_below_the_cli_reads_the_environment_or_the_command_line():
    wrong = []
    for module, path, tree in sources():
        if layer_of(module) == "cli":
            continue
        for node in ast.walk(tree):
            name = None
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                name = f"{node.value.id}.{node.attr}"
            if name in ("os.environ", "os.getenv", "os.environb", "sys.argv", "os.putenv"):
                wrong.append(f"busd/{path.relative_to(BUSD)}:{node.lineno}: {name}")
            if isinstance(node, ast.ImportFrom) and node.module in ("os", "sys") and any(
                    a.name in ("environ", "getenv", "argv") for a in node.names):
                wrong.append(f"busd/{path.relative_to(BUSD)}:{node.lineno}: imports from {node.module}")
        for line, target in imports(module, path, tree):
            if target in ("argparse", "getopt", "optparse"):
                wrong.append(f"busd/{path.relative_to(BUSD)}:{line}: parses arguments ({target})")
    assert not wrong, "configuration must arrive as values:\n" + "\n".join(wrong)


def test_the_store_knows_no_http_and_the_client_side_no_database():
    wrong = []
    for module, path, tree in sources():
        layer = layer_of(module)
        for line, target in imports(module, path, tree):
            top = target.split(".")[0]
            if layer in ("base", "store") and (top in HTTP_MODULES or target in HTTP_MODULES):
                wrong.append(f"busd/{path.relative_to(BUSD)}:{line}: {layer} imports {target}")
            if layer in ("client", "agent", "mailbox") and top in ("sqlite3", "psycopg",
                                                                  "psycopg_pool", "aiohttp"):
                wrong.append(f"busd/{path.relative_to(BUSD)}:{line}: {layer} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_layers_cover_every_module():
    for module, _, _ in sources():
        layer_of(module)
