"""Handoff checks on the server: a recipient's daemon reports what it found.

Only the recipient's daemon can tell whether a handed-off file was reachable and
matched (it runs where the file should be), and it records that in its own inbox
file. POST /handoff-checks lets it tell the bus too, so an operator sees it in the
console and senders in GET /status. Only a recipient of the message may report.

A message that does not exist, is not addressed to the reporting agent, or lies on a
channel its token may not use gets one and the same answer: a report tells nobody
anything about messages that are not theirs.
"""
from __future__ import annotations

from aiohttp import web

from .. import errors
from ..errors import BusError
from ..handoff import REPORTED
from ..model import check_name
from ..roster import is_handoff, is_recipient
from .common import bus_of, principal_of, read_json_object, reply

# verified, mismatch, not checked; `unreachable` (older daemons) told a sender what exists
# on the recipient's machine, and is refused. Rows stored before stay readable.
RESULTS = REPORTED


async def report(request: web.Request) -> web.Response:
    """POST /handoff-checks {"id", "agent", "result"}: agent's daemon checked handoff id."""
    bus = bus_of(request)
    body = await read_json_object(request)
    message_id = body.get("id")
    if message_id is None:
        raise BusError(errors.MISSING_FIELD, "id (the handoff message's id)")
    if not isinstance(message_id, int) or isinstance(message_id, bool) or message_id < 1:
        raise BusError(errors.WRONG_TYPE, "id must be a message id (a whole number from 1)")
    agent = check_name(body.get("agent"), "agent")
    result = body.get("result")
    if result not in RESULTS:
        raise BusError(errors.WRONG_TYPE, f"result must be one of {', '.join(RESULTS)}")
    principal = principal_of(request)
    # A token reports only as its own agent (asked before anything about the message).
    bus.access.check_read_as(principal, agent, None)
    # Beyond what a database integer holds, no message can have that id.
    found = await bus.store.messages_by_id([message_id]) if message_id < 2 ** 63 else []
    message = found[0] if found else None
    if (message is None or not is_recipient(message, agent)
            or not bus.access.sees_channel(principal, message.channel)):
        raise BusError(errors.NO_SUCH_MESSAGE, f"{agent} has no message with id {message_id}; "
                                               "only a recipient's daemon reports its check")
    if not is_handoff(message):
        raise BusError(errors.NOT_A_HANDOFF, f"id {message_id}")
    await bus.store.record_handoff_check(message_id, agent, result)
    bus.hub.changed()
    return reply({"ok": True})
