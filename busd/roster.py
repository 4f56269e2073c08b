"""Who is on the bus, and where messages are, as one principal may see them.

The roster (GET /agents, the console) and messages' receipt states with their handoff
checks (GET /status, the console) are assembled here from the store, the access rules
and the server's presence; the routes only answer what this module assembles.
"""
from __future__ import annotations

import time

from . import receipts
from .identity import Access, Principal
from .model import BROADCAST, StoredMessage
from .store import Store


def is_handoff(message: StoredMessage) -> bool:
    return isinstance(message.meta, dict) and message.meta.get("kind") == "handoff"


def is_recipient(message: StoredMessage, agent: str) -> bool:
    """Is `agent` one the message is for (addressed to it, or broadcast by another)?"""
    if message.to == BROADCAST:
        return agent != message.sender
    return message.to == agent


async def visible_pending(store: Store, access: Access, principal: Principal
                          ) -> dict[str, dict[str, int]]:
    """The store's pending counts, {channel: {recipient: count}}, on the channels this
    principal may see."""
    return _visible(access, principal, await store.pending_counts())


async def visible_queues(store: Store, access: Access, principal: Principal
                         ) -> dict[str, dict[str, int]]:
    """The store's queue lengths (rapid's /inbox: read or not), {channel: {recipient:
    count}}, on the channels this principal may see."""
    return _visible(access, principal, await store.queue_counts())


def _visible(access: Access, principal: Principal, by_channel: dict[str, dict[str, int]]
             ) -> dict[str, dict[str, int]]:
    return {channel: counts for channel, counts in by_channel.items()
            if access.sees_channel(principal, channel)}


async def roster(store: Store, access: Access, presence: receipts.Presence,
                 principal: Principal, pending: dict[str, dict[str, int]] | None = None
                 ) -> list[dict]:
    """The roster as /agents answers it; `pending` (admins): the pending counts this
    principal may see (visible_pending), if the caller already has them."""
    admin = principal.admin
    registered = {a["name"]: a for a in await store.registered_agents()}
    contacts = await store.last_contacts()
    if pending is None:
        # Queues are for admins (on their channels); others see no counts, and no names
        # known only from them.
        pending = await visible_pending(store, access, principal) if admin else {}
    now = time.time()
    entries = []
    waiting_for = {name for counts in pending.values() for name in counts}
    for name in sorted(set(registered) | set(contacts) | set(presence.parked) | waiting_for):
        seen = contacts.get(name)
        online = presence.online(name, seen, now)
        if not admin:
            # Details (identities, who registered whom, queues) are for admins once auth is on.
            entries.append({"name": name, "role": registered.get(name, {}).get("role", "agent"),
                            "online": online, "last_seen": seen})
            continue
        entry = dict(registered.get(name) or {"name": name, "identity": "", "role": "agent",
                                              "registered_by": None, "created_at": None})
        entry.update(registered=name in registered, online=online, last_seen=seen,
                     pending={channel: counts[name] for channel, counts in sorted(pending.items())
                              if name in counts})
        entries.append(entry)
    return entries


async def states(store: Store, messages: list[StoredMessage]) -> dict[int, dict]:
    """{id: {id, ts, from, to, channel, state, recipients, handoff?}} of stored messages;
    `handoff` ({agent: result}) where a recipient's daemon reported its check."""
    if not messages:
        return {}
    rows, marks = await store.receipts({m.channel for m in messages})
    reads = await store.reads([m.id for m in messages])
    found = {s["id"]: s for s in receipts.message_states(messages, rows, marks, reads)}
    checks = await store.handoff_checks([m.id for m in messages if is_handoff(m)])
    for message_id, reported in checks.items():
        found[message_id]["handoff"] = reported
    return found
