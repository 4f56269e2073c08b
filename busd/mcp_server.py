"""The bus as MCP tools for one agent, on top of the same spool the daemon fills.

A message read through these tools is the very inbox file the daemon wrote: when
the daemon runs, the tools only read `inbox/`; when it does not, they fetch from
the bus themselves and file into the same layout (taking the daemon's lock for the
moment they file, so the two never file at once). What `inbox` has shown is
remembered in `<agent>/mcp-read`, so it is not shown again.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from . import handoff
from .agent.inbox import InboxWriter, list_inbox, parse_inbox_file
from .agent.spool import AgentLock, AgentLocked, SpoolLayout
from .client import BusClient, BusClientError
from .model import is_valid_name
from .secretguard import refusal

MAX_WAIT_SECONDS = 600
WAIT_STATES = ("queued", "delivered", "filed")
SERVER_HOLD_SECONDS = 25
READ_MARK = "mcp-read"


class ToolInputError(ValueError):
    """A tool was called with something it cannot use; the text says what to change."""


@dataclass
class AgentTools:
    """Every tool's logic, as plain methods (the MCP layer below only wires them)."""
    name: str
    channel: str
    layout: SpoolLayout
    client_factory: Callable[[], BusClient]

    def __post_init__(self) -> None:
        self.layout.create()
        self._client = self.client_factory()
        self._filing = threading.Lock()

    # -- reading the inbox ----------------------------------------------------

    # The mark is an inbox entry's (ts, id) as its file name gives them, the order
    # list_inbox sorts by: everything at or before it has been shown.
    def _read_mark(self) -> tuple[float, int]:
        try:
            with open(os.path.join(self.layout.root, READ_MARK), encoding="ascii") as handle:
                mark = json.load(handle)
            return float(mark["ts"]), int(mark["id"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return 0.0, 0

    def _save_read_mark(self, ts: float, message_id: int) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.layout.root, prefix=".mcp-read.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            json.dump({"ts": ts, "id": message_id}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, os.path.join(self.layout.root, READ_MARK))

    def _unread(self) -> list:
        mark = self._read_mark()
        return [e for e in list_inbox(self.layout) if (e.ts, e.id) > mark]

    def _as_dict(self, entry) -> dict:
        with open(entry.path, "rb") as handle:
            headers, body = parse_inbox_file(handle.read())
        message = {"id": int(headers["id"]), "ts": float(headers["ts"]),
                   "time": headers.get("time"), "from": headers.get("from"),
                   "to": headers.get("to"), "channel": headers.get("channel"),
                   "body": body.decode("utf-8", "replace"), "file": entry.path}
        for field in ("meta", "note", "handoff", "handoff-reason"):
            if field in headers:
                message[field.replace("-", "_")] = headers[field]
        return message

    def _file_from_bus(self, wait_seconds: float) -> bool:
        """No daemon running: fetch and file like it would. False if a daemon holds the folder."""
        lock = AgentLock(self.layout)
        try:
            lock.acquire()
        except AgentLocked:
            return False
        try:
            with self._filing:
                writer = InboxWriter(self.layout, self.channel)
                writer.open()
                try:
                    data = self._client.recv(self.name, since=writer.since,
                                             block=wait_seconds > 0, channel=self.channel,
                                             max_batch=1000, filed=True)
                    writer.write_batch(data.get("messages") or [], data.get("now"))
                finally:
                    writer.close()
        finally:
            lock.release()
        return True

    def inbox(self, limit: int = 50) -> list[dict]:
        if not 1 <= limit <= 1000:
            raise ToolInputError("limit must be from 1 to 1000")
        self._file_from_bus(0)
        entries = self._unread()[:limit]
        shown = [self._as_dict(e) for e in entries]
        if entries:
            self._save_read_mark(entries[-1].ts, entries[-1].id)
        return shown

    def read(self, message_id: int) -> dict:
        if message_id < 1:
            raise ToolInputError("id must be a positive message id")
        for entry in list_inbox(self.layout):
            if entry.id == message_id:
                return self._as_dict(entry)
        raise ToolInputError(f"no message {message_id} in {self.name}'s inbox")

    def wait(self, seconds: float = 30) -> dict | None:
        """The next unread message, as soon as it is filed; None if none came in time."""
        if not 0 < seconds <= MAX_WAIT_SECONDS:
            raise ToolInputError(f"seconds must be more than 0 and at most {MAX_WAIT_SECONDS}")
        deadline = time.monotonic() + seconds
        while True:
            unread = self._unread()
            if unread:
                message = self._as_dict(unread[0])
                self._save_read_mark(unread[0].ts, unread[0].id)
                return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            # A long-poll holds up to the server's hold (25 s); a shorter wait looks often.
            long_poll = remaining >= SERVER_HOLD_SECONDS
            if not self._file_from_bus(wait_seconds=SERVER_HOLD_SECONDS if long_poll else 0):
                # The daemon files: watch inbox/ for its next file.
                self._wait_for_inbox_change(min(remaining, 1.0))
            elif not long_poll:
                time.sleep(min(remaining, 0.1))

    def _wait_for_inbox_change(self, timeout: float) -> None:
        # inotify through watchdog would wake us at once; a 20 ms look keeps this
        # simple, cheap (one listdir) and well inside "within 1 s".
        before = os.stat(self.layout.inbox).st_mtime_ns
        end = time.monotonic() + timeout
        while time.monotonic() < end and os.stat(self.layout.inbox).st_mtime_ns == before:
            time.sleep(0.02)

    # -- sending ----------------------------------------------------------------

    def send(self, to: str, body: str, channel: str | None = None, wait_for: str = "queued",
             timeout: float = 60) -> dict:
        if to != "*" and not is_valid_name(to):
            raise ToolInputError(f"invalid recipient {to!r}: a name of 1-64 characters of "
                                 "A-Z a-z 0-9 . _ - (not only dots), or '*' for everyone")
        if not body:
            raise ToolInputError("body is empty: say something")
        if problem := refusal(body):
            raise ToolInputError(f"not sent: {problem}. Use the handoff tool for files "
                                 "holding secrets.")
        if wait_for not in WAIT_STATES:
            raise ToolInputError(f"wait_for must be one of {', '.join(WAIT_STATES)}")
        if not 0 < timeout <= MAX_WAIT_SECONDS:
            raise ToolInputError(f"timeout must be more than 0 and at most {MAX_WAIT_SECONDS}")
        ack = self._client.send(self.name, to, body, channel=channel or self.channel)
        if wait_for == "queued":
            return {**ack, "state": "queued"}
        reached = self._client.wait_for_state(int(ack["id"]), wait_for, timeout)
        return {**ack, "state": reached or "not yet " + wait_for, "timed_out": reached is None}

    def status(self, ids: list[int]) -> list[dict]:
        if not ids or len(ids) > 100 or any(i < 1 for i in ids):
            raise ToolInputError("ids: 1 to 100 positive message ids")
        return self._client.status(ids)

    def handoff(self, to: str, paths: list[str], note: str | None = None) -> dict:
        if not paths:
            raise ToolInputError("paths is empty: name at least one file")
        try:
            files = [handoff.describe(path) for path in paths]
        except handoff.HandoffError as exc:
            raise ToolInputError(str(exc)) from None
        if note and (problem := refusal(note)):
            raise ToolInputError(f"note: {problem}")
        body, meta = handoff.message_for(files, note)
        return self._client.send(self.name, to, body, channel=self.channel, meta=meta)

    def verify(self, message_id: int | None = None, path: str | None = None,
               sha256: str | None = None) -> dict:
        if message_id is not None:
            meta = self.read(message_id).get("meta") or {}
            try:
                files = handoff.files_in(meta)
            except handoff.HandoffError as exc:
                raise ToolInputError(f"message {message_id}: {exc}") from None
            if not files:
                raise ToolInputError(f"message {message_id} is not a handoff")
            results = {f.path: handoff.verify_file(f.path, f.sha256, f.bytes) for f in files}
        elif path and sha256:
            results = {path: handoff.verify_file(path, sha256)}
        else:
            raise ToolInputError("give id (a handoff in the inbox), or path and sha256")
        return {"result": handoff.overall(list(results.values())), "files": results}

    def agents(self) -> list:
        return self._client.agents()

    def close(self) -> None:
        self._client.close()


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

    async def call(function, *args) -> Any:
        # In a worker thread: `wait` may block for minutes, the server must not.
        try:
            return await anyio.to_thread.run_sync(lambda: function(*args))
        except ToolInputError as exc:
            raise ToolError(str(exc)) from None
        except BusClientError as exc:
            raise ToolError(str(exc)) from None

    @server.tool(description="Send a message to another agent (or '*' for everyone on the "
                             "channel) and return the bus's acknowledgement {ok, id, ts, channel, "
                             "state}. wait_for: 'queued' returns once it is stored; 'delivered' "
                             "or 'filed' wait (up to timeout seconds) until the recipient fetched "
                             "or filed it. Bodies that look like keys or credentials are refused: "
                             "use handoff.")
    async def send(to: str, body: str, channel: str | None = None, wait_for: str = "queued",
                   timeout: float = 60) -> dict:
        return await call(tools.send, to, body, channel, wait_for, timeout)

    @server.tool(description="Receipt state of messages you sent, by id: queued (stored), "
                             "delivered (the recipient fetched it) or filed (its inbox file is "
                             "durable); per recipient for broadcasts.")
    async def status(ids: list[int]) -> list[dict]:
        return await call(tools.status, ids)

    @server.tool(description="Unread messages (oldest first, at most `limit`), each {id, ts, "
                             "time, from, to, channel, body, meta?, note?, handoff?, "
                             "handoff_reason?}; they are marked read and not shown again. "
                             "handoff is what the daemon found: verified, mismatch, not checked "
                             "or checking; note says why a message was read as plain text.")
    async def inbox(limit: int = 50) -> list[dict]:
        return await call(tools.inbox, limit)

    @server.tool(description="One message from the inbox by its id (read or not).")
    async def read(id: int) -> dict:  # noqa: A002 - the tool's argument is called id
        return await call(tools.read, id)

    @server.tool(description="Block until the next unread message arrives (at most `seconds`, "
                             "up to 600) and return it, marked read; null if none came in time. "
                             "Use this instead of polling.")
    async def wait(seconds: float = 30) -> dict | None:
        return await call(tools.wait, seconds)

    @server.tool(description="Hand files to another agent by fingerprint: each file is made "
                             "0600 and its sha256, absolute path, host, size and line count are "
                             "sent -- never its content.")
    async def handoff(to: str, paths: list[str], note: str | None = None) -> dict:
        return await call(tools.handoff, to, paths, note)

    @server.tool(description="Check a handed-off file: give the handoff message's id, or a path "
                             "and its expected sha256. Returns {result: verified|mismatch|"
                             "unreachable, files: {path: result}}.")
    async def verify(id: int | None = None, path: str | None = None,  # noqa: A002
               sha256: str | None = None) -> dict:
        return await call(tools.verify, id, path, sha256)

    @server.tool(description="The roster: every agent the bus knows, whether it is online now "
                             "(can receive at once), its last contact and role.")
    async def agents() -> list[dict]:
        return await call(tools.agents)

    return server
