"""The receive rule: a since-cursor, how it advances, and the loop that follows the bus.

Every reader -- `agent-bus recv`, `agent-bus listen`, the daemon, the MCP server --
polls with its cursor, handles the batch, then calls `Cursor.advance(batch)`:
the cursor becomes the largest of itself, the batch's message ts and the reply's
`now` (when it is a finite number). The server makes that safe (PROTOCOLS.md §1):
every message committed later gets a larger ts than any `now` or ts it handed out,
and a batch cut short by `max` answers a `now` no larger than its last message.
A message at or below the cursor was handed out before and is never shown again.
"""
from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .client import BusClientError
from .fileio import write_atomically
from .jqtext import number

ErrorReport = Callable[[Exception, float], None]


def _finite(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def messages_of(batch: Any) -> list:
    """The messages of a /recv reply; nothing when the reply holds none (or no list)."""
    messages = batch.get("messages") if isinstance(batch, dict) else None
    return messages if isinstance(messages, list) else []


def stem(folder: str, name: str, channel: str) -> str:
    """Where a reader keeps its files for (name, channel): `folder/NAME@CHANNEL` ('@' and
    '%' never occur in names, so every pair has its own)."""
    return os.path.join(folder, f"{name}@{channel.replace('*', '%2A')}")


@dataclass
class Cursor:
    since: float = 0.0

    def is_new(self, message: Any) -> bool:
        ts = _finite(message.get("ts")) if isinstance(message, dict) else None
        return ts is not None and ts > self.since

    def fresh(self, batch: Any) -> list:
        """The batch's messages past the cursor, in the order the bus gave them."""
        return [m for m in messages_of(batch) if self.is_new(m)]

    def advance(self, batch: Any) -> bool:
        """Move past `batch` (the rule above); whether the cursor moved."""
        candidates = [self.since, _finite(batch.get("now")) if isinstance(batch, dict) else None]
        candidates += [_finite(m.get("ts")) for m in messages_of(batch) if isinstance(m, dict)]
        since = max(c for c in candidates if c is not None)
        moved, self.since = since != self.since, since
        return moved


class CursorFile:
    """A since-cursor kept in one file (the number, a newline), replaced atomically."""

    def __init__(self, path: str):
        self.path = path

    def load(self, default: float = 0.0) -> float:
        try:
            with open(self.path, encoding="ascii") as handle:
                content = handle.read().strip()
        except FileNotFoundError:
            return default
        value = None
        try:
            value = _finite(float(content)) if content else default
        except ValueError:
            pass
        if value is None:
            raise ValueError(f"{self.path}: not a cursor (a number of seconds); fix or delete it")
        return value

    def save(self, since: float) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700, exist_ok=True)
        write_atomically(self.path, number(since).encode("ascii") + b"\n")


@dataclass
class Backoff:
    """Capped exponential backoff: `initial`, twice that, ... up to `cap` seconds."""
    initial: float = 0.5
    cap: float = 10.0
    _next: float = 0.0

    def delay(self, hint: float | None = None) -> float:
        self._next = self.initial if self._next == 0 else min(self.cap, self._next * 2)
        return max(self._next, hint or 0.0)

    def reset(self) -> None:
        self._next = 0.0


def follow(poll: Callable[[], Any], stop: threading.Event, *, backoff: Backoff | None = None,
           on_error: ErrorReport | None = None, once: bool = False) -> Iterator[Any]:
    """Yield each reply of `poll()` (one long-poll) until `stop` is set.

    The caller handles a reply, then advances its cursor, before asking for the next.
    A transient error (the bus unreachable, 5xx, 429) is reported to `on_error` with
    the delay before the next try, and retried after it (the cursor is kept); a
    refusal, or with `once` any error, is raised. `once`: one reply, then stop.
    """
    backoff = backoff or Backoff()
    while not stop.is_set():
        try:
            reply = poll()
        except BusClientError as exc:
            if once or not exc.transient:
                raise
            if stop.is_set():
                return
            delay = backoff.delay(exc.retry_after)
            if on_error is not None:
                on_error(exc, delay)
            stop.wait(delay)
            continue
        backoff.reset()
        yield reply
        if once:
            return


def listen(client, name: str, *, channel: str = "default", cursor: CursorFile | None = None,
           since: float | None = None, stop: threading.Event | None = None,
           on_error: ErrorReport | None = None, once: bool = False) -> Iterator[dict]:
    """Yield every message for `name` once, in order, surviving bus restarts; the cursor
    (saved in `cursor`, if given) passes a batch when the next one is asked for."""
    stop = stop or threading.Event()
    position = Cursor(since if since is not None else cursor.load() if cursor else 0.0)

    def poll() -> dict:
        return client.recv(name, since=position.since, block=True, channel=channel)

    for batch in follow(poll, stop, on_error=on_error, once=once):
        yield from position.fresh(batch)
        if position.advance(batch) and cursor is not None:
            cursor.save(position.since)
