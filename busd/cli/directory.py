"""`agent-bus agents` and `agent-bus health`: who is registered, and is the bus up."""
from __future__ import annotations

import argparse
import time

from ..jqtext import dumps
from . import EXIT_OK, Env, command, db_option
from .discovery import ask

AGENT_COLUMNS = (("NAME", "name"), ("ONLINE", "online"), ("LAST SEEN", "last_seen"),
                 ("PENDING", "pending"), ("ROLE", "role"), ("IDENTITY", "identity"))


def register(commands: argparse._SubParsersAction) -> None:
    db_option(command(commands, "agents", _agents), "read the roster")

    command(commands, "health", _health)


def agents_table(agents: list) -> str:
    """Aligned columns; bin/bus-agents prints the same bytes."""
    rows = [[title for title, _ in AGENT_COLUMNS]]
    rows += [[_cell(agent.get(field), field) for _, field in AGENT_COLUMNS] for agent in agents]
    widths = [max(len(row[i]) for row in rows) for i in range(len(AGENT_COLUMNS) - 1)]
    lines = ["  ".join([cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]])
             for row in rows]
    return "".join(line + "\n" for line in lines)


def _cell(value: object, field: str) -> str:
    if value is None or value == "" or value == {}:
        return "-"
    if field == "online":
        return "yes" if value else "no"
    if field == "last_seen" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value))
    if field == "pending" and isinstance(value, dict):
        return ",".join(f"{channel}:{count}" for channel, count in value.items())
    # One agent, one line: a free-text identity may hold line breaks or tabs.
    return str(value).replace("\n", " ").replace("\r", " ").replace("\t", " ")


def _agents(args: argparse.Namespace, env: Env) -> int:
    """who is on the bus, and who can receive right now

    Print the bus's roster (GET /agents) as a table: name, online (a parked long-poll or
    contact within the last minute), last contact (UTC), messages waiting per channel
    (admins), role and identity. Empty cells show '-'."""
    print(agents_table(ask(args, env, lambda source: source.agents())), end="", flush=True)
    return EXIT_OK


def _health(args: argparse.Namespace, env: Env) -> int:
    """ask whether the bus is up

    Print the bus's health (GET /healthz) as JSON. Exits 3 when the bus cannot be reached or
    fails."""
    print(dumps(env.client().healthz()), flush=True)
    return EXIT_OK
