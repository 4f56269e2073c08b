"""The rapid protocol (PROTOCOLS.md §1): addressed messages and a since-cursor."""
from __future__ import annotations

from aiohttp import web

from .. import errors
from ..errors import BusError
from ..model import (NewMessage, check_body, check_channel, check_key, check_meta,
                     check_name, check_recipient)
from .common import (accept_send, bus_of, check_signature, long_poll, principal_of, query_batch,
                     query_bool, query_float, query_value, reply)

FIELDS = ("from", "to", "msg")


async def send(request: web.Request, body: dict) -> web.Response:
    bus = bus_of(request)
    limits = bus.settings.limits
    for name in FIELDS:
        if body.get(name) is None:
            raise BusError(errors.MISSING_FIELD, name)
    message = NewMessage(
        channel=check_channel(body.get("channel")),
        sender=check_name(body["from"], "from"),
        to=check_recipient(body["to"]),
        body=check_body(body["msg"], "msg", limits.max_msg_bytes, allow_empty=True),
        meta=check_meta(body.get("meta"), limits.max_meta_bytes),
        key=check_key(body.get("key")),
        signature=check_signature(body.get("signature")),
    )
    result = await accept_send(request, message, body.get("signed_at"), legacy=False,
                               allow_secret=body.get("allow_secret"))
    stored = result.message
    payload = {"ok": True, "ts": stored.ts, "channel": stored.channel, "id": stored.id}
    if result.duplicate:
        payload["duplicate"] = True
    return reply(payload)


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
    bus.access.check_read_as(principal_of(request), to, channel)

    async def fetch():
        return await bus.store.recv(to, channel, since, limit)

    received = await long_poll(bus, channel, to, fetch, block,
                               has_messages=lambda batch: bool(batch.messages))
    messages, now = received.messages, received.now
    bus.store.acknowledge(to, channel, since)
    bus.metrics.handed_out(messages)
    if len(messages) >= limit:
        # A cut batch: the client moves its cursor to `now`, so `now` must not pass
        # the last message returned, or the rest of the backlog is skipped.
        now = messages[-1].ts
    return reply({"messages": [m.as_rapid() for m in messages], "now": now})


async def inbox(request: web.Request) -> web.Response:
    bus = bus_of(request)
    bus.access.check_admin(principal_of(request))
    now = await bus.store.now()
    return reply({"recipients": await bus.store.pending_counts(), "now": now})


async def healthz(request: web.Request) -> web.Response:
    return reply({"ok": True, "now": await bus_of(request).store.now()})
