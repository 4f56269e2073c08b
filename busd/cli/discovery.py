"""`agent-bus channels` and `agent-bus agent-card`: what is on the bus, printed as
el-ipc's commands of the same names print it (JSON, indented by two), in the bytes
`jq .` writes (bin/bus-channels and bin/bus-agent-card print the same).

Each command asks a source for the data and prints it here; the source is the bus over
HTTP (AGENT_BUS_URL), or with --db the bus's database itself (busd/direct.py), which
answers the same calls with the same shapes.
"""
from __future__ import annotations

import argparse
from typing import Protocol

from ..jqtext import dumps
from . import EXIT_OK, Env, command, db_option


class Source(Protocol):
    """What busd.client.BusClient (HTTP) and busd.direct.DirectBus (--db) both answer."""

    def messages(self, channel: str, agent: str, wait: bool = False) -> list:
        """GET /messages: el-ipc's read, which moves the agent's watermark."""

    def agents(self) -> list:
        """GET /agents: the roster."""

    def status(self, ids: list[int]) -> list:
        """GET /status: receipt states."""

    def channels(self) -> list:
        """GET /channels: [{"channel", "count", "last_message"}], newest first."""

    def agent_card(self) -> dict:
        """GET /.well-known/agent-card.json."""

    def close(self) -> None: ...


def register(commands: argparse._SubParsersAction) -> None:
    db_option(command(commands, "channels", _channels), "read them")

    db_option(command(commands, "agent-card", _agent_card),
              "make it (the card a server on this database would give)")


def ask(args: argparse.Namespace, env: Env, call, listen: bool = False) -> object:
    """`call(source)` on the bus (over HTTP, or straight on --db's database; `listen`:
    hearing other processes' commits, for a call that waits)."""
    source: Source = env.bus(args.db, listen=listen)
    try:
        return call(source)
    finally:
        source.close()


def print_json(value: object) -> None:
    print(dumps(value, pretty=True), flush=True)


def _channels(args: argparse.Namespace, env: Env) -> int:
    """list the channels, with message counts (el-ipc's channels)

    Print every channel with its message count and the time of its newest message, newest
    first (GET /channels), as el-ipc's `channels` does. Once auth is on it needs an admin
    token."""
    print_json(ask(args, env, lambda source: source.channels()))
    return EXIT_OK


def _agent_card(args: argparse.Namespace, env: Env) -> int:
    """print the bus's A2A agent card (el-ipc's agent-card)

    Print the bus's agent card (GET /.well-known/agent-card.json): an A2A v1.0 card with
    el-ipc's url, authentication schemes and, once an operator exists, its did:key."""
    print_json(ask(args, env, lambda source: source.agent_card()))
    return EXIT_OK
