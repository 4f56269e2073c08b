"""The operator console: GET /ui, its two assets, its live feed, and the browser's login.

The page is one HTML file, one script and one style sheet from busd/ui/, served by
the bus itself (no build step, nothing from elsewhere). Its data comes from one
route, GET /ui/feed: recent messages of every recipient with their receipt states
and handoff checks, the roster and the channels. The feed is a long-poll on a
watcher of the WaiterHub: it answers when a message is committed or when something
the page shows moved without one (a receipt, presence, a handoff check).

Browser auth. A page load cannot carry an Authorization header, so once auth is on
a browser logs in with a form: POST /ui/login with an admin token sets a cookie
that holds the token, HttpOnly (no script can read it), SameSite=Strict (no other
site's page can make the browser send it), Path=/ui (no other route gets it) and
Secure under TLS; it lasts until the browser closes or POST /ui/logout. The token
never sits in a URL or the history, and revoking it ends the session at once.
Without it, the page and the feed answer 401 (the page with the login form).
In open mode (loopback, no tokens) the console needs no login, like every route.
"""
from __future__ import annotations

import asyncio
import html
import string
import time
from functools import lru_cache
from importlib import resources
from typing import Mapping

from aiohttp import web

from .. import __version__, errors, roster
from ..errors import BusError
from ..identity import OPEN, Principal
from ..model import StoredMessage, check_channel, check_name
from ..service import wait_for_news
from .common import bus_of, principal_of, query_bool, query_value, reply

PREFIX = "/ui"
COOKIE = "agent_bus_console"
ASSETS = {"console.js": "text/javascript", "console.css": "text/css"}
# The routes the cookie counts for (login, logout and the assets need no credential).
COOKIE_ROUTES = (PREFIX, PREFIX + "/feed")
PUBLIC_ROUTES = (*(("GET", f"{PREFIX}/{name}") for name in ASSETS),
                 ("POST", PREFIX + "/login"), ("POST", PREFIX + "/logout"))

FEED_DEFAULT, FEED_MAX = 200, 500     # messages per feed answer
WATCH_MAX = 200                        # message ids whose states one request follows
FIRST_LINE_CHARS = 240                 # of a body, the feed carries only its first line

# Only what the bus itself serves runs or styles the page; no inline script or
# style, no frames, no plugins, forms post only here.
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self'; "
                                "img-src 'self'; connect-src 'self'; object-src 'none'; "
                                "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    # Not no-referrer: under it a browser sends `Origin: null` with a form's POST, and
    # the Origin guard rightly refuses that. same-origin gives nothing to other sites.
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def is_console_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def credentials(request: web.Request) -> Mapping[str, str]:
    """The headers to authenticate: for the page and its feed, the console cookie stands
    for a bearer token when the request has no Authorization header of its own."""
    token = request.cookies.get(COOKIE)
    if not token or "Authorization" in request.headers or request.path not in COOKIE_ROUTES:
        return request.headers
    return {"Authorization": f"Bearer {token}"}


def secure(response: web.StreamResponse) -> None:
    """Every answer under /ui, errors too, carries the console's security headers."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


@lru_cache(maxsize=None)
def _ui_file(name: str) -> str:
    return resources.files("busd").joinpath("ui", name).read_text(encoding="utf-8")


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def login_page(status: int, message: str, request: web.Request) -> web.Response:
    """The login form, answered in place of the console when the request may not see it."""
    page = string.Template(_ui_file("login.html")).substitute(
        message=html.escape(message), version=html.escape(__version__))
    response = _html(page, status)
    if request.cookies.get(COOKIE):
        # Whatever the browser holds did not work: it should not send it again.
        response.del_cookie(COOKIE, path=PREFIX)
    return response


def error_page(request: web.Request, exc: BusError) -> web.Response | None:
    """For GET /ui, a refused credential is the login form, not a JSON error."""
    if request.path != PREFIX or request.method not in ("GET", "HEAD"):
        return None
    if exc.http_status == 401:
        message = ("Paste an admin token to open the console." if exc.kind is errors.UNAUTHENTICATED
                   else "That token is not valid (unknown or revoked). Paste an admin token.")
        return login_page(401, message, request)
    if exc.http_status == 403 and exc.kind is errors.FORBIDDEN:
        return login_page(403, "That token is not an admin token; the console needs one "
                               "(agent-bus token create NAME --admin).", request)
    return None


# -- routes --------------------------------------------------------------------

async def page(request: web.Request) -> web.Response:
    bus = bus_of(request)
    bus.access.check_admin(principal_of(request))
    return _html(_ui_file("console.html"))


def _asset(name: str):
    async def asset(request: web.Request) -> web.Response:
        """The script or the style sheet: the same for everyone, so no login is needed."""
        return web.Response(text=_ui_file(name), content_type=ASSETS[name], charset="utf-8")
    return asset


async def login(request: web.Request) -> web.Response:
    """POST /ui/login (a form: token=...): check it is an admin token, keep it in the cookie."""
    bus = bus_of(request)
    if not await bus.store.auth_enabled():
        return _to_console()  # open mode: nothing to log in to
    try:
        async with asyncio.timeout(bus.settings.body_timeout):
            form = await request.post()
    except asyncio.TimeoutError:
        raise BusError(errors.BODY_TIMEOUT, close_connection=True) from None
    token = form.get("token")
    token = token.strip() if isinstance(token, str) else ""
    if not token:
        return login_page(401, "Paste an admin token to open the console.", request)
    try:
        principal = await bus.access.authenticate({"Authorization": f"Bearer {token}"})
    except BusError:
        return login_page(401, "That token is not valid (unknown or revoked). Paste an admin "
                               "token.", request)
    if not principal.admin:
        return login_page(403, "That token is not an admin token; the console needs one "
                               "(agent-bus token create NAME --admin).", request)
    response = _to_console()
    response.set_cookie(COOKIE, token, path=PREFIX, httponly=True, samesite="Strict",
                        secure=request.secure)
    return response


async def logout(request: web.Request) -> web.Response:
    response = _to_console()
    response.del_cookie(COOKIE, path=PREFIX)
    return response


def _to_console() -> web.Response:
    """303: the browser follows with a GET of the console."""
    return web.Response(status=303, headers={"Location": PREFIX})


async def feed(request: web.Request) -> web.Response:
    """GET /ui/feed: what the console shows, long-polled.

    after:   the newest message id the page has (absent: the first load)
    version: the `version` of the page's last answer; with block=true the request is
             held until a message newer than `after` is committed or the version moves
    watch:   ids (comma-separated) whose receipt states and checks the page follows
    channel, agent: only that channel's messages, only those from or to that agent
    """
    bus = bus_of(request)
    principal = principal_of(request)
    bus.access.check_admin(principal)
    after = _query_id(request, "after")
    version = query_value(request, "version") or ""
    block = query_bool(request, "block", False)
    limit = _query_limit(request)
    channel = query_value(request, "channel") or None
    if channel is not None:
        channel = check_channel(channel)
        bus.access.check_channel(principal, channel)
    agent = query_value(request, "agent") or None
    if agent is not None:
        agent = check_name(agent, "agent")
    watch = _query_ids(request, "watch")
    # An admin token limited to some channels sees only those, here as everywhere.
    channels = (principal.channels if channel is None and principal.channels is not None
                else (channel,))

    async def fetch() -> list[StoredMessage]:
        found: dict[int, StoredMessage] = {}
        for one in channels:
            for message in await bus.store.recent_messages(after, limit, one, agent):
                found[message.id] = message
        return [found[i] for i in sorted(found)[-limit:]]

    messages = await wait_for_news(bus, fetch, block and after is not None,
                                   lambda found: bool(found) or bus.hub.version != version,
                                   bus.hub.register_watcher)
    # Taken before the states are read: a change from here on moves it again.
    version = bus.hub.version
    new_ids = {m.id for m in messages}
    followed = [m for m in await bus.store.messages_by_id(sorted(set(watch) - new_ids))
                if bus.access.sees_channel(principal, m.channel)]
    everything = messages + followed
    states = await roster.states(bus.store, everything)
    pending = await roster.visible_pending(bus.store, bus.access, principal)
    return reply({
        "version": version,
        "messages": [_entry(m, states[m.id]) for m in messages],
        "states": {str(m.id): _state(m, states[m.id]) for m in followed},
        "gone": sorted(set(watch) - new_ids - {m.id for m in followed}),
        "agents": await roster.roster(bus.store, bus.access, bus.presence, principal,
                                      pending=pending),
        "channels": await _channels(bus, principal, pending),
        "auth": principal is not OPEN,
        "now": time.time(),
    })


def _state(message: StoredMessage, state: dict) -> dict:
    out = {"state": state["state"], "recipients": state["recipients"]}
    if roster.is_handoff(message):
        out["handoff"] = state.get("handoff", {})
    return out


def _entry(message: StoredMessage, state: dict) -> dict:
    first_line, _, rest = message.body.partition("\n")
    entry = {"id": message.id, "ts": message.ts, "from": message.sender, "to": message.to,
             "channel": message.channel, "first_line": first_line[:FIRST_LINE_CHARS],
             "more": bool(rest) or len(first_line) > FIRST_LINE_CHARS,
             "signed": bool(message.signature)}
    entry.update(_state(message, state))
    return entry


async def _channels(bus: Bus, principal: Principal, pending: dict[str, dict[str, int]]
                    ) -> list[dict]:
    """Every channel the principal may see, with its message count, newest activity and
    messages not yet fetched."""
    return [{**row, "pending": sum(pending.get(row["channel"], {}).values())}
            for row in await bus.store.channels()
            if bus.access.sees_channel(principal, row["channel"])]


def _query_id(request: web.Request, name: str) -> int | None:
    text = query_value(request, name)
    if text is None or text == "":
        return None
    if not text.isdigit() or len(text) > 18:
        raise BusError(errors.BAD_PARAM, f"{name} must be a message id (a whole number), "
                                         f"got {text[:40]!r}")
    return int(text)


def _query_ids(request: web.Request, name: str) -> list[int]:
    text = query_value(request, name)
    if not text:
        return []
    parts = text.split(",")
    if len(parts) > WATCH_MAX or not all(p.isdigit() and len(p) <= 18 for p in parts):
        raise BusError(errors.BAD_PARAM, f"{name} must be up to {WATCH_MAX} message ids "
                                         "separated by commas")
    return [int(p) for p in parts]


def _query_limit(request: web.Request) -> int:
    text = query_value(request, "max")
    if text is None or text == "":
        return FEED_DEFAULT
    if not text.isdigit() or not 1 <= int(text) <= FEED_MAX:
        raise BusError(errors.BAD_PARAM, f"max must be a whole number from 1 to {FEED_MAX}, "
                                         f"got {text[:40]!r}")
    return int(text)


def routes() -> list[web.RouteDef]:
    return [
        web.get(PREFIX, page),
        web.get(PREFIX + "/feed", feed),
        *(web.get(f"{PREFIX}/{name}", _asset(name)) for name in ASSETS),
        web.post(PREFIX + "/login", login),
        web.post(PREFIX + "/logout", logout),
    ]
