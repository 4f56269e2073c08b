"""`agent-bus channels` and `agent-bus agent-card`: what is on the bus, printed as
el-ipc's commands of the same names print it (JSON, indented by two), in the bytes
`jq .` writes (bin/bus-channels and bin/bus-agent-card print the same).

Each command asks a source for the data and prints it here; the source is the bus over
HTTP (AGENT_BUS_URL). Anything that answers the same calls with the same shapes -- the
bus's database itself, for one -- can stand in for it without the printing changing.
"""
from __future__ import annotations

import argparse
from typing import Protocol

from ..jqtext import dumps
from . import EXIT_OK, Env, command


class Source(Protocol):
    def channels(self) -> list:
        """GET /channels: [{"channel", "count", "last_message"}], newest first."""

    def agent_card(self) -> dict:
        """GET /.well-known/agent-card.json."""


def register(commands: argparse._SubParsersAction) -> None:
    command(commands, "channels", _channels)

    command(commands, "agent-card", _agent_card)


def source(args: argparse.Namespace, env: Env) -> Source:
    return env.client()


def print_json(value: object) -> None:
    print(dumps(value, pretty=True), flush=True)


def _channels(args: argparse.Namespace, env: Env) -> int:
    """list the channels, with message counts (el-ipc's channels)

    Print every channel with its message count and the time of its newest message, newest
    first (GET /channels), as el-ipc's `channels` does. Once auth is on it needs an admin
    token."""
    print_json(source(args, env).channels())
    return EXIT_OK


def _agent_card(args: argparse.Namespace, env: Env) -> int:
    """print the bus's A2A agent card (el-ipc's agent-card)

    Print the bus's agent card (GET /.well-known/agent-card.json): an A2A v1.0 card with
    el-ipc's url, authentication schemes and, once an operator exists, its did:key."""
    print_json(source(args, env).agent_card())
    return EXIT_OK
