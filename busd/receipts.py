"""Delivery receipts and presence: what a sender may know about its messages and peers.

A message's state, per recipient:
  queued     stored; the recipient has not fetched it
  delivered  the recipient's receive loop fetched it (a recv returned it, or its
             since-cursor passed it, or its el-ipc watermark did)
  filed      the recipient's daemon says its inbox file is durable: the daemon polls
             with `filed=true`, and its since-cursor (saved only after the file is
             fsynced) has passed the message
  read       the recipient reported that it was shown the message: a Claude Code hook
             put it in the model's context, an MCP tool returned it, or a person read it
             (`agent-bus inbox --read`). Reported per message (POST /read), so it needs
             no order; it implies filed.

The recipient-side cursor is what moves a message on, so one fetched but lost before
filing stays `delivered` and is fetched again. A broadcast's recipients are the
agents known to read its channel (they have polled it); its state is the least
advanced of theirs.
"""
from __future__ import annotations

from dataclasses import dataclass

QUEUED, DELIVERED, FILED, READ = "queued", "delivered", "filed", "read"
ORDER = {QUEUED: 0, DELIVERED: 1, FILED: 2, READ: 3}
STATES = tuple(ORDER)


@dataclass(frozen=True)
class ReceiptRow:
    """What one reader's polls on one channel ("*": all channels) have told the server."""
    agent: str
    channel: str
    delivered: float     # the newest ts handed to it, or passed by its cursor
    filed: float         # its filed cursor (0 if it never polled with filed=true)


@dataclass(frozen=True)
class WatermarkRow:
    agent: str
    channel: str
    last_id: int


def reached(state: str, target: str) -> bool:
    return ORDER[state] >= ORDER[target]


def _state_for(ts: float, message_id: int, rows: list[ReceiptRow],
               watermark: int | None, read: bool) -> str:
    if read:
        return READ
    filed = max((r.filed for r in rows), default=0.0)
    delivered = max((r.delivered for r in rows), default=0.0)
    if filed >= ts:
        return FILED
    if delivered >= ts or (watermark is not None and watermark >= message_id):
        return DELIVERED
    return QUEUED


def message_states(messages, receipts: list[ReceiptRow], watermarks: list[WatermarkRow],
                   reads: dict[int, set[str]] | None = None) -> list[dict]:
    """[{id, ts, from, to, channel, state, recipients: {name: state}}] for stored messages;
    `reads`: {message id: the recipients that reported reading it}."""
    reads = reads or {}
    by_agent: dict[str, list[ReceiptRow]] = {}
    for row in receipts:
        by_agent.setdefault(row.agent, []).append(row)
    marks = {(w.agent, w.channel): w.last_id for w in watermarks}
    out = []
    for message in messages:
        if message.to == "*":
            readers = sorted({r.agent for r in receipts if r.channel in (message.channel, "*")}
                             | {a for (a, c) in marks if c == message.channel})
            readers = [name for name in readers if name != message.sender]
        else:
            readers = [message.to]
        recipients = {}
        read_by = reads.get(message.id, set())
        if message.to == "*":
            # One that read a broadcast is a reader of its channel, polled or not.
            readers = sorted(set(readers) | (read_by - {message.sender}))
        for name in readers:
            rows = [r for r in by_agent.get(name, []) if r.channel in (message.channel, "*")]
            recipients[name] = _state_for(message.ts, message.id, rows,
                                          marks.get((name, message.channel)), name in read_by)
        overall = min(recipients.values(), key=ORDER.__getitem__) if recipients else QUEUED
        out.append({"id": message.id, "ts": message.ts, "from": message.sender,
                    "to": message.to, "channel": message.channel, "state": overall,
                    "recipients": recipients})
    return out


class Presence:
    """Who is listening now, as one server sees it.

    Online: a long-poll parked here right now, or contact within `window` seconds
    that was not followed by the agent hanging up (a parked poll whose client went
    away). Last contact is shared through the store, so replicas agree on it.
    """

    def __init__(self, window: float = 60.0):
        self.window = window
        self.parked: dict[str, int] = {}
        self.departed: dict[str, float] = {}

    def parked_now(self, name: str) -> None:
        self.parked[name] = self.parked.get(name, 0) + 1
        self.departed.pop(name, None)

    def unparked(self, name: str, hung_up: bool, now: float) -> None:
        left = self.parked.get(name, 1) - 1
        if left > 0:
            self.parked[name] = left
            return
        self.parked.pop(name, None)
        if hung_up:
            self.departed[name] = now

    def online(self, name: str, last_seen: float | None, now: float) -> bool:
        if self.parked.get(name):
            return True
        if last_seen is None or now - last_seen > self.window:
            return False
        return self.departed.get(name, 0.0) < last_seen
