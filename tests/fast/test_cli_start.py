"""The commands agents and hooks run often start fast: `agent-bus --version`, `drop` and
`inbox` import no HTTP library, no database driver, no store and not `typing`
(bench/bench_cli_start.py times them), and every command is found through
cli.COMMAND_MODULES, which imports only the module that registers it."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from busd.cli import COMMAND_MODULES, build_parser

REPO = Path(__file__).resolve().parents[2]
# What these commands must not import: each costs milliseconds, some tens, at every start.
HEAVY = ("requests", "aiohttp", "psycopg", "psycopg_pool", "cryptography", "asyncio",
         "prometheus_client", "busd.store", "busd.store_core", "busd.store_sqlite",
         "busd.store_pg", "busd.store_factory", "busd.server", "busd.direct", "busd.service",
         "busd.client",
         # Lighter, but these commands are a few milliseconds over their goal with them:
         # typing (~3 ms; the modules they import take it only for annotations),
         # busd.receipts (only `send --wait` and the MCP server follow receipt states) and
         # shutil (~3 ms; argparse's help formatter asks it the terminal's width, which
         # cli.build_parser leaves until help or an error is shown).
         "typing", "busd.receipts", "shutil")
# Runs the CLI as the entry point does, then prints the modules it imported.
PROBE = ("import json, sys\nfrom busd.cli import main\ntry:\n    main(sys.argv[1:])\n"
         "except SystemExit:\n    pass\nprint(json.dumps(sorted(sys.modules)))\n")


def commands_of(parser: argparse.ArgumentParser) -> list[str]:
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(subparsers.choices)


def test_every_command_is_in_the_table_of_the_module_that_registers_it():
    assert commands_of(build_parser()) == list(COMMAND_MODULES)
    for command in COMMAND_MODULES:
        assert command in commands_of(build_parser(command)), command


@pytest.mark.parametrize("args, stdin", [
    (["--version"], b""),
    (["drop", "peer"], b"hello"),
    (["inbox"], b""),
    (["inbox", "--read", "1"], b""),  # an error path: no such message
])
def test_the_quick_commands_import_nothing_heavy(tmp_path, args, stdin):
    env = {**os.environ, "PYTHONPATH": str(REPO), "AGENT_BUS_SPOOL": str(tmp_path),
           "AGENT_NAME": "reader", "AGENT_BUS_URL": "http://127.0.0.1:9"}
    done = subprocess.run([sys.executable, "-c", PROBE, *args], input=stdin,
                          capture_output=True, env=env, timeout=30)
    modules = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert "busd.cli" in modules
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY or m in HEAVY)
    assert heavy == [], f"agent-bus {' '.join(args)} imports {heavy}"


@pytest.mark.parametrize("args", [["-h"], ["drop", "-h"], ["inbox", "-h"], ["token", "create", "-h"]])
def test_help_still_fits_the_terminal(args):
    # The parsers are built without asking the terminal's width; help must still ask it.
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "50"}
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True,
                          env=env, timeout=30)
    shown = done.stdout.decode().splitlines()[:-1]   # the last line: the probe's modules
    assert len(shown) > 3, done.stdout.decode()
    # argparse's own usage lines may pass the width by a few characters; unwrapped help
    # (at the width the parsers were built with) would be a line of hundreds.
    assert max(len(line) for line in shown) <= 60, "\n".join(shown)
