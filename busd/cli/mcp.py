"""`agent-bus mcp NAME`: the bus as MCP tools over stdio, for a coding assistant."""
from __future__ import annotations

import argparse
import logging
import sys

from .. import model
from ..agent.spool import SpoolLayout
from . import EXIT_OK, EXIT_USAGE, CommandError, Env


def register(commands: argparse._SubParsersAction) -> None:
    mcp = commands.add_parser(
        "mcp", help="serve NAME's mailbox as MCP tools over stdio",
        description="Run an MCP server on stdin/stdout for agent NAME, configured like its "
                    "daemon (AGENT_BUS_URL, AGENT_BUS_TOKEN, AGENT_BUS_SPOOL, "
                    "AGENT_BUS_CHANNEL, ...). Tools: send, inbox, read, wait, handoff, verify, "
                    "agents, status. It reads the inbox the daemon files, or files it itself when no "
                    "daemon runs.")
    mcp.add_argument("name", nargs="?", default=None, help="agent name (default $AGENT_NAME)")
    mcp.add_argument("--channel", default=None,
                     help="channel (default $AGENT_BUS_CHANNEL or 'default')")
    mcp.set_defaults(func=_mcp)


def _mcp(args: argparse.Namespace, env: Env) -> int:
    from ..mcp_server import AgentTools, build_server

    name = env.agent_name(args.name)
    channel = args.channel or env.channel
    if channel != model.ALL_CHANNELS and not model.is_valid_name(channel):
        raise CommandError(f"invalid channel {channel!r}", EXIT_USAGE)
    try:
        layout = SpoolLayout.for_agent(env.spool_root, name)
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    env.client().close()  # a missing AGENT_BUS_URL fails here, with the usual message
    # stdout carries the protocol: every log line goes to stderr.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"agent-bus mcp {name}: %(message)s")
    tools = AgentTools(name=name, channel=channel, layout=layout, client_factory=env.client)
    try:
        build_server(tools).run("stdio")
    finally:
        tools.close()
    return EXIT_OK
