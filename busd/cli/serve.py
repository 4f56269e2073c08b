"""`agent-bus serve`: run the bus server. `agent-bus migrate`: bring its database's
schema up to date without serving."""
from __future__ import annotations

import argparse
import asyncio
import os
import sys

from ..identity import LEGACY_SIGNATURES
from ..model import Limits
from . import EXIT_OK, EXIT_USAGE, CommandError, bounded, command, die


DB_HELP = ("a SQLite database path, or a postgresql://USER@HOST:PORT/DATABASE URL that several "
           "servers may share (default $IPC_DB_PATH, else "
           "${XDG_STATE_HOME:-~/.local/state}/agent-bus/bus.db)")


SECONDS = bounded(float, 0, low_ok=False)
# The server's numeric settings: flag, type (with its bounds), default, metavar, help.
SETTINGS = (
    ("--rate", bounded(float, 0), 50.0, "PER_SECOND",
     "requests per second per authenticated agent (default 50; 0: no limit)"),
    ("--burst", bounded(float, 1), 200.0, "N",
     "requests an agent may make at once above the rate (default 200)"),
    ("--idle-timeout", SECONDS, 60.0, "SECONDS",
     "close a connection idle this long, before or between requests (default 60)"),
    ("--hold", bounded(float, 0, 30, low_ok=False), 25.0, "SECONDS",
     "how long a long-poll is held when nothing arrives (default 25, at most 30: clients "
     "time out at 35)"),
    ("--body-timeout", SECONDS, 10.0, "SECONDS",
     "how long a request body may take to arrive (default 10)"),
    ("--max-msg-bytes", bounded(int, 1), Limits().max_msg_bytes, "N",
     "largest message body in bytes (default 65536)"),
    ("--online-window", SECONDS, 60.0, "SECONDS",
     "an agent counts as online this long after its last contact, unless it hung up "
     "(default 60)"),
    ("--retain-days", bounded(float, 0), 0, "DAYS",
     "remove messages older than this once read (default 0: keep all)"),
    ("--retain-per-queue", bounded(int, 0), 0, "N",
     "keep at most the newest N per channel and recipient, removing only read ones "
     "(default 0: no cap)"),
    ("--retention-every", SECONDS, 60.0, "SECONDS", "how often retention runs (default 60)"),
)


def register(commands: argparse._SubParsersAction) -> None:
    parser = command(commands, "serve", _serve)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; any other address "
                             "needs authentication or --insecure-open)")
    parser.add_argument("--port", type=int, default=None,
                        help="port to listen on (default $IPC_PORT, else 9876; 0 picks a free one)")
    parser.add_argument("--db", default=None, help=DB_HELP)
    parser.add_argument("--insecure-open", action="store_true",
                        help="allow a non-loopback address with no authentication")
    parser.add_argument("--tls-cert", default=None, help="serve https with this certificate (PEM)")
    parser.add_argument("--tls-key", default=None, help="the certificate's private key (PEM)")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="also accept this Host/Origin name (repeatable); a loopback-bound "
                             "bus otherwise accepts only loopback names")
    parser.add_argument("--legacy-signatures", choices=LEGACY_SIGNATURES, default="auto",
                        help="el-ipc-format signatures (replayable): auto = accepted until a "
                             "natively signed send is seen (default), on, off")
    parser.add_argument("--secret-guard", action="store_true",
                        help="refuse message bodies that look like keys or credentials "
                             "(a send may still pass \"allow_secret\": true)")
    for flag, kind, default, metavar, text in SETTINGS:
        parser.add_argument(flag, type=kind, default=default, metavar=metavar, help=text)
    parser.add_argument("--card-name", default=None, metavar="NAME",
                        help="the agent card's name (default $IPC_AGENT_NAME, else agent-bus)")
    parser.add_argument("--card-description", default=None, metavar="TEXT",
                        help="the agent card's description (default $IPC_AGENT_DESC)")
    parser.add_argument("--card-url", default=None, metavar="URL",
                        help="the public URL the agent card gives, e.g. a reverse proxy's "
                             "(default $IPC_AGENT_URL, else the URL the card was fetched at)")

    migrate = command(commands, "migrate", _migrate)
    migrate.add_argument("--db", default=None, help=DB_HELP)


def _serve(args: argparse.Namespace, env) -> int:
    """run the bus server

    Run the bus server: the rapid and el-ipc protocols on one port, stored durably in
    SQLite, or in PostgreSQL shared by any number of servers (--db postgresql://...)."""
    # Imported here: every other command starts faster and smaller without aiohttp.
    from .. import logs
    from ..service import BusSettings
    from ..notify import Notifier
    from ..server import ClientFaultFilter, ConfigError, ServerConfig, run
    from ..store import StoreError, shown_database

    if env.ipc_api_key:
        # el-ipc's shared key would leave this bus open to anyone without it; say so, and
        # stop, rather than run open while its operator believes it is closed.
        die("IPC_API_KEY is set, but agent-bus has no shared API key: make a token per agent "
            "(agent-bus token create NAME; clients send it as 'Authorization: Bearer', as "
            "they sent IPC_API_KEY), then unset IPC_API_KEY")
    port = args.port if args.port is not None else env.serve_port()
    card = env.card_settings(args.card_name, args.card_description, args.card_url)
    os.umask(0o077)
    db = args.db or env.db
    settings = BusSettings(hold_seconds=args.hold, body_timeout=args.body_timeout,
                           secret_guard=args.secret_guard, online_window=args.online_window,
                           limits=Limits(max_msg_bytes=args.max_msg_bytes), **card)
    config = ServerConfig(host=args.host, port=port, db=db,
                          insecure_open=args.insecure_open, settings=settings,
                          tls_cert=args.tls_cert, tls_key=args.tls_key,
                          allow_hosts=tuple(args.allow_host),
                          legacy_signatures=args.legacy_signatures, rate=args.rate,
                          burst=args.burst, idle_timeout=args.idle_timeout,
                          retain_max_age=args.retain_days * 86400 or None,
                          retain_per_queue=args.retain_per_queue or None,
                          retention_every=args.retention_every)
    logs.setup("agent-bus", filters={"aiohttp.server": ClientFaultFilter()})
    # Under systemd (Type=notify) READY=1 goes out once the socket is bound, so units
    # ordered after the server start when it can answer; a no-op in a terminal.
    notifier = Notifier(env.notify_socket)

    def ready(address: str) -> None:
        # Tests and scripts read this line to learn the port (with --port 0).
        print(f"agent-bus: listening on {address} (db {shown_database(db)})",
              file=sys.stderr, flush=True)
        notifier.ready(f"listening on {address}")

    try:
        run(config, on_ready=ready, on_stopping=notifier.stopping)
    except (ConfigError, StoreError) as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    except OSError as exc:
        raise CommandError(f"cannot listen on {config.host}:{config.port}: {exc.strerror}",
                           EXIT_USAGE) from None
    finally:
        notifier.close()
    return EXIT_OK


def _migrate(args: argparse.Namespace, env) -> int:
    """create or upgrade the database schema, then exit

    Apply the schema migrations the database lacks (serve also does this as it starts). Run
    it before starting several servers on a new PostgreSQL database, or to upgrade one
    without serving."""
    from ..store_factory import open_store
    from ..store import StoreError, shown_database
    os.umask(0o077)
    db = args.db or env.db

    async def apply() -> tuple[int, int]:
        store = open_store(db, exclusive=False)
        await store.open()  # opening applies what is missing
        await store.close()
        return store.migrated

    try:
        before, after = asyncio.run(apply())
    except StoreError as exc:
        die(str(exc))
    if before == after:
        print(f"{shown_database(db)}: schema version {after}, already up to date")
    else:
        print(f"{shown_database(db)}: schema version {before} -> {after}")
    return EXIT_OK
