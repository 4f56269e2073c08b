"""The bus as MCP tools for one agent: an adapter over the mailbox library.

A message read through these tools is the very inbox file the daemon wrote: when
the daemon runs, the tools only read `inbox/`; when it does not, they fetch from
the bus and file with the daemon's own writer, under its lock (Mailbox.file_from_bus).
What `inbox` and `wait` have shown is remembered (Mailbox.mark_shown), so it is not
shown again.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

from . import handoff
from .client import BusClientError
from .mailbox import Mailbox, MailboxError, check_recipient
from .receipts import STATES as WAIT_STATES

MAX_WAIT_SECONDS = 600


class ToolInputError(ValueError):
    """A tool was called with something it cannot use; the text says what to change."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ToolInputError(message)


@dataclass
class AgentTools:
    """Every tool: its arguments checked, then the mailbox flow it names. Each public
    method is a tool; its docstring is what the model reads about it."""
    mailbox: Mailbox

    TOOLS = ("send", "status", "inbox", "read", "wait", "handoff", "verify", "agents")

    @property
    def name(self) -> str:
        return self.mailbox.name

    def send(self, to: str, body: str, channel: str | None = None, wait_for: str = "queued",
             timeout: float = 60) -> dict:
        """Send a message to another agent (or '*' for everyone on the channel) and return
        the bus's acknowledgement {ok, id, ts, channel, state}. wait_for: 'queued' returns
        once it is stored; 'delivered', 'filed' or 'read' wait (up to timeout seconds) until
        the recipient fetched it, filed it, or was shown it (its model or its person). Bodies
        that look like keys or credentials are refused: use handoff."""
        check_recipient(to)
        _require(bool(body), "body is empty: say something")
        _require(wait_for in WAIT_STATES, f"wait_for must be one of {', '.join(WAIT_STATES)}")
        _require(0 < timeout <= MAX_WAIT_SECONDS,
                 f"timeout must be more than 0 and at most {MAX_WAIT_SECONDS}")
        try:
            ack = self.mailbox.send(to, body, channel=channel)
        except MailboxError as exc:
            raise ToolInputError(f"{exc}. Use the handoff tool for files holding secrets.") \
                from None
        if wait_for == "queued":
            return {**ack, "state": "queued"}
        reached = self.mailbox.wait_for(int(ack["id"]), wait_for, timeout)
        return {**ack, "state": reached or "not yet " + wait_for, "timed_out": reached is None}

    def status(self, ids: list[int]) -> list[dict]:
        """Receipt state of messages you sent, by id: queued (stored), delivered (the
        recipient fetched it), filed (its inbox file is durable) or read (it was shown to the
        recipient's model or person); per recipient for broadcasts."""
        _require(bool(ids) and len(ids) <= 100 and all(i >= 1 for i in ids),
                 "ids: 1 to 100 positive message ids")
        return self.mailbox.status(ids)

    def inbox(self, limit: int = 50) -> list[dict]:
        """Unread messages (oldest first, at most `limit`), each {id, ts, time, from, to,
        channel, body, meta?, note?, handoff?, handoff_reason?}; they are marked read and
        not shown again. handoff is what the daemon found: verified, mismatch, not checked
        or checking; note says why a message was read as plain text."""
        _require(1 <= limit <= 1000, "limit must be from 1 to 1000")
        self.mailbox.file_from_bus(block=False)
        return self.mailbox.show_unread(limit)

    def read(self, id: int) -> dict:  # noqa: A002 - the tool's argument is called id
        """One message from the inbox by its id (read or not); its sender sees it read."""
        _require(id >= 1, "id must be a positive message id")
        return self.mailbox.read_message(id)

    def wait(self, seconds: float = 30) -> dict | None:
        """Block until the next unread message arrives (at most `seconds`, up to 600) and
        return it, marked read; null if none came in time. Use this instead of polling."""
        _require(0 < seconds <= MAX_WAIT_SECONDS,
                 f"seconds must be more than 0 and at most {MAX_WAIT_SECONDS}")
        return self.mailbox.wait_unread(seconds)

    def handoff(self, to: str, paths: list[str], note: str | None = None) -> dict:
        """Hand files to another agent by fingerprint: each file is made 0600 and its
        sha256, absolute path, host, size and line count are sent -- never its content."""
        return self.mailbox.handoff(to, paths, note)

    def verify(self, id: int | None = None, path: str | None = None,  # noqa: A002
               sha256: str | None = None) -> dict:
        """Check a handed-off file: give the handoff message's id, or a path and its
        expected sha256. Returns {result: verified|mismatch|unreachable, files: {path:
        result}}."""
        if id is None and not (path and sha256):
            raise ToolInputError("give id (a handoff in the inbox), or path and sha256")
        results = self.mailbox.verify(id, path, sha256)
        return {"result": handoff.overall([r for _, r in results]), "files": dict(results)}

    def agents(self) -> list[dict]:
        """The roster: every agent the bus knows, whether it is online now (can receive at
        once), its last contact and role."""
        return self.mailbox.client.agents()

    def close(self) -> None:
        self.mailbox.close()


INSTRUCTIONS = (
    "The agent bus: messages between agents on several machines. Use `wait` to block until "
    "the next message arrives (push, not polling), `inbox` for everything unread, `send` to "
    "message another agent ('*' reaches everyone on the channel). Never send secrets: "
    "`handoff` sends a file's sha256 and path instead of its content.")


def build_server(tools: AgentTools):
    """The MCP server (mcp SDK) exposing `tools`; errors become MCP tool errors."""
    import anyio
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    server = MCPServer(name=f"agent-bus:{tools.name}", instructions=INSTRUCTIONS)

    def as_tool(method: Callable) -> Callable:
        @functools.wraps(method)
        async def tool(*args: Any, **kwargs: Any) -> Any:
            # In a worker thread: `wait` may block for minutes, the server must not.
            try:
                return await anyio.to_thread.run_sync(functools.partial(method, *args, **kwargs))
            except (ToolInputError, MailboxError, BusClientError) as exc:
                raise ToolError(str(exc)) from None
        return tool

    for name in tools.TOOLS:
        method = getattr(tools, name)
        server.tool(description=" ".join(method.__doc__.split()))(as_tool(method))
    return server
