"""What every route shares: the bus of the request, strict parsing, JSON replies."""
from __future__ import annotations

import asyncio
import json
import math

from aiohttp import web

from .. import errors, service
from ..errors import BusError
from ..identity import Principal
from ..model import NewMessage, SendResult, check_key, check_meta
from ..service import Bus


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
    """A /send of either protocol: the fields both share (meta, key, signature, signed_at,
    allow_secret) read from the body, then the one send flow (service.send)."""
    bus = bus_of(request)
    message = NewMessage(channel=channel, sender=sender, to=to, body=text,
                         meta=check_meta(body.get("meta"), bus.settings.limits.max_meta_bytes),
                         key=check_key(body.get("key")),
                         signature=check_signature(body.get("signature")))
    return await service.send(bus, principal_of(request), message,
                              signed_at=body.get("signed_at"), legacy=legacy,
                              allow_secret=body.get("allow_secret") is True)
