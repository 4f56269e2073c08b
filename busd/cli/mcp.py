"""`agent-bus mcp NAME`: the bus as MCP tools over stdio, for a coding assistant."""
from __future__ import annotations

import argparse
import logging

from . import EXIT_OK, Env, channel_option, command, name_argument


def register(commands: argparse._SubParsersAction) -> None:
    mcp = command(commands, "mcp", _mcp)
    name_argument(mcp)
    channel_option(mcp)


def _mcp(args: argparse.Namespace, env: Env) -> int:
    """serve NAME's mailbox as MCP tools over stdio

    Run an MCP server on stdin/stdout for agent NAME, configured like its daemon
    (AGENT_BUS_URL, AGENT_BUS_TOKEN, AGENT_BUS_SPOOL, AGENT_BUS_CHANNEL, ...). Tools: send,
    inbox, read, wait, handoff, verify, agents, status. It reads the inbox the daemon files,
    or files it itself when no daemon runs."""
    from .. import logs
    from ..mcp_server import AgentTools, build_server

    mailbox = env.mailbox(args.name, env.reading_channel(args.channel))
    mailbox.layout.create()   # a name no folder can have fails here
    env.client().close()  # a missing AGENT_BUS_URL fails here, with the usual message
    # stdout carries the protocol: every log line goes to stderr.
    logs.setup(f"agent-bus mcp {mailbox.name}", logging.WARNING)
    tools = AgentTools(mailbox)
    try:
        build_server(tools).run("stdio")
    finally:
        tools.close()
    return EXIT_OK
