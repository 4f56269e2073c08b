"""The el-ipc protocol (PROTOCOLS.md §2): channel broadcasts with per-agent watermarks.

An el-ipc send is a broadcast (`to` = "*") on its channel, so rapid receivers on
that channel get it too; a reader's watermark only ever moves forward.
"""
from __future__ import annotations

from aiohttp import web

from .. import __version__, agent_card as agent_cards, errors, roster
from ..errors import BusError
from ..model import check_body, check_channel, check_name
from .common import accept_send, bus_of, long_poll, principal_of, query_bool, query_value, reply

FIELDS = ("channel", "sender", "content")
READ_BATCH = 1000


async def send(request: web.Request, body: dict) -> web.Response:
    bus = bus_of(request)
    limits = bus.settings.limits
    for name in FIELDS:
        if body.get(name) in (None, ""):
            raise BusError(errors.MISSING_FIELD, name)
    result = await accept_send(
        request, body, legacy=True, channel=check_channel(body["channel"]),
        sender=check_name(body["sender"], "sender"), to="*",
        text=check_body(body["content"], "content", limits.max_msg_bytes, allow_empty=False))
    return reply({"ok": True, "id": result.message.id})


async def register(request: web.Request, body: dict) -> web.Response:
    """Register an agent's public key, authorised by an operator's signature.

    Unlike the older el-ipc server, the operator's private key never travels:
    a request carrying one is refused (see Access.register).
    """
    name, operator = await bus_of(request).access.register(body)
    return reply({"ok": True, "message": f"Agent '{name}' registered by operator '{operator}'"})


def _channel_and_agent(request: web.Request) -> tuple[str, str]:
    channel = query_value(request, "channel")
    agent = query_value(request, "agent")
    if not channel or not agent:
        raise BusError(errors.MISSING_FIELD, "channel and agent query parameters are required")
    return check_channel(channel), check_name(agent, "agent")


async def messages(request: web.Request) -> web.Response:
    bus = bus_of(request)
    channel, agent = _channel_and_agent(request)
    wait = query_bool(request, "wait", False)
    bus.access.check_read_as(principal_of(request), agent, channel)
    bus.store.note_contact(agent)

    async def fetch():
        return await bus.store.read_unread(agent, channel, READ_BATCH)

    found = await long_poll(bus, channel, agent, fetch, wait, has_messages=bool)
    if found:
        bus.hub.changed()  # the watermark moved: these are delivered now
    bus.metrics.handed_out(found)
    return reply([m.as_elipc() for m in found])


async def channels(request: web.Request) -> web.Response:
    bus = bus_of(request)
    principal = principal_of(request)
    bus.access.check_admin(principal)
    return reply([row for row in await bus.store.channels()
                  if bus.access.sees_channel(principal, row["channel"])])


async def agents(request: web.Request) -> web.Response:
    """The roster: registered agents and every agent that has talked to the bus, with
    whether it can receive right now (el-ipc's fields, and ours beside them)."""
    bus = bus_of(request)
    principal = principal_of(request)
    if not principal.admin:
        bus.access.require_token(principal)
    return reply(await roster.roster(bus.store, bus.access, bus.presence, principal))


async def health(request: web.Request) -> web.Response:
    bus = bus_of(request)
    pending = 0
    if query_value(request, "channel") or query_value(request, "agent"):
        channel, agent = _channel_and_agent(request)
        bus.access.check_read_as(principal_of(request), agent, channel)
        pending = await bus.store.count_unread(agent, channel)
    return reply({"status": "ok", "pending": pending,
                  "secure_mode": await bus.access.secure_mode()})


async def agent_card(request: web.Request) -> web.Response:
    bus = bus_of(request)
    settings = bus.settings
    return reply(agent_cards.build(
        name=settings.card_name, description=settings.card_description,
        url=settings.public_url or f"{request.scheme}://{request.host}", version=__version__,
        tokens=await bus.store.auth_enabled(), operator_key=await bus.store.first_operator_key()))
