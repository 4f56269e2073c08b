"""The mailbox library: every flow one agent runs against the bus and its spool folder.

The CLI, the MCP server and (later) the Claude Code hooks are adapters over these
functions; the daemon files with the same writer (agent/inbox.py InboxWriter).
Reading the spool is cheap to start: the bus client is made, and `requests` imported,
only when a flow talks to the bus, and the filing and handoff code are imported by the
flows that use them (a hook that only reads the inbox pays for neither). What another
agent wrote (bodies, meta, names) is read only through agent/spool.py's parser and
shown only through busd/framing.py.

Errors a person or a model can act on are MailboxError, whose `kind` says whether the
request was wrong (USAGE) or refused (REFUSED); the bus's own are BusClientError.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field

from . import model
from .agent.spool import (AgentLock, AgentLocked, InboxEntry, SpoolLayout, list_inbox,
                          parse_inbox_file)
from .fileio import FILE_MODE, unlink_quietly, write_atomically
from .secretguard import refusal

# Only for the annotations: importing `typing` costs `agent-bus drop` and `inbox` milliseconds.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Iterator

    from . import handoff
    from .client import BusClient

USAGE, REFUSED = "usage", "refused"
SERVER_HOLD_SECONDS = 25
PREVIEW_CHARS = 120
# What has been shown to the model (by the MCP tools and the Claude Code hooks alike):
# the (ts, id) of the last entry shown. The name is older than the hooks.
READ_MARK = "mcp-read"
SHOWN_LOCK = ".shown.lock"   # held while one process shows and marks
UNREPORTED = "read-unreported"  # read receipts the bus could not be told yet
READ_BATCH = 1000            # most ids one POST /read takes
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class MailboxError(Exception):
    """A flow cannot do what was asked; the text says what to change."""

    def __init__(self, message: str, kind: str = REFUSED):
        super().__init__(message)
        self.kind = kind


def preview(body: bytes) -> str:
    """The first 120 characters of a body on one line that cannot redraw the terminal
    (newlines shown as " | ", other control characters as spaces)."""
    text = body.decode("utf-8", "replace").replace("\n", " | ")[:PREVIEW_CHARS]
    return _CONTROL.sub(" ", text)


def inbox_line(entry: InboxEntry, body: bytes) -> str:
    """`id<TAB>time<TAB>from<TAB>preview`: one message of `agent-bus inbox`'s listing."""
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry.ts))
    return f"{entry.id}\t{when}\t{entry.sender}\t{preview(body)}\n"


def check_recipient(to: str) -> None:
    if to != model.BROADCAST and not model.is_valid_name(to):
        raise MailboxError(f"invalid recipient {to!r}: a name of 1-64 characters of "
                           "A-Z a-z 0-9 . _ - (not only dots), or '*' for everyone", USAGE)


@dataclass
class Mailbox:
    """Agent `name`'s mailbox: its spool folder under `spool_root`, and the bus that
    `connect()` reaches (called once, on the first flow that needs the bus)."""
    name: str
    spool_root: str
    channel: str = model.DEFAULT_CHANNEL
    connect: Callable[[], BusClient] | None = None
    _client: BusClient | None = field(default=None, repr=False)
    _filing: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def layout(self) -> SpoolLayout:
        """The spool folder (a name no folder can have is refused here, not before: a
        send leaves judging names to the bus)."""
        try:
            return SpoolLayout.for_agent(self.spool_root, self.name)
        except ValueError as exc:
            raise MailboxError(str(exc), USAGE) from None

    @property
    def client(self) -> BusClient:
        if self._client is None:
            if self.connect is None:
                raise MailboxError("this mailbox has no bus to talk to", USAGE)
            self._client = self.connect()
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- sending ----------------------------------------------------------------

    def send(self, to: str, body: str, *, channel: str | None = None, key: str | None = None,
             meta: dict | None = None, allow_secret: bool = False) -> dict:
        """Send one message (signed when the client holds a key); the bus's ack. The secret
        guard refuses a body that looks like a key or credential unless `allow_secret`."""
        if not allow_secret and (problem := refusal(body)):
            raise MailboxError(f"not sent: {problem}")
        return self.client.send(self.name, to, body, channel=channel or self.channel, key=key,
                                meta=meta)

    def handoff(self, to: str, paths: list[str], note: str | None = None, *,
                channel: str | None = None, note_label: str = "note") -> dict:
        """Send the files' sha256 and path (never their content); the bus's ack."""
        from . import handoff
        if not paths:
            raise MailboxError("no file given: name at least one file", USAGE)
        try:
            files = [handoff.describe(path) for path in paths]
        except handoff.HandoffError as exc:
            raise MailboxError(str(exc), USAGE) from None
        if note and (problem := refusal(note)):
            raise MailboxError(f"{note_label}: {problem}")
        body, meta = handoff.message_for(files, note)
        return self.client.send(self.name, to, body, channel=channel or self.channel, meta=meta)

    # -- receipts ---------------------------------------------------------------

    def status(self, ids: list[int]) -> list[dict]:
        """Each message's receipt state: queued, delivered, filed or read (per recipient)."""
        return self.client.status(ids)

    def wait_for(self, message_id: int, target: str, timeout: float,
                 stop: threading.Event | None = None) -> str | None:
        """Follow a message until every recipient reached `target` (one of receipts.STATES); its
        state then, or None if `timeout` passed first."""
        from . import receipts   # here, not at the top: `agent-bus inbox` starts without it

        stop = stop or threading.Event()
        deadline = time.monotonic() + timeout
        pause = 0.05
        while True:
            [state] = self.status([message_id])
            if state["state"] != "unknown" and receipts.reached(state["state"], target):
                return state["state"]
            remaining = deadline - time.monotonic()
            if remaining <= 0 or stop.wait(min(pause, remaining)):
                return None
            pause = min(pause * 2, 1.0)

    # -- the inbox ----------------------------------------------------------------

    def entries(self) -> list[InboxEntry]:
        """The inbox's messages, oldest first."""
        return list_inbox(self.layout)

    def find(self, message_id: int, kind: str = REFUSED) -> InboxEntry:
        for entry in self.entries():
            if entry.id == message_id:
                return entry
        raise MailboxError(f"no message {message_id} in {self.layout.inbox}", kind)

    def read(self, entry: InboxEntry) -> tuple[dict[str, Any], bytes]:
        """(headers, body) of an inbox file, as agent/inbox.py parses it."""
        with open(entry.path, "rb") as handle:
            return parse_inbox_file(handle.read())

    def message(self, entry: InboxEntry) -> dict:
        """An inbox message as one JSON object: {id, ts, time, from, to, channel, signed,
        body, file, meta?, note?, handoff?, handoff_reason?}."""
        headers, body = self.read(entry)
        shown = {"id": entry.id, "ts": entry.ts, "time": headers.get("time"),
                 "from": headers.get("from"), "to": headers.get("to"),
                 "channel": headers.get("channel"), "signed": headers.get("signed") == "true",
                 "body": body.decode("utf-8", "replace"), "file": entry.path}
        for name in ("meta", "note", "handoff", "handoff-reason"):
            if name in headers:
                shown[name.replace("-", "_")] = headers[name]
        return shown

    def read_message(self, message_id: int) -> dict:
        """Message `message_id` of the inbox as message() gives it, reported read."""
        shown = self.message(self.find(message_id))
        with self.showing():
            self.report_read([message_id])
        return shown

    # What has been shown to the model is remembered as the (ts, id) of the last entry
    # shown, the order entries() sorts by: everything at or before it has been seen.
    def _read_mark(self) -> tuple[float, int]:
        try:
            with open(os.path.join(self.layout.root, READ_MARK), encoding="ascii") as handle:
                mark = json.load(handle)
            return float(mark["ts"]), int(mark["id"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return 0.0, 0

    def unread(self) -> list[InboxEntry]:
        mark = self._read_mark()
        return [e for e in self.entries() if (e.ts, e.id) > mark]

    @contextlib.contextmanager
    def showing(self) -> Iterator[None]:
        """Held while a reader picks unread messages, shows them and marks them: two hooks
        (or a hook and the MCP server) running at once never show the same message."""
        self.layout.create()
        fd = os.open(os.path.join(self.layout.root, SHOWN_LOCK),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def mark_shown(self, entry: InboxEntry) -> None:
        write_atomically(os.path.join(self.layout.root, READ_MARK),
                         json.dumps({"ts": entry.ts, "id": entry.id}).encode("ascii"))

    def show_unread(self, limit: int) -> list[dict]:
        """Up to `limit` unread messages, oldest first, marked shown and reported read."""
        with self.showing():
            entries = self.unread()[:limit]
            shown = [self.message(e) for e in entries]
            if entries:
                self.mark_shown(entries[-1])
                self.report_read([e.id for e in entries])
        return shown

    # -- read receipts --------------------------------------------------------

    def _unreported(self) -> list[int]:
        try:
            with open(os.path.join(self.layout.root, UNREPORTED), encoding="ascii") as handle:
                ids = json.load(handle)
            return [i for i in ids if isinstance(i, int) and not isinstance(i, bool) and i > 0]
        except (FileNotFoundError, ValueError, TypeError):
            return []

    def report_read(self, ids: list[int]) -> bool:
        """Tell the bus these messages were shown (their state becomes `read`), with any
        an earlier call could not report; whether the bus heard all of them. Those it could
        not hear because it was unreachable are kept for the next call, never lost.
        Called under showing(), which keeps the ids not told yet whole."""
        # Here, not at the top: listing and reading the spool import no client (a fast start).
        from .client import BusClientError

        path = os.path.join(self.layout.root, UNREPORTED)
        waiting = sorted(set(self._unreported()) | set(ids))
        if not waiting:
            return True
        left: list[int] = []
        for start in range(0, len(waiting), READ_BATCH):
            batch = waiting[start:start + READ_BATCH]
            try:
                self.client.mark_read(self.name, batch)
            except BusClientError as exc:
                if exc.transient:
                    left += batch   # a refusal (not its message, a revoked token) is final
            except MailboxError:
                left += batch       # no bus configured: told once one is
        if left:
            write_atomically(path, json.dumps(left[-10 * READ_BATCH:]).encode("ascii"))
        else:
            unlink_quietly(path)
        return not left

    # -- filing from the bus (when no daemon does) --------------------------------

    def file_from_bus(self, block: bool) -> bool:
        """Fetch one batch and file it as the daemon would, with the daemon's writer and
        under its lock; False (nothing done) while a daemon serves this folder."""
        from .agent.inbox import InboxWriter, receive_batch
        self.layout.create()
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
                    writer.write_batch(receive_batch(self.client, writer, self.name,
                                                     self.channel, block))
                finally:
                    writer.close()
        finally:
            lock.release()
        return True

    def wait_unread(self, seconds: float) -> dict | None:
        """The next unread message, marked shown, as soon as it is filed; None if none
        came within `seconds`."""
        deadline = time.monotonic() + seconds
        while True:
            with self.showing():
                unread = self.unread()
                if unread:
                    self.mark_shown(unread[0])
                    self.report_read([unread[0].id])
                    return self.message(unread[0])
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            # A long-poll holds up to the server's hold (25 s); a shorter wait looks often.
            long_poll = remaining >= SERVER_HOLD_SECONDS
            if not self.file_from_bus(block=long_poll):
                self._wait_for_inbox_change(min(remaining, 1.0))   # the daemon files
            elif not long_poll:
                time.sleep(min(remaining, 0.1))

    def _wait_for_inbox_change(self, timeout: float) -> None:
        # A 20 ms look (one stat) keeps this simple and well inside "within 1 s".
        inbox = self.layout.inbox
        before = os.stat(inbox).st_mtime_ns
        end = time.monotonic() + timeout
        while time.monotonic() < end and os.stat(inbox).st_mtime_ns == before:
            time.sleep(0.02)

    # -- handoffs received --------------------------------------------------------

    def handoff_files(self, message_id: int) -> list[handoff.FileFacts]:
        """The files of handoff `message_id` in the inbox, read as files_in() reads them."""
        from . import handoff
        meta = self.read(self.find(message_id, USAGE))[0].get("meta") or {}
        if meta.get("kind") != "handoff":
            raise MailboxError(f"message {message_id} is not a handoff", USAGE)
        try:
            return handoff.files_in(meta)
        except handoff.HandoffError as exc:
            raise MailboxError(f"message {message_id}: {exc}", USAGE) from None

    def verify(self, message_id: int | None = None, path: str | None = None,
               sha256: str | None = None) -> list[tuple[str, str]]:
        """(path, verified | mismatch | unreachable) per file: of handoff `message_id`, or
        of `path` against `sha256`."""
        from . import handoff
        if path is not None and sha256 is not None:
            return [(path, handoff.verify_file(path, sha256))]
        if message_id is None:
            raise MailboxError("give an inbox message id, or a FILE and its SHA256", USAGE)
        return [(f.path, handoff.verify_file(f.path, f.sha256, f.bytes))
                for f in self.handoff_files(message_id)]

    def fetch(self, message_id: int, folder: str) -> list[tuple[handoff.FileFacts, str | None,
                                                                  str | None]]:
        """Copy each file of handoff `message_id` into `folder`, kept only if its hash
        matches: (facts, the new path or None, why not)."""
        from . import handoff
        if not os.path.isdir(folder):
            raise MailboxError(f"{folder} is not a folder", USAGE)
        results = []
        for facts in self.handoff_files(message_id):
            try:
                results.append((facts, handoff.fetch(facts, folder), None))
            except handoff.HandoffError as exc:
                results.append((facts, None, str(exc)))
        return results
