"""The rapid protocol (PROTOCOLS.md §1): addressed messages and a since-cursor."""
from __future__ import annotations

import time

from aiohttp import web

from .. import errors, roster, service
from ..errors import BusError
from ..model import check_body, check_channel, check_name, check_recipient
from ..service import long_poll
from .common import (accept_send, bus_of, principal_of, query_batch, query_bool, query_float,
                     query_value, read_json_object, reply)

FIELDS = ("from", "to", "msg")


async def send(request: web.Request, body: dict) -> web.Response:
    bus = bus_of(request)
    limits = bus.settings.limits
    for name in FIELDS:
        if body.get(name) is None:
            raise BusError(errors.MISSING_FIELD, name)
    result = await accept_send(
        request, body, legacy=False, channel=check_channel(body.get("channel")),
        sender=check_name(body["from"], "from"), to=check_recipient(body["to"]),
        text=check_body(body["msg"], "msg", limits.max_msg_bytes, allow_empty=True))
    return reply(service.send_ack(result))


async def recv(request: web.Request) -> web.Response:
    bus = bus_of(request)
    to = query_value(request, "to")
    if to is None or to == "":
        raise BusError(errors.MISSING_FIELD, "to (the recipient name) is required")
    to = check_name(to, "to")
    channel = check_channel(query_value(request, "channel"), allow_all=True)
    since = query_float(request, "since", 0.0)
    block = query_bool(request, "block", False)
    limit = query_batch(request)
    filed = query_bool(request, "filed", False)
    bus.access.check_read_as(principal_of(request), to, channel)
    bus.store.note_contact(to)
    # The poll is the receipt: since says what reached the reader (filed, from a daemon
    # that saves its cursor only after its inbox files are durable). Noted before the
    # park, so a sender waiting for `filed` does not wait out the hold.
    bus.store.acknowledge(to, channel, since, since, filed)
    bus.hub.changed()  # receipts may have moved: the console shows them

    async def fetch():
        return await bus.store.recv(to, channel, since, limit)

    received = await long_poll(bus, channel, to, fetch, block,
                               has_messages=lambda batch: bool(batch.messages))
    messages, now = received.messages, received.now
    if messages:
        bus.store.acknowledge(to, channel, since, messages[-1].ts, filed)
        bus.hub.changed()
    bus.metrics.handed_out(messages)
    if len(messages) >= limit:
        # A cut batch: the client moves its cursor to `now`, so `now` must not pass
        # the last message returned, or the rest of the backlog is skipped.
        now = messages[-1].ts
    return reply({"messages": [m.as_rapid() for m in messages], "now": now})


async def inbox(request: web.Request) -> web.Response:
    """Every queue's length as the reference server counts it: the messages the bus holds
    per channel and recipient, read or not (a broadcast once, under "*")."""
    bus = bus_of(request)
    principal = principal_of(request)
    bus.access.check_admin(principal)
    now = await bus.store.now()
    return reply({"recipients": await roster.visible_queues(bus.store, bus.access, principal),
                  "now": now})


async def healthz(request: web.Request) -> web.Response:
    return reply({"ok": True, "now": await bus_of(request).store.now()})


MAX_STATUS_IDS = 100


async def status(request: web.Request) -> web.Response:
    """Receipt states of messages: queued, delivered, filed, read (per recipient for
    broadcasts)."""
    bus = bus_of(request)
    texts = request.rel_url.query.getall("id", [])
    if not texts:
        raise BusError(errors.MISSING_FIELD, "id (one or more message ids: ?id=4&id=5)")
    if len(texts) > MAX_STATUS_IDS:
        raise BusError(errors.BAD_PARAM, f"at most {MAX_STATUS_IDS} ids at once")
    try:
        ids = [int(text) for text in texts]
    except ValueError:
        raise BusError(errors.BAD_PARAM, "id must be a whole number") from None
    return reply({"messages": await service.states(bus, principal_of(request), ids)})


MAX_READ_IDS = 1000


async def mark_read(request: web.Request) -> web.Response:
    """POST /read {"agent", "ids"}: agent was shown these messages (a hook put them in its
    model's context, an MCP tool returned them, a person read them): their state becomes
    `read`. Only a recipient marks a message, with its own token; ids that are not its
    messages (or lie on channels its token may not use) are answered as `unknown`,
    unmarked, the same whether they exist or not."""
    bus = bus_of(request)
    body = await read_json_object(request)
    agent = check_name(body.get("agent"), "agent")
    ids = body.get("ids")
    if (not isinstance(ids, list) or not ids or len(ids) > MAX_READ_IDS
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in ids)):
        raise BusError(errors.WRONG_TYPE,
                       f"ids must be a list of 1 to {MAX_READ_IDS} message ids (whole numbers "
                       "from 1)")
    principal = principal_of(request)
    # A token marks only its own agent's messages (asked before anything about them).
    bus.access.check_read_as(principal, agent, None)
    wanted = sorted({i for i in ids if i < 2 ** 63})
    mine = [m.id for m in await bus.store.messages_by_id(wanted)
            if roster.is_recipient(m, agent) and bus.access.sees_channel(principal, m.channel)]
    if mine:
        await bus.store.record_reads(agent, mine)
        bus.hub.changed()  # the console shows receipts
    marked = set(mine)
    return reply({"ok": True, "read": sorted(marked),
                  "unknown": sorted({i for i in ids if i not in marked})})


async def undelivered(request: web.Request) -> web.Response:
    """Dead letters: addressed messages nobody fetched for a while, or sent to a name
    that has never talked to the bus."""
    bus = bus_of(request)
    principal = principal_of(request)
    bus.access.check_admin(principal)
    older = query_float(request, "older", 600.0)
    if older < 0:
        raise BusError(errors.BAD_PARAM, "older must be 0 or more seconds")
    found = await bus.store.undelivered(time.time() - older)
    return reply({"messages": [entry for entry in found
                               if bus.access.sees_channel(principal, entry["channel"])]})
