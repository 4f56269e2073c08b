"""The spool's cursor file: where the next receive starts, for which channel, and how
much of inbox.log that covers. The inbox writer (agent/inbox.py) keeps it; the Claude
Code hooks' fast path reads it (hooks.nothing_new), so this module imports only json
(and collections, which json brings anyway): anything heavier costs that path more
than its whole time.
"""
from __future__ import annotations

import json
from collections import namedtuple


class ReceiveState(namedtuple("ReceiveState", "since channel log_bytes")):
    """What the cursor file holds: `since` (where to poll from), `channel` (what was
    received; "" when the file is a bare number someone wrote by hand) and `log_bytes`
    (how much of inbox.log that covers; None: not known)."""
    __slots__ = ()

    def serves(self, channel: str) -> bool:
        """Does a writer for `channel` resume from here? A file kept for another channel
        does not: that writer receives its channel from the start."""
        return self.channel in ("", channel)


class BadCursorFile(ValueError):
    """The cursor file holds something else (torn by a power cut, or edited)."""


def load_state(path: str) -> ReceiveState | None:
    """The cursor file at `path`; None when there is none. BadCursorFile when it is not
    one: starting over is safe then, nothing is filed twice."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read().strip()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise BadCursorFile(f"{path} is not a cursor file (not UTF-8 text)") from None
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
        raise BadCursorFile(f"{path} is not a cursor file ({text[:60]!r})") from None


def save_state(path: str, state: ReceiveState) -> None:
    from ..fileio import write_atomically

    text = json.dumps({"since": state.since, "channel": state.channel,
                       "inbox_log_bytes": state.log_bytes})
    write_atomically(path, text.encode() + b"\n")
