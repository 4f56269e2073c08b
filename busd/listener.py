"""The unattended listener: every message for an agent, logged once, to plain files.

Per message, one JSON line in the *full* log and one `ts<TAB>from<TAB>summary` line in
the *summary* log; a *heartbeat* file is touched after every successful poll, so its
age says how current the logs are. A cursor file, kept beside the logs, moves only
after a batch is in both logs, and at start the ts of the full log's last line is
honoured too, so a crash between the two writes still logs nothing twice.

bin/bus-listen writes the same bytes (see ListenPaths.for_agent for the file names).
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass

from .client import BusClient
from .jqtext import dumps, number
from . import receive
from .receive import Cursor, CursorFile, ErrorReport, follow

SUMMARY_CHARS = 120


@dataclass(frozen=True)
class ListenPaths:
    full: str
    summary: str
    heartbeat: str
    cursor: str

    @classmethod
    def for_agent(cls, folder: str, name: str, channel: str, *, full: str | None = None,
                  summary: str | None = None, heartbeat: str | None = None) -> "ListenPaths":
        stem = receive.stem(folder, name, channel)
        return cls(full=full or stem + ".jsonl", summary=summary or stem + ".tsv",
                   heartbeat=heartbeat or stem + ".heartbeat", cursor=stem + ".cursor")


def full_line(message: dict) -> str:
    return dumps(message) + "\n"


def summary_line(message: dict) -> str:
    """`ts<TAB>from<TAB>the first 120 characters`, newlines shown as " | " and tabs and
    carriage returns as spaces, so that every message is one line of three columns.
    (The 120 are counted after that, as `agent-bus inbox` counts its preview.)"""
    shown = str(message.get("msg", ""))
    shown = shown.replace("\n", " | ").replace("\r", " ").replace("\t", " ")[:SUMMARY_CHARS]
    return f"{number(message.get('ts', 0))}\t{message.get('from')}\t{shown}\n"


class ListenLog:
    """The files one listener owns."""

    def __init__(self, paths: ListenPaths):
        self.paths = paths
        self.cursor = CursorFile(paths.cursor)

    def prepare(self) -> None:
        for path in (self.paths.full, self.paths.summary, self.paths.heartbeat,
                     self.paths.cursor):
            os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        for path in (self.paths.full, self.paths.summary):
            _end_with_newline(path)

    def resume_point(self) -> float:
        """Where to start: the saved cursor, or the last logged ts if that is later."""
        since = self.cursor.load(0.0)
        last = _last_logged_ts(self.paths.full)
        return max(since, last) if last is not None else since

    def append(self, messages: list[dict]) -> None:
        if not messages:
            return
        for path, line in ((self.paths.full, full_line), (self.paths.summary, summary_line)):
            with open(path, "a", encoding="utf-8", newline="") as handle:
                handle.write("".join(line(m) for m in messages))

    def beat(self) -> None:
        with open(self.paths.heartbeat, "a", encoding="ascii"):
            pass
        os.utime(self.paths.heartbeat, None)


def run(client: BusClient, log: ListenLog, name: str, *, channel: str = "default",
        since: float | None = None, once: bool = False,
        stop: threading.Event | None = None, on_error: ErrorReport | None = None) -> None:
    """Log every message for `name` until `stop` (or after one poll, with `once`): append
    the batch, move the cursor, beat. Errors are retried as receive.follow says."""
    log.prepare()
    cursor = Cursor(log.resume_point() if since is None else since)

    def poll() -> dict:
        return client.recv(name, since=cursor.since, block=True, channel=channel)

    for batch in follow(poll, stop or threading.Event(), on_error=on_error, once=once):
        log.append(cursor.fresh(batch))
        if cursor.advance(batch):
            log.cursor.save(cursor.since)
        log.beat()


def _end_with_newline(path: str) -> None:
    """A crash mid-append can leave a partial last line; end it so the next is whole."""
    try:
        with open(path, "rb+") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() == 0:
                return
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                handle.write(b"\n")
    except FileNotFoundError:
        pass


def _last_logged_ts(path: str) -> float | None:
    """The ts of the full log's last complete line, or None."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            end = handle.tell()
            chunk = 65536
            while True:
                start = max(0, end - chunk)
                handle.seek(start)
                tail = handle.read(end - start)
                lines = tail.rstrip(b"\n").rsplit(b"\n", 1)
                if len(lines) == 2 or start == 0:
                    break
                chunk *= 4
    except FileNotFoundError:
        return None
    try:
        ts = json.loads(lines[-1].decode("utf-8")).get("ts")
    except (ValueError, AttributeError):
        return None
    return float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else None
