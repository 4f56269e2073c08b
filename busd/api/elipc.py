"""The el-ipc protocol (PROTOCOLS.md §2): channel broadcasts with per-agent watermarks.

An el-ipc send is a broadcast (`to` = "*") on its channel, so rapid receivers on
that channel get it too; a reader's watermark only ever moves forward.
"""
from __future__ import annotations

from aiohttp import web

from .. import __version__, errors, service
from ..errors import BusError
from ..model import check_body, check_channel, check_name
from .common import accept_send, bus_of, principal_of, query_bool, query_value, reply

FIELDS = ("channel", "sender", "content")


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
    channel, agent = _channel_and_agent(request)
    found = await service.read_unread(bus_of(request), principal_of(request), channel, agent,
                                      wait=query_bool(request, "wait", False))
    return reply([m.as_elipc() for m in found])


async def channels(request: web.Request) -> web.Response:
    return reply(await service.channels(bus_of(request), principal_of(request)))


async def agents(request: web.Request) -> web.Response:
    return reply(await service.agents(bus_of(request), principal_of(request)))


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
    return reply(await service.card(bus_of(request), f"{request.scheme}://{request.host}",
                                    __version__))
