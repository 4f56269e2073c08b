"""What every route shares: the bus context, strict parsing, JSON replies, the long-poll."""
from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, TypeVar

from aiohttp import web

from .. import agent_card, errors, secretguard
from ..errors import BusError
from ..identity import Access, Principal
from ..metrics import BusMetrics
from ..receipts import Presence
from ..model import Limits, NewMessage, SendResult, check_key, check_meta
from ..store import Store
from ..waiters import Waiter, WaiterHub


@dataclass
class BusSettings:
    hold_seconds: float = 25.0          # long-poll hold; clients time out at 35 s
    default_batch: int = 100            # rapid's default `max`
    max_batch: int = 1000               # most messages one read hands out; a larger `max` gets this
    body_timeout: float = 10.0          # a body must arrive within this
    secret_guard: bool = False          # refuse bodies that look like keys or credentials
    online_window: float = 60.0         # contact this recent counts as online
    limits: Limits = field(default_factory=Limits)
    card_name: str = agent_card.DEFAULT_NAME
    card_description: str = agent_card.DEFAULT_DESCRIPTION
    public_url: str = ""                # the card's url; "" = as the request reached the bus


@dataclass
class Bus:
    store: Store
    settings: BusSettings
    access: Access
    hub: WaiterHub = field(default_factory=WaiterHub)
    metrics: BusMetrics = None  # type: ignore[assignment]
    presence: Presence = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.presence is None:
            self.presence = Presence(self.settings.online_window)
        if self.metrics is None:
            self.metrics = BusMetrics(parked_waiters=lambda: len(self.hub),
                                      wakeups=lambda: self.hub.wakeups)

    def committed(self, messages) -> None:
        """The store made these visible: wake their receivers, count them."""
        self.hub.publish(messages)
        self.metrics.committed(messages)


BUS = web.AppKey("bus", Bus)
# Error replies keep their table code on the response object, for the metrics.
ERROR_CODE = "error_code"
PRINCIPAL = "principal"


def bus_of(request: web.Request) -> Bus:
    return request.app[BUS]


def principal_of(request: web.Request) -> Principal:
    return request[PRINCIPAL]


def reply(payload: object, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(payload).encode(), status=status,
                        content_type="application/json")


def error_reply(exc: BusError) -> web.Response:
    response = reply(exc.as_json(), status=exc.http_status)
    response.headers.update(exc.headers)
    response[ERROR_CODE] = str(exc.kind.code)
    if exc.close_connection:
        # The rest of this connection's bytes can no longer be trusted as requests.
        response.force_close()
    return response


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed in JSON")


# NaN and Infinity are not JSON; Python's decoder would accept them.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


async def read_json_object(request: web.Request) -> dict:
    bus = bus_of(request)
    limit = bus.settings.limits.max_request_bytes
    if request.content_length is not None and request.content_length > limit:
        raise BusError(errors.BODY_TOO_LARGE, f"{request.content_length} bytes, the limit is {limit}",
                       close_connection=True)
    try:
        if request.content.is_eof():
            raw = await request.read()  # already here whole: no timer needed
        else:
            async with asyncio.timeout(bus.settings.body_timeout):
                raw = await request.read()
    except asyncio.TimeoutError:
        raise BusError(errors.BODY_TIMEOUT, close_connection=True) from None
    except web.HTTPRequestEntityTooLarge:
        raise BusError(errors.BODY_TOO_LARGE, f"the limit is {limit} bytes",
                       close_connection=True) from None
    if not raw.strip():
        raise BusError(errors.EMPTY_BODY)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BusError(errors.BAD_ENCODING, f"at byte {exc.start}") from None
    try:
        body = _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        raise BusError(errors.BAD_JSON, str(exc)[:120]) from None
    if not isinstance(body, dict):
        raise BusError(errors.NOT_AN_OBJECT, "got " + type(body).__name__)
    return body


def query_value(request: web.Request, name: str) -> str | None:
    values = request.rel_url.query.getall(name, [])
    if len(values) > 1:
        raise BusError(errors.BAD_PARAM, f"{name} is given {len(values)} times")
    return values[0] if values else None


def query_float(request: web.Request, name: str, default: float) -> float:
    text = query_value(request, name)
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise BusError(errors.BAD_PARAM, f"{name} must be a finite number of seconds, got {text[:40]!r}")
    return value


def query_bool(request: web.Request, name: str, default: bool) -> bool:
    text = query_value(request, name)
    if text is None or text == "":
        return default
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise BusError(errors.BAD_PARAM, f"{name} must be true or false, got {text[:40]!r}")


def query_batch(request: web.Request, name: str = "max") -> int:
    """rapid's `max`: a soft cap, as in the reference server. Any whole number from 1 up
    is served; above the bus's limit it is served as the limit (the reply's `now` then
    stops at the last message, so a cursor-following reader still gets the rest)."""
    settings = bus_of(request).settings
    text = query_value(request, name)
    if text is None or text == "":
        return settings.default_batch
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise BusError(errors.BAD_PARAM,
                       f"{name} must be a whole number, 1 or more, got {text[:40]!r}")
    return min(value, settings.max_batch)


def check_signature(value: object) -> str | None:
    if value in (None, ""):
        return None
    # Printable: a control character is never base64, and PostgreSQL text refuses NUL.
    if (not isinstance(value, str) or len(value) > 200 or not value.isascii()
            or not value.isprintable()):
        raise BusError(errors.BAD_SIGNATURE_FORMAT, "expected base64 text")
    return value


async def accept_send(request: web.Request, body: dict, legacy: bool, *, channel: str,
                      sender: str, to: str, text: str) -> SendResult:
    """The one way a send is stored: the fields both protocols share (meta, key,
    signature) checked, who may send it, its signature, then a durable commit."""
    bus = bus_of(request)
    message = NewMessage(channel=channel, sender=sender, to=to, body=text,
                         meta=check_meta(body.get("meta"), bus.settings.limits.max_meta_bytes),
                         key=check_key(body.get("key")),
                         signature=check_signature(body.get("signature")))
    signed_at = body.get("signed_at")
    if bus.settings.secret_guard and body.get("allow_secret") is not True:
        if problem := secretguard.refusal(message.body):
            raise BusError(errors.SECRET_REFUSED,
                           problem.replace("--allow-secret", '"allow_secret": true'))
    if signed_at is not None and (not isinstance(signed_at, int) or isinstance(signed_at, bool)):
        raise BusError(errors.WRONG_TYPE, "signed_at must be whole milliseconds since 1970")
    bus.access.check_send_as(principal_of(request), message.sender, message.channel)
    message = await bus.access.verify_send(message, signed_at, legacy)
    bus.store.note_contact(message.sender)
    result = await bus.store.append(message)
    if result.duplicate and message.signature and signed_at is not None:
        first = result.message
        raise BusError(errors.REPLAY, fields={"id": first.id, "ts": first.ts})
    return result


Found = TypeVar("Found")


async def wait_for_news(bus: Bus, fetch: Callable[[], Awaitable[Found]], block: bool,
                news: Callable[[Found], bool], register: Callable[[], Waiter]) -> Found:
    """Fetch; if `block` and nothing is news, wait for a wake-up (or the hold) and look
    again. Returns what the last fetch found (a rapid fetch carries its own safe `now`)."""
    if not block or bus.hub.closed:
        return await fetch()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bus.settings.hold_seconds
    while True:
        # Registered before looking, so a change between the look and the wait still wakes us.
        waiter = register()
        try:
            found = await fetch()
            remaining = deadline - loop.time()
            if news(found) or remaining <= 0 or bus.hub.closed:
                return found
            await waiter.wait(remaining)
        finally:
            bus.hub.unregister(waiter)


async def long_poll(bus: Bus, channel: str, name: str, fetch: Callable[[], Awaitable[Found]],
                    block: bool, has_messages: Callable[[Found], bool]) -> Found:
    """Fetch; if nothing and `block`, park (seen as present) until a matching commit or
    the hold ends."""
    if not block or bus.hub.closed:
        return await fetch()
    bus.presence.parked_now(name)
    bus.hub.changed()  # presence: the console shows who is listening
    hung_up = False
    try:
        return await wait_for_news(bus, fetch, True, has_messages, lambda: bus.hub.register(channel, name))
    except asyncio.CancelledError:
        hung_up = True  # the client went away (the server cancels its handler)
        raise
    finally:
        bus.presence.unparked(name, hung_up, time.time())
        bus.hub.changed()
