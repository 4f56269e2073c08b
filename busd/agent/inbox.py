"""The inbox: every message for the agent becomes one file in inbox/ and one block in inbox.log.

Per batch the long-poll returns, in this order, each step durable before the next:

1. each message not filed yet: `inbox/.<name>.tmp` (O_EXCL, 0600), fsync, rename to
   `inbox/<ts>-<id>-<from>.msg`; then the folder is fsynced;
2. the Monitor block of every newly filed message is appended to inbox.log
   (fsync) and printed on stdout;
3. the cursor file records the new since-cursor and inbox.log's length.

A crash anywhere re-fetches at most the batch in flight at the next start:
- a message whose id already has a file is not filed again (the ids in inbox/ are
  indexed at start);
- inbox.log beyond the length the cursor file recorded was written by the crashed
  run for exactly those re-fetched messages, in the same order. The daemon walks
  it: a block that is there is kept and not written again; a message whose file
  exists but whose block is missing gets its block now; a torn half-block at the
  very end is cut off. So the log holds each message once, in ts order.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, TextIO

from .. import handoff, model
from ..client import Backoff, BusClient, BusClientError, monitor_block
from .checks import CheckReporter
from .spool import FILE_MODE, SpoolLayout, fsync_dir, write_atomically, write_new_file

log = logging.getLogger("busd.agent.inbox")

INBOX_NAME_RE = re.compile(r"(\d+\.\d{6})-(\d+)-(.+)\.msg")
BLOCK_END = b"\n---\n"
RECV_BATCH = 1000


# -- the inbox file format ---------------------------------------------------

def inbox_file_name(message: dict) -> str:
    sender = str(message.get("from", ""))
    if not model.is_valid_name(sender):
        sender = re.sub(r"[^A-Za-z0-9._-]", "_", sender)[:64].strip(".") or "unknown"
    return f"{float(message['ts']):.6f}-{int(message['id'])}-{sender}.msg"


def _plain(value: str) -> bool:
    """A meta string that reads back as itself when written unquoted."""
    if not value or value != value.strip() or value.startswith('"'):
        return False
    if any(ord(c) < 0x20 or ord(c) == 0x7f for c in value):
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
    return json.dumps(value, ensure_ascii=False)


def read_header_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def format_inbox_file(message: dict) -> bytes:
    ts = float(message["ts"])
    seconds, micros = f"{ts:.6f}".split(".")   # the same rounding as the file name
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(seconds))) + f".{micros}Z"
    lines = [f"id: {int(message['id'])}",
             f"ts: {ts!r}",
             f"time: {when}",
             f"from: {message.get('from')}",
             f"to: {message.get('to', '')}",
             f"channel: {message.get('channel', model.DEFAULT_CHANNEL)}"]
    meta = message.get("meta")
    if isinstance(meta, dict) and meta:
        plain_keys = {k: v for k, v in meta.items() if model.is_valid_name(k)}
        lines += [f"meta.{k}: {header_value(v)}" for k, v in plain_keys.items()]
        others = {k: v for k, v in meta.items() if k not in plain_keys}
        if others:
            lines.append("meta: " + json.dumps(others, ensure_ascii=False))
    if message.get("signed"):
        lines.append("signed: true")
    if message.get("handoff"):
        lines.append(f"handoff: {message['handoff']}")
    head = "\n".join(lines) + "\n\n"
    return head.encode("utf-8") + str(message.get("msg", "")).encode("utf-8")


def inbox_block(message: dict) -> str:
    """The Monitor block, with the handoff check's result before the closing `---`."""
    block = monitor_block(message)
    if message.get("handoff"):
        block = block[:-len("---\n")] + f"handoff: {message['handoff']}\n---\n"
    return block


def with_handoff_check(message: dict) -> dict:
    """A handoff whose file is reachable here (a shared filesystem) is checked on arrival."""
    if isinstance(message.get("meta"), dict) and message["meta"].get("kind") == "handoff":
        return {**message, "handoff": handoff.verify_meta(message["meta"])}
    return message


def parse_inbox_file(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(headers, body bytes) of an inbox file; meta.<k> headers gathered in headers["meta"]."""
    head, sep, body = data.partition(b"\n\n")
    if not sep:
        raise ValueError("not an inbox file: no blank line after the headers")
    headers: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    for line in head.decode("utf-8").split("\n"):
        name, _, value = line.partition(": ")
        if name.startswith("meta."):
            meta[name[5:]] = read_header_value(value)
        elif name == "meta":
            meta.update(json.loads(value))
        else:
            headers[name] = value
    if meta:
        headers["meta"] = meta
    return headers, body


@dataclass(frozen=True)
class InboxEntry:
    id: int
    ts: float
    sender: str
    path: str


def list_inbox(layout: SpoolLayout) -> list[InboxEntry]:
    """The inbox files, oldest first."""
    entries = []
    try:
        names = os.listdir(layout.inbox)
    except FileNotFoundError:
        return []
    for name in names:
        match = INBOX_NAME_RE.fullmatch(name)
        if match:
            entries.append(InboxEntry(id=int(match.group(2)), ts=float(match.group(1)),
                                      sender=match.group(3),
                                      path=os.path.join(layout.inbox, name)))
    return sorted(entries, key=lambda e: (e.ts, e.id))


# -- the cursor file -------------------------------------------------------

@dataclass(frozen=True)
class ReceiveState:
    """What the cursor file holds: where to poll from, and how much of inbox.log that covers."""
    since: float
    channel: str
    log_bytes: int | None


def load_state(path: str) -> ReceiveState | None:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read().strip()
    except FileNotFoundError:
        return None
    try:
        # A bare number is a cursor someone wrote by hand: honour it, verify no log.
        return ReceiveState(since=float(text), channel="", log_bytes=None)
    except ValueError:
        pass
    try:
        data = json.loads(text)
        return ReceiveState(since=float(data["since"]), channel=str(data["channel"]),
                            log_bytes=int(data["inbox_log_bytes"]))
    except (ValueError, KeyError, TypeError):
        # Torn by a power cut, or edited: starting over is safe, nothing is filed twice.
        log.warning("%s is not a cursor file (%r); receiving everything the bus holds again "
                    "(messages already in inbox/ are not filed twice)", path, text[:60])
        return None


def save_state(path: str, state: ReceiveState) -> None:
    text = json.dumps({"since": state.since, "channel": state.channel,
                       "inbox_log_bytes": state.log_bytes})
    write_atomically(path, text.encode() + b"\n")


# -- the writer ------------------------------------------------------------

class InboxWriter:
    """Files batches of messages; owns inbox/, inbox.log and the cursor file."""

    def __init__(self, layout: SpoolLayout, channel: str, out: TextIO | None = None):
        self.layout = layout
        self.channel = channel
        self.out = out
        self.since = 0.0
        self._ids: set[int] = set()
        self._unlogged: set[int] = set()   # filed, block not yet in inbox.log
        self._handoff_results: dict[int, str | None] = {}  # filed this batch: its check
        self._log_fd: int | None = None
        self._log_ino = 0
        self._saved: ReceiveState | None = None
        # The crashed run's unconfirmed end of inbox.log, and how far we matched it.
        self._unconfirmed = b""
        self._unconfirmed_at = 0
        self._recovering = False

    def open(self) -> None:
        for name in os.listdir(self.layout.inbox):
            match = INBOX_NAME_RE.fullmatch(name)
            if match:
                self._ids.add(int(match.group(2)))
            elif name.startswith(".") and name.endswith(".tmp"):
                os.unlink(os.path.join(self.layout.inbox, name))  # a crash's half-written file
        self._open_log()
        state = load_state(self.layout.cursor)
        if state is not None and state.channel not in ("", self.channel):
            log.info("the channel changed from %s to %s: receiving %s from the start "
                     "(messages already in inbox/ are not filed again)",
                     state.channel, self.channel, self.channel)
            state = None
        if state is None:
            return
        self.since = state.since
        self._saved = state
        size = os.fstat(self._log_fd).st_size
        if state.log_bytes is not None and state.log_bytes <= size:
            self._recovering = True
            self._unconfirmed_at = state.log_bytes
            with open(self.layout.inbox_log, "rb") as handle:
                handle.seek(state.log_bytes)
                self._unconfirmed = handle.read(size - state.log_bytes)

    def close(self) -> None:
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

    def write_batch(self, messages: list[dict], now: float | None) -> list[tuple[int, str]]:
        """File a batch; returns (id, result) of the handoffs it checked as it filed them."""
        fresh = [m for m in messages if float(m["ts"]) > self.since]
        checked: list[tuple[int, str]] = []
        was_recovering = self._recovering
        filed = 0
        for message in fresh:
            message_id = int(message["id"])
            if message_id in self._ids:
                continue
            name = inbox_file_name(message)
            temp = os.path.join(self.layout.inbox, f".{name}.tmp")
            message = with_handoff_check(message)
            self._handoff_results[message_id] = message.get("handoff")
            if message.get("handoff"):
                checked.append((message_id, message["handoff"]))
            write_new_file(temp, format_inbox_file(message))
            os.rename(temp, os.path.join(self.layout.inbox, name))
            self._ids.add(message_id)
            self._unlogged.add(message_id)
            filed += 1
        if filed:
            fsync_dir(self.layout.inbox)

        if self._log_moved_away():
            self._open_log()
            self._unconfirmed = b""
        blocks, logged = [], []
        confirmed = recovered = 0
        for message in fresh:
            message_id = int(message["id"])
            block = inbox_block(self._as_filed(message)).encode("utf-8")
            if self._recovering:
                if self._confirm(block):
                    confirmed += 1
                    continue  # the run before wrote it
                if message_id in self._unlogged:
                    self._recovering = False  # filed by us: past what the crash left
                else:
                    recovered += 1
            elif message_id not in self._unlogged:
                continue  # filed and logged before
            blocks.append(block)
            logged.append(message_id)
        if was_recovering and fresh and filed < len(fresh):
            log.info("after a restart: %d messages were filed already, not again (%d of them "
                     "in inbox.log already, %d logged now)", len(fresh) - filed, confirmed,
                     recovered)
        if fresh:
            self._recovering = False
        if blocks:
            data = b"".join(blocks)
            view = memoryview(data)
            while view:
                view = view[os.write(self._log_fd, view):]
            os.fsync(self._log_fd)
            self._unlogged.difference_update(logged)
            self._print(data.decode("utf-8"))

        since = max([self.since] + [float(m["ts"]) for m in fresh])
        if isinstance(now, (int, float)) and math.isfinite(now) and now > since:
            since = float(now)
        self.since = since
        state = ReceiveState(since=since, channel=self.channel,
                             log_bytes=os.fstat(self._log_fd).st_size)
        if state != self._saved:
            save_state(self.layout.cursor, state)
            self._saved = state
        return checked

    def _as_filed(self, message: dict) -> dict:
        """The message with its handoff result as its inbox file records it, so a block
        written again after a crash is byte for byte the one written before."""
        message_id = int(message["id"])
        if message_id not in self._handoff_results:
            try:
                with open(os.path.join(self.layout.inbox, inbox_file_name(message)), "rb") as f:
                    headers, _ = parse_inbox_file(f.read())
                self._handoff_results[message_id] = headers.get("handoff")
            except (OSError, ValueError):
                self._handoff_results[message_id] = None
        result = self._handoff_results.pop(message_id)
        return {**message, "handoff": result} if result else message

    def _confirm(self, block: bytes) -> bool:
        """Is `block` next in the crashed run's end of the log? Cut a torn remainder if not."""
        if not self._unconfirmed:
            return False
        if self._unconfirmed.startswith(block):
            self._unconfirmed = self._unconfirmed[len(block):]
            self._unconfirmed_at += len(block)
            return True
        # Not the next block (a torn last block, or lines someone else added): keep every
        # complete block, cut only an unfinished one at the very end.
        rest = self._unconfirmed
        self._unconfirmed = b""
        if rest.endswith(BLOCK_END):
            return False
        last_end = rest.rfind(BLOCK_END)
        keep = last_end + len(BLOCK_END) if last_end >= 0 else 0
        cut_at = self._unconfirmed_at + keep
        log.warning("inbox.log ends in a half-written block (a crash); cutting it at byte %d "
                    "and writing the block again", cut_at)
        os.ftruncate(self._log_fd, cut_at)
        return False

    def _print(self, text: str) -> None:
        if self.out is None:
            return
        try:
            self.out.write(text)
            self.out.flush()
        except (BrokenPipeError, ValueError, OSError) as exc:
            log.warning("stdout is gone (%s); blocks now go only to inbox.log", exc)
            self.out = None


# -- the receive loop --------------------------------------------------------

class ReceiveLoop:
    """Long-polls the bus and hands each batch to the writer; never gives up."""

    def __init__(self, writer: InboxWriter, client: BusClient, name: str, channel: str,
                 stop: threading.Event, backoff: Backoff | None = None,
                 reporter: CheckReporter | None = None):
        self.writer = writer
        self.reporter = reporter
        self.client = client
        self.name = name
        self.channel = channel
        self.stop = stop
        self.backoff = backoff or Backoff(0.25, 5.0)
        # Held while a batch is being filed; shutdown takes it so no batch is cut short.
        self.busy = threading.Lock()

    def run(self) -> None:
        failing = False
        while not self.stop.is_set():
            try:
                # filed=True: our since is saved only once the files are durable.
                data = self.client.recv(self.name, since=self.writer.since, block=True,
                                        channel=self.channel, max_batch=RECV_BATCH, filed=True)
            except BusClientError as exc:
                if self.stop.is_set():
                    return
                delay = self.backoff.delay(exc.retry_after)
                level = logging.WARNING if not failing else logging.INFO
                log.log(level, "cannot receive: %s; retrying in %gs", exc, delay)
                failing = True
                self.stop.wait(delay)
                continue
            if failing:
                log.info("receiving again from %s", self.client.url)
            failing = False
            self.backoff.reset()
            messages = data.get("messages") or []
            with self.busy:
                if self.stop.is_set() and not messages:
                    return
                try:
                    checked = self.writer.write_batch(messages, data.get("now"))
                except Exception as exc:  # noqa: BLE001
                    # Disk full, or a message we cannot file: the cursor did not move,
                    # so the same batch comes again after the pause.
                    delay = self.backoff.delay()
                    log.exception("cannot file %d messages (%s); trying again in %gs",
                                  len(messages), exc, delay)
                    self.stop.wait(delay)
                    continue
            if checked and self.reporter is not None:
                self.reporter.report(checked)  # filed and durable: now tell the bus
