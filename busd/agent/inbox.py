"""The inbox: every message for the agent becomes one file in inbox/ and one block in inbox.log.

Per batch the long-poll returns, in this order, each step durable before the next:

1. each message not filed yet: `inbox/.<name>.tmp` (O_EXCL, 0600), fsync, rename to
   `inbox/<ts>-<id>-<from>.msg`; then the folder is fsynced. A handoff to check
   first gets its marker, `checking/<the same name>`;
2. the Monitor block of every newly filed message is appended to inbox.log
   (fsync) and printed on stdout;
3. the cursor file records the new since-cursor and inbox.log's length.

Filing never fails on what a message holds: whatever cannot be read as meant is
filed as a plain message with a `note:` saying why (interpret() is total). Only
the disk failing stops a batch, and then the same batch is filed again later.

A handoff is checked beside filing, never in its way (checks.HandoffChecker): the
block says `handoff: checking`, and when the check ends, record_check() rewrites
the inbox file's handoff header (atomically), appends a check entry to inbox.log
and removes the marker. A marker that outlives a crash is checked at the next start.

A crash anywhere re-fetches at most the batch in flight at the next start:
- a message whose id already has a file is not filed again (the ids in inbox/ are
  indexed at start);
- inbox.log beyond the length the cursor file recorded was written by the crashed
  run for exactly those re-fetched messages, in the same order, perhaps with check
  entries between them. At start a torn half-entry at the very end is cut off;
  then the daemon walks the rest: a block that is there is kept and not written
  again; a message whose file exists but whose block is missing gets its block now.
  So the log holds each message once, in ts order.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, TextIO

from .. import handoff, model
from ..client import BusClient
from ..framing import check_block, monitor_block
from ..fileio import FILE_MODE, fsync_dir, write_atomically, write_new_file
from ..receive import Backoff, Cursor, follow, messages_of
from .cursor import BadCursorFile, ReceiveState, load_state, save_state
from .spool import InboxEntry, SpoolLayout, entries_in, parse_inbox_file
from .spool import read_header_value  # noqa: F401 - where callers look for it

log = logging.getLogger("busd.agent.inbox")

BLOCK_END = b"\n---\n"
CHECK_ENTRY_RE = re.compile(rb"\[\d\d:\d\d:\d\dZ\] handoff check of message \d+ from ")
RECV_BATCH = 1000

# The handoff header while the check runs beside filing: local, never reported.
CHECKING = "checking"
NO_DAEMON = ("filed without the daemon, which alone checks handoffs; "
             "`agent-bus verify ID` checks it by hand")
# The server's bounds on what it hands out; a message outside them is a server's
# fault, skipped with a log line rather than filed under a name no disk takes.
MAX_ID = 2 ** 63
MAX_TS = 1e11

# Characters a header value may not hold as they are: controls (line breaks among
# them, U+2028/9 too) and lone surrogates. JSON escapes them.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


# -- the inbox file format ---------------------------------------------------

def json_text(value: Any) -> str:
    """JSON on one line, UTF-8 kept, every character that could break a line or a
    terminal escaped (still JSON: json.loads reads it back to the same value)."""
    text = json.dumps(value, ensure_ascii=False)
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _plain(value: str) -> bool:
    """A meta string that reads back as itself when written unquoted."""
    if not value or value != value.strip() or value.startswith('"') or _UNSAFE.search(value):
        return False
    try:
        json.loads(value)
    except ValueError:
        return True
    return False  # looks like a number, true, false or null: quote it


def header_value(value: Any) -> str:
    """One line for a meta value: a plain string as is, anything else as JSON."""
    if isinstance(value, str) and _plain(value):
        return value
    return json_text(value)


def _shown(value: Any, limit: int = 80) -> str:
    """A value from a message, in a note: JSON, one line, cut short."""
    try:
        text = json_text(value)
    except ValueError:  # an integer with more digits than Python prints
        text = f"a {type(value).__name__}"
    return text if len(text) <= limit else text[:limit] + "..."


def _time_text(ts: float) -> str:
    seconds, micros = f"{ts:.6f}".split(".")   # the same rounding as the file name
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(seconds))) + f".{micros}Z"


def message_key(message: Any) -> tuple[int, float] | None:
    """(id, ts) of a message as the server numbers it, or None if it is not one."""
    if not isinstance(message, dict):
        return None
    message_id, ts = message.get("id"), message.get("ts")
    if not isinstance(message_id, int) or isinstance(message_id, bool) \
            or not 0 < message_id < MAX_ID:
        return None
    if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not math.isfinite(ts) \
            or not 0 <= ts < MAX_TS:
        return None
    return message_id, float(ts)


@dataclass
class Filing:
    """What the daemon makes of one message: its inbox file, its block, its check."""
    id: int
    ts: float
    sender: Any
    body: str                      # the text of `msg` (the file holds its UTF-8)
    head: list[str]                # header lines up to the notes
    notes: list[str] = field(default_factory=list)
    handoff: str | None = None     # None, CHECKING or a result
    reason: str = ""               # why not checked: for the owner only, never the bus

    @property
    def name(self) -> str:
        sender = self.sender if isinstance(self.sender, str) else ""
        if not model.is_valid_name(sender):
            sender = re.sub(r"[^A-Za-z0-9._-]", "_", sender)[:64].strip(".") or "unknown"
        return f"{self.ts:.6f}-{self.id}-{sender}.msg"

    def file_bytes(self) -> bytes:
        lines = self.head + handoff_headers(self.note, self.handoff, self.reason)
        return ("\n".join(lines) + "\n\n" + self.body).encode("utf-8")

    @property
    def note(self) -> str | None:
        return "; ".join(self.notes) or None


def handoff_headers(note: str | None, state: str | None, reason: str,
                    checked: str | None = None) -> list[str]:
    """The inbox file's last header lines: why it was read plainly, and its check."""
    lines = [f"note: {note}"] if note else []
    if state:
        lines.append(f"handoff: {state}")
        if reason:
            lines.append(f"handoff-reason: {reason}")
        if checked:
            lines.append(f"checked: {checked}")
    return lines


def status_lines(message_id: int, note: str | None, state: str | None,
                 reason: str) -> list[str]:
    """A block's status lines: what the daemon made of the message as it filed it."""
    lines = [f"note: {note}"] if note else []
    if state == CHECKING:
        lines.append(f"handoff: {CHECKING} (message {message_id})")
    elif state:
        lines.append(f"handoff: {state}" + (f" ({reason})" if reason else ""))
    return lines


def block_of(ts: float, sender: Any, body: str, status: list[str]) -> str:
    return monitor_block({"ts": ts, "from": sender, "msg": body}, status)


def _name_header(field_name: str, value: Any, notes: list[str], broadcast_ok: bool) -> str:
    if model.is_valid_name(value) or (broadcast_ok and value == model.BROADCAST):
        return f"{field_name}: {value}"
    notes.append(f"{field_name} is {_shown(value)}, not a valid name")
    return f"{field_name}: {json_text(value)}"


def _body_text(message: dict, notes: list[str]) -> str:
    body = message.get("msg", "")
    if not isinstance(body, str):
        notes.append(f"msg is a {type(body).__name__}, not text: the body is its JSON")
        body = _shown(body, limit=10 ** 6)
    if _SURROGATE.search(body):
        notes.append("the body held unpaired UTF-16 surrogates, written as U+FFFD")
        body = _SURROGATE.sub("\ufffd", body)
    return body


def _meta_headers(meta: Any, notes: list[str]) -> list[str]:
    if meta is None or meta == {}:
        return []
    if not isinstance(meta, dict):
        notes.append(f"meta is a {type(meta).__name__}, not an object, so it was not read: "
                     f"{_shown(meta)}")
        return []
    plain = {k: v for k, v in meta.items() if model.is_valid_name(k)}
    lines = [f"meta.{k}: {header_value(v)}" for k, v in plain.items()]
    others = {k: v for k, v in meta.items() if k not in plain}
    if others:
        lines.append("meta: " + json_text(others))
    return lines


def interpret(message_id: int, ts: float, message: dict,
              roots: tuple[str, ...] | None) -> Filing:
    """The Filing of a message; never raises. `roots`: the shared roots a handoff is
    checked under, or None where no checker runs (then nothing is checked)."""
    try:
        return _interpret(message_id, ts, message, roots)
    except Exception as exc:  # noqa: BLE001 - nothing a sender writes may stop the inbox
        log.exception("message %d could not be read; filing it as plain text", message_id)
        body = message.get("msg")
        body = body if isinstance(body, str) else ""
        return Filing(id=message_id, ts=ts, sender=None, body=_SURROGATE.sub("\ufffd", body),
                      head=[f"id: {message_id}", f"ts: {ts!r}", f"time: {_time_text(ts)}"],
                      notes=[f"it could not be read ({type(exc).__name__}): only its text "
                             "is filed"])


def _interpret(message_id: int, ts: float, message: dict,
               roots: tuple[str, ...] | None) -> Filing:
    notes: list[str] = []
    body = _body_text(message, notes)
    sender = message.get("from")
    channel = message.get("channel", model.DEFAULT_CHANNEL)
    head = [f"id: {message_id}", f"ts: {ts!r}", f"time: {_time_text(ts)}",
            _name_header("from", sender, notes, broadcast_ok=False),
            _name_header("to", message.get("to", ""), notes, broadcast_ok=True),
            _name_header("channel", channel, notes, broadcast_ok=False)]
    meta = message.get("meta")
    head += _meta_headers(meta, notes)
    if message.get("signed") is True:
        head.append("signed: true")
    filing = Filing(id=message_id, ts=ts, sender=sender, body=body, head=head, notes=notes)
    if isinstance(meta, dict) and meta.get("kind") == "handoff":
        _decide_check(filing, meta, roots)
    return filing


def _decide_check(filing: Filing, meta: dict, roots: tuple[str, ...] | None) -> None:
    """What can be said of a handoff as it is filed: `checking`, or not checked and why."""
    try:
        files = handoff.files_in(meta)
    except handoff.HandoffError as exc:
        filing.notes.append(f"not read as a handoff: {exc}")
        filing.handoff = handoff.NOT_CHECKED
        return
    if roots is None:
        filing.handoff, filing.reason = handoff.NOT_CHECKED, NO_DAEMON
        return
    reasons = [handoff.unchecked_reason(f.path, roots) for f in files]
    if all(reasons):
        filing.handoff = handoff.NOT_CHECKED
        filing.reason = reasons[0] if len(reasons) == 1 else "; ".join(
            f"file {i}: {r}" for i, r in enumerate(reasons, start=1))
    else:
        filing.handoff = CHECKING


def format_inbox_file(message: dict, roots: tuple[str, ...] | None = None) -> bytes:
    """The inbox file of a message (as the daemon writes it, before any check ends)."""
    key = message_key(message)
    if key is None:
        raise ValueError("not a message: it has no id and ts the bus would give")
    return interpret(*key, message, roots).file_bytes()


def with_check(data: bytes, check: handoff.Check, checked: str) -> bytes:
    """An inbox file's bytes with its handoff header set to a finished check."""
    head, _, body = data.partition(b"\n\n")
    kept = [line for line in head.split(b"\n")
            if not line.startswith((b"handoff: ", b"handoff-reason: ", b"checked: "))]
    tail = handoff_headers(None, check.result, check.reason, checked)
    return b"\n".join(kept + [line.encode("utf-8") for line in tail]) + b"\n\n" + body


# -- the writer ------------------------------------------------------------

class InboxWriter:
    """Files batches of messages; owns inbox/, inbox.log, checking/ and the cursor file.

    `roots`: the shared roots handoffs are checked under (none: nothing is checked),
    or None for a writer with no checker beside it (the MCP server's).
    `on_marked` is called when new handoffs wait in checking/.
    """

    def __init__(self, layout: SpoolLayout, channel: str, out: TextIO | None = None,
                 roots: tuple[str, ...] | None = None,
                 on_marked: Callable[[], None] | None = None):
        self.layout = layout
        self.channel = channel
        self.out = out
        self.roots = roots
        self.on_marked = on_marked
        self.cursor = Cursor()
        self._ids: set[int] = set()
        self._unlogged: set[int] = set()   # filed, block not yet in inbox.log
        self._status: dict[int, list[str]] = {}  # filed this batch: its block's status lines
        self._log_fd: int | None = None
        self._log_ino = 0
        self._saved: ReceiveState | None = None
        # The crashed run's unconfirmed end of inbox.log, and how far we matched it.
        self._unconfirmed = b""
        self._recovering = False
        # Filing and the checker's records both append to inbox.log and stdout.
        self._lock = threading.Lock()

    def open(self) -> None:
        for name in os.listdir(self.layout.inbox):
            entry = InboxEntry.named(self.layout.inbox, name)
            if entry is not None:
                self._ids.add(entry.id)
            elif name.startswith(".") and name.endswith(".tmp"):
                os.unlink(os.path.join(self.layout.inbox, name))  # a crash's half-written file
        self._open_log()
        try:
            state = load_state(self.layout.cursor)
        except BadCursorFile as exc:
            log.warning("%s; receiving everything the bus holds again (messages already in "
                        "inbox/ are not filed twice)", exc)
            state = None
        if state is not None and not state.serves(self.channel):
            log.info("the channel changed from %s to %s: receiving %s from the start "
                     "(messages already in inbox/ are not filed again)",
                     state.channel, self.channel, self.channel)
            state = None
        if state is None:
            return
        self.cursor.since = state.since
        self._saved = state
        size = os.fstat(self._log_fd).st_size
        if state.log_bytes is not None and state.log_bytes <= size:
            with open(self.layout.inbox_log, "rb") as handle:
                handle.seek(state.log_bytes)
                unconfirmed = handle.read(size - state.log_bytes)
            self._unconfirmed = self._cut_torn_end(state.log_bytes, unconfirmed)
            self._recovering = True

    def _cut_torn_end(self, start: int, unconfirmed: bytes) -> bytes:
        """Keep every whole entry of the crashed run's end of the log; cut a torn last one."""
        if not unconfirmed or unconfirmed.endswith(BLOCK_END):
            return unconfirmed
        last_end = unconfirmed.rfind(BLOCK_END)
        keep = last_end + len(BLOCK_END) if last_end >= 0 else 0
        log.warning("inbox.log ends in a half-written block (a crash); cutting it at byte %d "
                    "and writing the block again", start + keep)
        os.ftruncate(self._log_fd, start + keep)
        return unconfirmed[:keep]

    def close(self) -> None:
        with self._lock:
            if self._log_fd is not None:
                os.close(self._log_fd)
                self._log_fd = None

    def _open_log(self) -> None:
        if self._log_fd is not None:
            os.close(self._log_fd)
        self._log_fd = os.open(self.layout.inbox_log,
                               os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        self._log_ino = os.fstat(self._log_fd).st_ino

    def _log_moved_away(self) -> bool:
        """inbox.log was rotated or deleted under us: write to a new one at its path."""
        try:
            return os.stat(self.layout.inbox_log).st_ino != self._log_ino
        except FileNotFoundError:
            return True

    @property
    def since(self) -> float:
        return self.cursor.since

    def write_batch(self, batch: dict) -> list[tuple[int, str]]:
        """File a /recv reply's messages; returns (id, result) of the handoffs whose result is known at once
        (not checked), for the bus. Raises only OSError (the disk), never for content."""
        with self._lock:
            reports, marked = self._write_batch(batch)
        if marked and self.on_marked is not None:
            self.on_marked()  # after the blocks: a check entry never precedes its block
        return reports

    def _write_batch(self, batch: dict) -> tuple[list[tuple[int, str]], bool]:
        fresh: list[tuple[int, float, dict]] = []
        for message in messages_of(batch):
            key = message_key(message)
            if key is None:
                log.error("skipping something the bus sent that is not a message (no id and "
                          "ts the bus would give): %s", _shown(message))
            elif self.cursor.is_new(message):
                fresh.append((*key, message))
        reports: list[tuple[int, str]] = []
        was_recovering = self._recovering
        filed = marked = 0
        for message_id, ts, message in fresh:
            if message_id in self._ids:
                continue
            filing = interpret(message_id, ts, message, self.roots)
            if filing.handoff == CHECKING:
                write_new_file(os.path.join(self.layout.checking, filing.name), b"")
                marked += 1
            elif filing.handoff is not None:
                reports.append((message_id, filing.handoff))
            write_atomically(os.path.join(self.layout.inbox, filing.name), filing.file_bytes())
            self._status[message_id] = status_lines(message_id, filing.note, filing.handoff,
                                                    filing.reason)
            self._ids.add(message_id)
            self._unlogged.add(message_id)
            filed += 1
        if marked:
            fsync_dir(self.layout.checking)
        if filed:
            fsync_dir(self.layout.inbox)

        if self._log_moved_away():
            self._open_log()
            self._unconfirmed = b""
        blocks, logged = [], []
        confirmed = recovered = 0
        for message_id, ts, message in fresh:
            if not self._recovering and message_id not in self._unlogged:
                continue  # filed and logged before
            block = self._block(message_id, ts, message).encode("utf-8")
            if self._recovering:
                if self._confirm(block):
                    confirmed += 1
                    continue  # the run before wrote it
                if message_id in self._unlogged:
                    self._recovering = False  # filed by us: past what the crash left
                else:
                    recovered += 1
            blocks.append(block)
            logged.append(message_id)
        if was_recovering and fresh and filed < len(fresh):
            log.info("after a restart: %d messages were filed already, not again (%d of them "
                     "in inbox.log already, %d logged now)", len(fresh) - filed, confirmed,
                     recovered)
        if fresh:
            self._recovering = False
        if blocks:
            self._append(b"".join(blocks))
            self._unlogged.difference_update(logged)

        self.cursor.advance(batch)
        state = ReceiveState(since=self.cursor.since, channel=self.channel,
                             log_bytes=os.fstat(self._log_fd).st_size)
        if state != self._saved:
            save_state(self.layout.cursor, state)
            self._saved = state
        return reports, marked > 0

    def _block(self, message_id: int, ts: float, message: dict) -> str:
        """The block of a message, with the status lines its inbox file was filed with, so
        that a block written again after a crash is byte for byte the one written before."""
        status = self._status.pop(message_id, None)
        if status is None:
            status = self._filed_status(message_id, ts, message)
        notes: list[str] = []
        body = _body_text(message, notes)
        return block_of(ts, message.get("from"), body, status)

    def _filed_status(self, message_id: int, ts: float, message: dict) -> list[str]:
        """The status lines of a message filed by an earlier run, read from its file."""
        name = interpret(message_id, ts, message, self.roots).name
        try:
            with open(os.path.join(self.layout.inbox, name), "rb") as handle:
                headers, _ = parse_inbox_file(handle.read())
        except (OSError, ValueError):
            return []
        # A file whose check ended after filing showed `checking` in its block.
        state = CHECKING if "checked" in headers else headers.get("handoff")
        return status_lines(message_id, headers.get("note"), state,
                            headers.get("handoff-reason", ""))

    def _confirm(self, block: bytes) -> bool:
        """Is `block` next in the crashed run's end of the log (check entries aside)?"""
        while CHECK_ENTRY_RE.match(self._unconfirmed):
            end = self._unconfirmed.find(BLOCK_END)
            self._unconfirmed = self._unconfirmed[end + len(BLOCK_END):]
        if self._unconfirmed.startswith(block):
            self._unconfirmed = self._unconfirmed[len(block):]
            return True
        self._unconfirmed = b""  # lines someone else added: from here on, write afresh
        return False

    def _append(self, data: bytes) -> None:
        """Append whole entries to inbox.log (durably), then show them on stdout."""
        view = memoryview(data)
        while view:
            view = view[os.write(self._log_fd, view):]
        os.fsync(self._log_fd)
        self._print(data.decode("utf-8"))

    def _print(self, text: str) -> None:
        if self.out is None:
            return
        try:
            self.out.write(text)
            self.out.flush()
        except (BrokenPipeError, ValueError, OSError) as exc:
            log.warning("stdout is gone (%s); blocks now go only to inbox.log", exc)
            self.out = None

    # -- the checks beside filing (called from the checker's thread) -----------

    def pending_checks(self, limit: int) -> list[str]:
        """The inbox names of up to `limit` handoffs waiting for their check, oldest first."""
        return [os.path.basename(e.path) for e in entries_in(self.layout.checking)[:limit]]

    def files_to_check(self, name: str) -> list[handoff.FileFacts] | handoff.Check | None:
        """What the handoff filed as `name` asks to check; a Check if that is known without
        touching a file; None (and its marker removed) if it waits for nothing any more."""
        with self._lock:  # a batch in progress may have made the marker, not the file yet
            try:
                with open(os.path.join(self.layout.inbox, name), "rb") as handle:
                    headers, _ = parse_inbox_file(handle.read())
            except (OSError, ValueError):
                headers = {}   # deleted by its owner, or never renamed in before a crash
            if headers.get("handoff") != CHECKING:
                self._unmark(name)
                return None
        try:
            return handoff.files_in(headers.get("meta"))
        except handoff.HandoffError as exc:
            return handoff.Check(handoff.NOT_CHECKED, str(exc))

    def record_check(self, name: str, check: handoff.Check) -> int | None:
        """Write a finished check into the inbox file (atomically) and inbox.log, then drop
        its marker; the message id, or None if its inbox file is gone."""
        entry = InboxEntry.named(self.layout.inbox, name)
        if entry is None:
            self._unmark(name)
            return None
        path, message_id = entry.path, entry.id
        when = time.time()
        with self._lock:
            if self._log_fd is None:
                return None  # closed: the marker stays, the next start checks it again
            try:
                with open(path, "rb") as handle:
                    data = handle.read()
            except FileNotFoundError:
                self._unmark(name)
                return None
            sender = parse_inbox_file(data)[0].get("from")
            write_atomically(path, with_check(data, check, _time_text(when)[:19] + "Z"))
            fsync_dir(self.layout.inbox)
            if self._log_moved_away():
                self._open_log()
                self._unconfirmed = b""
            status = check.result + (f" ({check.reason})" if check.reason else "")
            self._append(check_block(when, message_id, sender, status).encode("utf-8"))
            self._unmark(name)
        return message_id

    def _unmark(self, name: str) -> None:
        try:
            os.unlink(os.path.join(self.layout.checking, name))
        except FileNotFoundError:
            pass


class CheckReports(Protocol):
    def report(self, checks: list[tuple[int, str]]) -> None: ...


# -- the receive loop --------------------------------------------------------

def receive_batch(client: BusClient, writer: InboxWriter, name: str, channel: str,
                  block: bool = True) -> dict:
    """The next batch for `writer` to file. filed=True: the bus may count everything up
    to our since as filed, because the writer saves it only once the files are durable."""
    return client.recv(name, since=writer.since, block=block, channel=channel,
                       max_batch=RECV_BATCH, filed=True)


@dataclass
class ReceiveLoop:
    """Long-polls the bus and hands each batch to the writer; never gives up."""
    writer: InboxWriter
    client: BusClient
    name: str
    channel: str
    stop: threading.Event
    reporter: CheckReports | None = None
    backoff: Backoff = field(default_factory=lambda: Backoff(0.25, 5.0))
    # Held while a batch is being filed; shutdown takes it so no batch is cut short.
    busy: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        failing = False

        def poll() -> dict:
            return receive_batch(self.client, self.writer, self.name, self.channel)

        def report(exc: Exception, delay: float) -> None:
            nonlocal failing
            log.log(logging.INFO if failing else logging.WARNING,
                    "cannot receive: %s; retrying in %gs", exc, delay)
            failing = True

        for batch in follow(poll, self.stop, backoff=self.backoff, on_error=report):
            if failing:
                log.info("receiving again from %s", self.client.url)
            failing = False
            with self.busy:
                if self.stop.is_set() and not messages_of(batch):
                    return
                try:
                    checked = self.writer.write_batch(batch)
                except Exception as exc:  # noqa: BLE001
                    # Disk full, or a message we cannot file: the cursor did not move,
                    # so the same batch comes again after the pause.
                    delay = self.backoff.delay()
                    log.exception("cannot file %d messages (%s); trying again in %gs",
                                  len(messages_of(batch)), exc, delay)
                    self.stop.wait(delay)
                    continue
            if checked and self.reporter is not None:
                self.reporter.report(checked)  # filed and durable: now tell the bus
