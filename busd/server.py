"""The HTTP app: both older protocols and our own routes on one port, and how it runs."""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import resource
import signal
import ssl
import time
from urllib.parse import urlsplit
from dataclasses import dataclass, field
from typing import Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from . import __version__, errors, metrics
from .api import console, elipc, handoffs, openapi, rapid
from .api.common import BUS, ERROR_CODE, PRINCIPAL, error_reply, read_json_object, reply
from .errors import BusError
from .identity import Access
from .ratelimit import RateLimiter
from .service import Bus, BusSettings
from .store import Store
from .store_factory import open_store

log = logging.getLogger("busd.server")
GUARD = web.AppKey("guard", object)

_HTTP_TO_KIND = {
    404: errors.NOT_FOUND,
    405: errors.METHOD_NOT_ALLOWED,
    413: errors.BODY_TOO_LARGE,
}


@web.middleware
async def _errors_and_identity(request: web.Request, handler):
    """Every failure becomes one JSON error from the table; every request gets a principal."""
    bus: Bus = request.app[BUS]
    started = time.perf_counter()
    try:
        response = await _guarded(request, handler, bus)
    except web.HTTPException as exc:
        kind = _HTTP_TO_KIND.get(exc.status)
        if kind is None:
            raise
        detail = f"{request.method} {request.path}" if exc.status in (404, 405) else None
        response = error_reply(BusError(kind, detail))
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        response = error_reply(BusError(errors.INTERNAL))
    if console.is_console_path(request.path):
        console.secure(response)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    bus.metrics.answered(route, time.perf_counter() - started)
    if response.status >= 400:
        code = response.get(ERROR_CODE, str(response.status * 100))
        bus.metrics.errors.labels(code).inc()
    return response


# What answers without a token once auth is on (what it tells is the same for everyone);
# every other route needs one, and answers 401 before it looks at anything else.
PUBLIC_ROUTES = frozenset({
    ("GET", "/healthz"), ("GET", "/health"), ("GET", "/.well-known/agent-card.json"),
    ("GET", "/openapi.json"), *console.PUBLIC_ROUTES})


def is_public(request: web.Request) -> bool:
    resource = request.match_info.route.resource
    if resource is None:
        return True  # no such route: the 404 or 405 says only that
    method = "GET" if request.method == "HEAD" else request.method
    return (method, resource.canonical) in PUBLIC_ROUTES


async def _guarded(request: web.Request, handler, bus: Bus) -> web.StreamResponse:
    try:
        guard: RequestGuard = request.app[GUARD]
        guard.check_host_and_origin(request)
        principal = await bus.access.authenticate(console.credentials(request))
        if principal.authenticated:
            guard.check_rate(principal.name)
        elif not is_public(request):
            bus.access.require_token(principal)
        request[PRINCIPAL] = principal
        return await handler(request)
    except BusError as exc:
        page = console.error_page(request, exc)
        return page if page is not None else error_reply(exc)


class RequestGuard:
    """What a browser must not be able to do to a bus, and how much one agent may ask.

    A web page can make a browser send requests to a bus on localhost: a foreign
    Host (DNS rebinding), a request the browser marks as coming from another site
    (Sec-Fetch-Site: an <img>, a form, a fetch; GETs too, which read mail and move
    cursors), or a cross-site Origin is refused. Clients that are not browsers send
    no Sec-Fetch-Site and are not affected.
    """

    LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
    # same-origin: the console's own requests; none: an address typed or bookmarked.
    # same-site is another origin too (another port on localhost), and is refused.
    OWN_FETCH_SITES = ("same-origin", "none")

    def __init__(self, loopback_only: bool, allowed_hosts: tuple[str, ...],
                 limiter: RateLimiter):
        self.loopback_only = loopback_only
        self.allowed_hosts = tuple(h.lower() for h in allowed_hosts)
        self.limiter = limiter

    @staticmethod
    def _name(host: str) -> str:
        host = host.strip().lower()
        if host.startswith("["):
            return host[1:].split("]", 1)[0]
        return host.rsplit(":", 1)[0] if host.count(":") == 1 else host

    def host_allowed(self, host: str) -> bool:
        name = self._name(host)
        if name in self.allowed_hosts:
            return True
        if not self.loopback_only:
            return True
        return name in self.LOOPBACK_NAMES or name.endswith(".localhost") or is_loopback(name)

    def check_host_and_origin(self, request: web.Request) -> None:
        host = request.headers.get("Host", "")
        if host and not self.host_allowed(host):
            raise BusError(errors.FOREIGN_HOST, f"Host: {host[:80]}")
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None and site.strip().lower() not in self.OWN_FETCH_SITES:
            raise BusError(errors.CROSS_SITE, f"Sec-Fetch-Site: {site[:40]}")
        origin = request.headers.get("Origin")
        if origin is None:
            return
        parts = urlsplit(origin)
        if parts.netloc.lower() != host.lower() and parts.netloc.lower() not in self.allowed_hosts:
            raise BusError(errors.FOREIGN_ORIGIN, f"Origin: {origin[:80]}")

    def check_rate(self, name: str) -> None:
        wait = self.limiter.retry_after(name)
        if wait is not None:
            seconds = max(1, math.ceil(wait))
            raise BusError(errors.RATE_LIMITED, f"{name} is over its request budget",
                           headers={"Retry-After": str(seconds)},
                           fields={"retry_after": seconds})


async def _send(request: web.Request) -> web.Response:
    """POST /send serves both protocols; the field names say which one is speaking."""
    body = await read_json_object(request)
    speaks_elipc = any(name in body for name in elipc.FIELDS if name != "channel")
    speaks_rapid = any(name in body for name in rapid.FIELDS)
    if speaks_elipc and speaks_rapid:
        raise BusError(errors.AMBIGUOUS_SEND)
    if speaks_elipc:
        return await elipc.send(request, body)
    if speaks_rapid:
        return await rapid.send(request, body)
    raise BusError(errors.MISSING_FIELD,
                   "send from, to and msg (rapid) or channel, sender and content (el-ipc)")


async def _metrics(request: web.Request) -> web.Response:
    bus = request.app[BUS]
    principal = request[PRINCIPAL]
    bus.access.check_admin(principal)
    return web.Response(body=bus.metrics.exposition(principal.channels),
                        headers={"Content-Type": metrics.CONTENT_TYPE})


async def _openapi(request: web.Request) -> web.Response:
    return reply(openapi.document(__version__))


async def _register(request: web.Request) -> web.Response:
    return await elipc.register(request, await read_json_object(request))


def make_app(bus: Bus, guard: RequestGuard) -> web.Application:
    app = web.Application(middlewares=[_errors_and_identity],
                          client_max_size=bus.settings.limits.max_request_bytes)
    app[BUS] = bus
    app[GUARD] = guard
    bus.hear_commits()

    async def answer_parked_polls(_app: web.Application) -> None:
        bus.hub.close()

    app.on_shutdown.append(answer_parked_polls)
    app.add_routes([
        web.post("/send", _send),
        web.post("/register", _register),
        web.get("/recv", rapid.recv),
        web.get("/inbox", rapid.inbox),
        web.get("/healthz", rapid.healthz),
        web.get("/messages", elipc.messages),
        web.get("/channels", elipc.channels),
        web.get("/agents", elipc.agents),
        web.get("/health", elipc.health),
        web.get("/.well-known/agent-card.json", elipc.agent_card),
        web.get("/metrics", _metrics),
        web.get("/status", rapid.status),
        web.get("/undelivered", rapid.undelivered),
        web.get("/openapi.json", _openapi),
        web.post("/handoff-checks", handoffs.report),
        web.post("/read", rapid.mark_read),
        *console.routes(),
    ])
    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 9876
    db: str = ""
    insecure_open: bool = False
    shutdown_timeout: float = 3.0
    idle_timeout: float = 60.0
    tls_cert: str | None = None
    tls_key: str | None = None
    allow_hosts: tuple[str, ...] = ()
    legacy_signatures: str = "auto"
    rate: float = 50.0      # requests/s per authenticated agent
    burst: float = 200.0
    retain_max_age: float | None = None      # seconds; None keeps every message
    retain_per_queue: int | None = None      # newest N per (channel, recipient)
    retention_every: float = 60.0
    settings: BusSettings = field(default_factory=BusSettings)


class ConfigError(Exception):
    """The server cannot start as configured; the message says what to change."""


def _tls_context(config: ServerConfig) -> ssl.SSLContext | None:
    if not config.tls_cert and not config.tls_key:
        return None
    if not (config.tls_cert and config.tls_key):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate or key: {exc}") from None
    return context


async def serve(config: ServerConfig,
                on_listening: Callable[[str], None] | None = None,
                on_stopping: Callable[[], None] | None = None) -> None:
    tls = _tls_context(config)
    store = open_store(config.db)
    await store.open()
    try:
        loopback = is_loopback(config.host)
        if not loopback and not config.insecure_open and not await store.auth_enabled():
            raise ConfigError(
                f"refusing to listen on {config.host} without authentication: anyone who can "
                "reach it could read and send as any agent. Create tokens first (agent-bus "
                "token create NAME), bind to 127.0.0.1, or pass --insecure-open if the network "
                "itself is trusted.")
        bus = Bus(store=store, settings=config.settings,
                  access=Access(store, config.legacy_signatures))
        guard = RequestGuard(loopback, config.allow_hosts, RateLimiter(config.rate, config.burst))
        # handler_cancellation: a client that hangs up ends its parked long-poll at
        # once, so presence knows it left (sends in flight still commit).
        runner = web.AppRunner(make_app(bus, guard), access_log=None, handle_signals=False,
                               shutdown_timeout=config.shutdown_timeout,
                               keepalive_timeout=config.idle_timeout,
                               handler_cancellation=True)
        await runner.setup()
    except BaseException:
        await store.close()
        raise
    # Signals first: a SIGTERM that lands right after "listening" must stop us cleanly.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        site = web.TCPSite(runner, config.host, config.port, backlog=2048, reuse_address=True,
                           ssl_context=tls)
        await site.start()
        if on_listening is not None:
            on_listening(_bound_address(runner, config, tls is not None))
        retention = None
        if config.retain_max_age or config.retain_per_queue:
            retention = asyncio.create_task(_enforce_retention(store, config))
        await stop.wait()
        log.info("stopping: answering parked long-polls, finishing sends in flight")
        if on_stopping is not None:
            on_stopping()
        bus.hub.close()
        if retention is not None:
            retention.cancel()
    finally:
        await runner.cleanup()
        await store.close()


async def _enforce_retention(store: Store, config: ServerConfig) -> None:
    while True:
        try:
            removed = await store.enforce_retention(config.retain_max_age, config.retain_per_queue)
            if removed:
                log.info("retention: removed %d read messages past the limits", removed)
        except BusError as exc:
            log.warning("retention skipped this round: %s", exc.message)
        await asyncio.sleep(config.retention_every)


def _bound_address(runner: web.AppRunner, config: ServerConfig, tls: bool) -> str:
    scheme = "https" if tls else "http"
    for sockname in runner.addresses:
        host, port = sockname[:2]
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{port}"
    return f"{scheme}://{config.host}:{config.port}"


class ClientFaultFilter(logging.Filter):
    """Drop aiohttp's tracebacks for requests that were not HTTP: they are answered
    with a 400 and are the client's fault, not ours; anything else still logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, HttpProcessingError) or getattr(exc, "code", 500) >= 500


def _raise_open_file_limit() -> None:
    """Every parked long-poll holds a socket: take all the descriptors we are allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1_048_576 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d: %s", soft, exc)


def run(config: ServerConfig, on_ready: Callable[[str], None] | None = None,
        on_stopping: Callable[[], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT. `on_ready(address)` is called once the socket is
    bound, `on_stopping()` when a stop begins. Raises ConfigError or StoreError for a
    configuration that cannot serve, OSError when the address cannot be bound."""
    _raise_open_file_limit()
    asyncio.run(serve(config, on_ready, on_stopping))
