"""The HTTP app: both older protocols and our own routes on one port, and how it runs."""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import sys
from dataclasses import dataclass, field
from typing import Callable

from aiohttp import web

from . import errors
from .api import elipc, rapid
from .api.common import BUS, PRINCIPAL, Bus, BusSettings, error_reply, read_json_object
from .errors import BusError
from .store import Store, StoreError
from .store_sqlite import SQLiteStore

log = logging.getLogger("busd.server")

_HTTP_TO_KIND = {
    404: errors.NOT_FOUND,
    405: errors.METHOD_NOT_ALLOWED,
    413: errors.BODY_TOO_LARGE,
}


@web.middleware
async def _errors_and_identity(request: web.Request, handler):
    """Every failure becomes one JSON error from the table; every request gets a principal."""
    bus: Bus = request.app[BUS]
    try:
        request[PRINCIPAL] = bus.access.authenticate(request.headers)
        return await handler(request)
    except BusError as exc:
        return error_reply(exc)
    except web.HTTPException as exc:
        kind = _HTTP_TO_KIND.get(exc.status)
        if kind is None:
            raise
        detail = f"{request.method} {request.path}" if exc.status in (404, 405) else None
        response = error_reply(BusError(kind, detail))
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_reply(BusError(errors.INTERNAL))


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


def make_app(bus: Bus) -> web.Application:
    app = web.Application(middlewares=[_errors_and_identity],
                          client_max_size=bus.settings.limits.max_request_bytes)
    app[BUS] = bus
    bus.store.on_commit = bus.hub.publish

    async def answer_parked_polls(_app: web.Application) -> None:
        bus.hub.close()

    app.on_shutdown.append(answer_parked_polls)
    app.add_routes([
        web.post("/send", _send),
        web.get("/recv", rapid.recv),
        web.get("/inbox", rapid.inbox),
        web.get("/healthz", rapid.healthz),
        web.get("/messages", elipc.messages),
        web.get("/channels", elipc.channels),
        web.get("/agents", elipc.agents),
        web.get("/health", elipc.health),
        web.get("/.well-known/agent-card.json", elipc.agent_card),
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
    settings: BusSettings = field(default_factory=BusSettings)


class ConfigError(Exception):
    """The server cannot start as configured; the message says what to change."""


def open_store(db: str) -> Store:
    if db.startswith(("postgresql://", "postgres://")):
        raise ConfigError("PostgreSQL storage is not available in this version; use a SQLite path")
    return SQLiteStore(db)


async def serve(config: ServerConfig,
                on_listening: Callable[[str], None] | None = None) -> None:
    if not is_loopback(config.host) and not config.insecure_open:
        raise ConfigError(
            f"refusing to listen on {config.host} without authentication: anyone who can "
            "reach it could read and send as any agent. Bind to 127.0.0.1, or pass "
            "--insecure-open if the network itself is trusted.")
    store = open_store(config.db)
    await store.open()
    bus = Bus(store=store, settings=config.settings)
    runner = web.AppRunner(make_app(bus), access_log=None, handle_signals=False,
                           shutdown_timeout=config.shutdown_timeout, keepalive_timeout=75)
    await runner.setup()
    # Signals first: a SIGTERM that lands right after "listening" must stop us cleanly.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        site = web.TCPSite(runner, config.host, config.port, backlog=2048, reuse_address=True)
        await site.start()
        if on_listening is not None:
            on_listening(_bound_address(runner, config))
        await stop.wait()
        log.info("stopping: answering parked long-polls, finishing sends in flight")
        bus.hub.close()
    finally:
        await runner.cleanup()
        await store.close()


def _bound_address(runner: web.AppRunner, config: ServerConfig) -> str:
    for sockname in runner.addresses:
        host, port = sockname[:2]
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}"
    return f"http://{config.host}:{config.port}"


def run(config: ServerConfig) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="agent-bus: %(message)s")

    def listening(address: str) -> None:
        # Tests and scripts read this line to learn the port (with --port 0).
        print(f"agent-bus: listening on {address} (db {config.db})", file=sys.stderr, flush=True)

    try:
        asyncio.run(serve(config, listening))
    except (ConfigError, StoreError) as exc:
        print(f"agent-bus serve: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"agent-bus serve: cannot listen on {config.host}:{config.port}: {exc.strerror}",
              file=sys.stderr)
        return 2
    return 0
