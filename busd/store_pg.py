"""The PostgreSQL store: any number of bus servers (replicas) share one database.

Order across replicas. Every transaction that inserts messages updates the one
row of the `clock` table first and holds that row lock to COMMIT, so these
transactions run one at a time, whichever replica sent them, and each becomes
visible before the next one can take the lock. Each takes its ids and stamps
from the clock row: ids go on from the last id, and ts (whole microseconds) is
the database's wall clock, or the last ts + 1 us if that is not later. So ids
and ts increase strictly in commit order, for everything every replica writes.

`now` is the clock row as committed, read in the same statement (so the same
snapshot) as the messages it goes with: every message stamped at or below it
was committed before that snapshot and is in it, and every message not yet
visible is stamped above it. A since-cursor moved to it never skips a message,
whichever replica the client asks next.

Wake-ups. A transaction that inserts messages also NOTIFYs the (channel, to)
pairs it stored; PostgreSQL delivers that at commit. Each serving replica
LISTENs on a connection of its own and tells the server, which wakes the
long-polls parked on it; its own commits it reports directly. A replica that
loses that connection reconnects with backoff and then wakes every parked poll
to re-check, so nothing committed meanwhile is missed.

Durability without losing throughput: sends that arrive while one group
commits form the next, stored together by one statement (one transaction, one
round trip) on the replica's one writer connection. Reads go through a small
pool of their own.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

from . import errors
from .errors import BusError
from .model import NewMessage, SendResult, StoredMessage, encode_meta
from .receipts import ReceiptRow, WatermarkRow
from .store import (CONTACT_EVERY, CommitNotice, Received, Store, StoreError, TokenRecord,
                    shown_database, undelivered_entry, with_pending_receipts)

log = logging.getLogger("busd.store")

# libpq's minimum; a database that does not answer within it counts as down.
CONNECT_TIMEOUT = 2
# How long a read waits for a pooled connection before answering 503.
POOL_WAIT = 3.0
POOL_MIN, POOL_MAX = 2, 12
# The listener's reconnect backoff, first and longest wait (seconds).
RECONNECT_FIRST, RECONNECT_LONGEST = 0.1, 2.0
# A write is run again when PostgreSQL answers that it did nothing: it ended the
# session before running it (a restart, pg_terminate_backend), or undid it
# (deadlock, serialization failure).
WRITE_ATTEMPTS = 3
NOTIFY_CHANNEL = "agent_bus"
# The listening connection is idle for long stretches: TCP keepalives notice a
# peer that vanished without closing it (seconds).
LISTEN_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                     "keepalives_count": 3}
# PostgreSQL refuses NOTIFY payloads of 8000 bytes or more.
NOTIFY_LIMIT = 7800
# Keeps two replicas from migrating at the same time (an arbitrary, fixed number).
MIGRATION_LOCK = 0x6167656E74627573

# Numbered migrations: index + 1 is the schema version each one produces. They
# follow store_sqlite's numbering, in PostgreSQL's dialect.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    -- One row: where ids and ts go on from. Updating it is the lock that orders
    -- every message-writing transaction of every replica.
    CREATE TABLE clock (
        only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
        last_id  BIGINT  NOT NULL,
        last_us  BIGINT  NOT NULL
    );
    INSERT INTO clock (only_row, last_id, last_us) VALUES (TRUE, 0, 0);
    -- body is bytea: PostgreSQL text cannot hold the NUL a message may carry.
    CREATE TABLE messages (
        id        BIGINT PRIMARY KEY,
        ts        DOUBLE PRECISION NOT NULL UNIQUE,
        channel   TEXT  NOT NULL,
        from_name TEXT  NOT NULL,
        to_name   TEXT  NOT NULL,
        body      BYTEA NOT NULL,
        meta      TEXT,
        key       TEXT,
        signature TEXT
    );
    CREATE UNIQUE INDEX messages_by_key ON messages (from_name, key) WHERE key IS NOT NULL;
    CREATE INDEX messages_by_recipient ON messages (to_name, channel, ts);
    CREATE INDEX messages_by_channel ON messages (channel, id);
    CREATE TABLE watermarks (
        agent   TEXT   NOT NULL,
        channel TEXT   NOT NULL,
        last_id BIGINT NOT NULL,
        PRIMARY KEY (agent, channel)
    );
    CREATE TABLE acknowledged (
        agent   TEXT NOT NULL,
        channel TEXT NOT NULL,
        ts      DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (agent, channel)
    );
    CREATE TABLE agents (
        name          TEXT PRIMARY KEY,
        identity      TEXT NOT NULL DEFAULT '',
        public_key    TEXT NOT NULL,
        role          TEXT NOT NULL DEFAULT 'agent',
        registered_by TEXT,
        created_at    DOUBLE PRECISION NOT NULL
    );
    """,
    # 2: per-agent bearer tokens; only a hash of each token is kept.
    """
    CREATE TABLE tokens (
        id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        hash       TEXT    NOT NULL UNIQUE,
        agent      TEXT    NOT NULL,
        channels   TEXT,
        admin      BOOLEAN NOT NULL DEFAULT FALSE,
        created_at DOUBLE PRECISION NOT NULL,
        revoked_at DOUBLE PRECISION
    );
    CREATE INDEX tokens_by_agent ON tokens (agent);
    """,
    # 3: delivery receipts (what each reader fetched and filed) and last contact.
    """
    ALTER TABLE acknowledged ADD COLUMN delivered_ts DOUBLE PRECISION NOT NULL DEFAULT 0;
    ALTER TABLE acknowledged ADD COLUMN filed_ts DOUBLE PRECISION NOT NULL DEFAULT 0;
    UPDATE acknowledged SET delivered_ts = ts;
    CREATE TABLE presence (
        agent     TEXT PRIMARY KEY,
        last_seen DOUBLE PRECISION NOT NULL
    );
    """,
    # 4: what recipients' daemons found when they checked a handoff on arrival.
    """
    CREATE TABLE handoff_checks (
        message_id BIGINT NOT NULL,
        agent      TEXT   NOT NULL,
        result     TEXT   NOT NULL,
        checked_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (message_id, agent)
    );
    """,
    # 5: `signed` means verified. Until now an unverifiable signature (a sender with no
    # registered key, on a bus without an operator) was kept and shown as signed: keep a
    # stored signature only where its sender had a registered key when it was sent, the
    # only case in which the bus verified it. And each agent's registration remembers
    # when its operator signed it, so a replayed or older registration is refused.
    """
    ALTER TABLE agents ADD COLUMN registration_signed_at BIGINT;
    UPDATE messages SET signature = NULL
        WHERE signature IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM agents WHERE agents.name = messages.from_name
                                   AND agents.created_at <= messages.ts);
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)

SQL_MIGRATION_LOCK = "SELECT pg_advisory_xact_lock(%s)"
SQL_IS_OURS = ("SELECT to_regclass('schema_version') IS NOT NULL, "
               "to_regclass('messages') IS NOT NULL")
SQL_CREATE_VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
SQL_GET_VERSION = "SELECT version FROM schema_version"
SQL_SET_VERSION = "UPDATE schema_version SET version = %s"
SQL_INIT_VERSION = "INSERT INTO schema_version (version) VALUES (0)"

# Microseconds to a ts, written once: `now` and message stamps must convert alike.
_US_TO_TS = "::float8 / 1000000"
SQL_NOW = f"SELECT last_us{_US_TO_TS} FROM clock"
# A group's messages in one statement, so one transaction and one round trip.
# Updating the clock row takes its lock (held to COMMIT) and reserves `count` ids
# and stamps: message `ord` of `count` gets the ord-th. A (from, key) already
# stored is skipped. The notification goes out at COMMIT. Answers the first
# reserved id, and (id, ts) of each message stored.
SQL_SEND_MESSAGES = f"""
WITH stamp AS (
    UPDATE clock SET
        last_us = GREATEST((extract(epoch FROM clock_timestamp()) * 1000000)::bigint,
                           last_us + 1) + %(count)s - 1,
        last_id = last_id + %(count)s
    RETURNING last_id, last_us
), stored AS (
    INSERT INTO messages (id, ts, channel, from_name, to_name, body, meta, key, signature)
    SELECT s.last_id - %(count)s + m.ord, (s.last_us - %(count)s + m.ord){_US_TO_TS},
           m.channel, m.from_name, m.to_name, m.body, m.meta, m.key, m.signature
    FROM stamp s,
         unnest(%(channel)s::text[], %(from_name)s::text[], %(to_name)s::text[],
                %(body)s::bytea[], %(meta)s::text[], %(key)s::text[], %(signature)s::text[])
           WITH ORDINALITY AS m(channel, from_name, to_name, body, meta, key, signature, ord)
    ON CONFLICT (from_name, key) WHERE key IS NOT NULL DO NOTHING
    RETURNING id, ts
), told AS (
    SELECT pg_notify(%(notify_channel)s, %(notice)s)
)
SELECT s.last_id - %(count)s + 1, m.id, m.ts
FROM stamp s CROSS JOIN told LEFT JOIN stored m ON TRUE
"""
# Wraps a write to tokens, keys or flags (positional parameters, then channel and
# notice) so the other replicas hear of it at its COMMIT; answers its row count.
SQL_TELLING_IDENTITY = ("WITH changed AS ({statement} RETURNING 1), "
                        "told AS (SELECT pg_notify(%s, %s)) "
                        "SELECT (SELECT count(*) FROM changed), (SELECT 1 FROM told)")
SQL_LISTEN = f"LISTEN {NOTIFY_CHANNEL}"

_COLUMNS = "id, ts, channel, from_name, to_name, body, meta, signature"
SQL_FIND_BY_KEY = f"SELECT {_COLUMNS} FROM messages WHERE from_name = %s AND key = %s"

# A recipient gets what is addressed to it and what others broadcast on the
# channel. The clock row joins in so `now` comes from the same snapshot; it
# yields one row with no message when nothing matched.
_RECV = f"""
SELECT c.last_us{_US_TO_TS}, m.* FROM clock c LEFT JOIN LATERAL (
    SELECT {_COLUMNS} FROM messages
    WHERE to_name IN (%(to)s, '*') {{channel}} AND ts > %(since)s
      AND NOT (to_name = '*' AND from_name = %(to)s)
    ORDER BY ts LIMIT %(limit)s
) m ON TRUE
ORDER BY m.ts
"""
SQL_RECV = _RECV.format(channel="AND channel = %(channel)s")
SQL_RECV_ALL_CHANNELS = _RECV.format(channel="")

# el-ipc readers see the whole channel's broadcasts (their own included, as the
# older server did) and what is addressed to them.
_WATERMARK = ("COALESCE((SELECT last_id FROM watermarks "
              "WHERE agent = %(agent)s AND channel = %(channel)s), 0)")
SQL_UNREAD = (f"SELECT {_COLUMNS} FROM messages WHERE channel = %(channel)s "
              f"AND id > {_WATERMARK} AND to_name IN (%(agent)s, '*') ORDER BY id LIMIT %(limit)s")
SQL_COUNT_UNREAD = (f"SELECT COUNT(*) FROM messages WHERE channel = %(channel)s "
                    f"AND id > {_WATERMARK} AND to_name IN (%(agent)s, '*')")
SQL_SET_WATERMARK = ("INSERT INTO watermarks (agent, channel, last_id) VALUES (%s, %s, %s) "
                     "ON CONFLICT (agent, channel) DO UPDATE SET last_id = "
                     "GREATEST(watermarks.last_id, excluded.last_id)")

# One statement for a group's acknowledgements, in key order: two replicas
# writing the same rows take their locks in the same order, so never deadlock.
SQL_ACKNOWLEDGE = (
    "INSERT INTO acknowledged (agent, channel, ts, delivered_ts, filed_ts) "
    "SELECT * FROM unnest(%s::text[], %s::text[], %s::float8[], %s::float8[], %s::float8[]) "
    "ON CONFLICT (agent, channel) DO UPDATE SET ts = GREATEST(acknowledged.ts, excluded.ts), "
    "delivered_ts = GREATEST(acknowledged.delivered_ts, excluded.delivered_ts), "
    "filed_ts = GREATEST(acknowledged.filed_ts, excluded.filed_ts)")
SQL_NOTE_CONTACTS = ("INSERT INTO presence (agent, last_seen) "
                     "SELECT * FROM unnest(%s::text[], %s::float8[]) "
                     "ON CONFLICT (agent) DO UPDATE SET last_seen = "
                     "GREATEST(presence.last_seen, excluded.last_seen)")
# Not yet fetched by its recipient (on that channel, or by an all-channels reader).
_NOT_FETCHED = (
    "m.to_name <> '*' AND m.ts > GREATEST("
    "COALESCE((SELECT delivered_ts FROM acknowledged WHERE agent = m.to_name "
    "AND channel = m.channel), 0), "
    "COALESCE((SELECT delivered_ts FROM acknowledged WHERE agent = m.to_name "
    "AND channel = '*'), 0))")
SQL_PENDING = (f"SELECT m.channel, m.to_name, COUNT(*) FROM messages m WHERE {_NOT_FETCHED} "
               "GROUP BY m.channel, m.to_name")
SQL_LAST_CONTACTS = "SELECT agent, last_seen FROM presence"
SQL_MESSAGES_BY_ID = f"SELECT {_COLUMNS} FROM messages WHERE id = ANY(%s) ORDER BY id"
SQL_RECEIPTS = ("SELECT agent, channel, delivered_ts, filed_ts FROM acknowledged "
                "WHERE channel = ANY(%s)")
SQL_WATERMARKS = "SELECT agent, channel, last_id FROM watermarks WHERE channel = ANY(%s)"
_NEVER_SEEN = ("(m.to_name NOT IN (SELECT agent FROM presence) "
               "AND m.to_name NOT IN (SELECT name FROM agents))")
SQL_UNDELIVERED = (
    f"SELECT m.id, m.ts, m.from_name, m.to_name, m.channel, {_NEVER_SEEN} "
    f"FROM messages m WHERE {_NOT_FETCHED} AND (m.ts < %s OR {_NEVER_SEEN}) "
    "ORDER BY m.id LIMIT %s")

SQL_TOKEN_BY_HASH = ("SELECT id, agent, channels, admin FROM tokens "
                     "WHERE hash = %s AND revoked_at IS NULL")
SQL_ANY_TOKEN = "SELECT EXISTS (SELECT 1 FROM tokens WHERE revoked_at IS NULL)"
SQL_CREATE_TOKEN = ("INSERT INTO tokens (hash, agent, channels, admin, created_at) "
                    "VALUES (%s, %s, %s, %s, %s)")
SQL_REVOKE_AGENT_TOKENS = ("UPDATE tokens SET revoked_at = %s "
                           "WHERE agent = %s AND revoked_at IS NULL")
SQL_REVOKE_TOKEN = "UPDATE tokens SET revoked_at = %s WHERE id = %s AND revoked_at IS NULL"
SQL_LIST_TOKENS = ("SELECT id, agent, channels, admin, created_at, revoked_at FROM tokens "
                   "ORDER BY id")
SQL_PUBLIC_KEY = "SELECT public_key, role FROM agents WHERE name = %s"
SQL_FIRST_OPERATOR = ("SELECT public_key FROM agents WHERE role = 'operator' "
                      "ORDER BY created_at, name LIMIT 1")
SQL_REGISTER = ("INSERT INTO agents (name, identity, public_key, role, registered_by, created_at) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO UPDATE SET "
                "identity = excluded.identity, public_key = excluded.public_key, "
                "role = excluded.role, registered_by = excluded.registered_by")
# A registration takes effect only over an older one (or none), never over an operator.
SQL_REGISTER_SIGNED = (
    "INSERT INTO agents (name, identity, public_key, role, registered_by, created_at, "
    "registration_signed_at) VALUES (%s, %s, %s, 'agent', %s, %s, %s) "
    "ON CONFLICT (name) DO UPDATE SET identity = excluded.identity, "
    "public_key = excluded.public_key, role = excluded.role, "
    "registered_by = excluded.registered_by, "
    "registration_signed_at = excluded.registration_signed_at "
    "WHERE agents.role = 'agent' AND (agents.registration_signed_at IS NULL "
    "OR agents.registration_signed_at < excluded.registration_signed_at)")
SQL_GET_FLAG = "SELECT value FROM meta WHERE key = %s"
SQL_SET_FLAG = ("INSERT INTO meta (key, value) VALUES (%s, %s) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value")

# Retention: messages past the age or beyond the per-queue cap, but only those every
# known reader has already gone past; an unread message is never dropped.
SQL_RETENTION_CANDIDATES = """
WITH ranked AS (
    SELECT id, ts, channel, from_name, to_name,
           ROW_NUMBER() OVER (PARTITION BY channel, to_name ORDER BY id DESC) AS newer
    FROM messages
)
SELECT r.id FROM ranked r
WHERE (r.ts < %(cutoff)s OR r.newer > %(cap)s)
  AND CASE WHEN r.to_name <> '*' THEN
        r.ts <= GREATEST(
            COALESCE((SELECT ts FROM acknowledged WHERE agent = r.to_name AND channel = r.channel), 0),
            COALESCE((SELECT ts FROM acknowledged WHERE agent = r.to_name AND channel = '*'), 0))
        AND r.id <= COALESCE(
            (SELECT last_id FROM watermarks WHERE agent = r.to_name AND channel = r.channel),
            r.id)
      ELSE
        EXISTS (SELECT 1 FROM acknowledged WHERE channel IN (r.channel, '*')
                UNION ALL SELECT 1 FROM watermarks WHERE channel = r.channel)
        AND NOT EXISTS (SELECT 1 FROM acknowledged a WHERE a.channel IN (r.channel, '*')
                        AND a.agent <> r.from_name AND a.ts < r.ts)
        AND NOT EXISTS (SELECT 1 FROM watermarks w WHERE w.channel = r.channel
                        AND w.agent <> r.from_name AND w.last_id < r.id)
      END
ORDER BY r.id
LIMIT 5000
"""
SQL_DELETE_MESSAGES = "DELETE FROM messages WHERE id = ANY(%s)"
SQL_DELETE_HANDOFF_CHECKS = "DELETE FROM handoff_checks WHERE message_id = ANY(%s)"

# The operator console's feed: every recipient's messages, newest first (the caller
# turns them round), optionally one channel's, or those from or to one agent.
SQL_RECENT = (f"SELECT {_COLUMNS} FROM messages WHERE id > %(after)s "
              "AND (%(channel)s::text IS NULL OR channel = %(channel)s) "
              "AND (%(agent)s::text IS NULL OR from_name = %(agent)s OR to_name = %(agent)s) "
              "ORDER BY id DESC LIMIT %(limit)s")
SQL_RECORD_HANDOFF_CHECK = (
    "INSERT INTO handoff_checks (message_id, agent, result, checked_at) "
    "VALUES (%s, %s, %s, %s) ON CONFLICT (message_id, agent) DO UPDATE SET "
    "result = excluded.result, checked_at = excluded.checked_at")
SQL_HANDOFF_CHECKS = ("SELECT message_id, agent, result FROM handoff_checks "
                      "WHERE message_id = ANY(%s)")

SQL_CHANNELS = ("SELECT channel, COUNT(*), MAX(ts) FROM messages "
                "GROUP BY channel ORDER BY MAX(ts) DESC")
SQL_AGENTS = ("SELECT name, identity, role, registered_by, created_at FROM agents "
              "ORDER BY created_at")


def _row_to_message(row: tuple | Any) -> StoredMessage:
    return StoredMessage(id=row[0], ts=row[1], channel=row[2], sender=row[3], to=row[4],
                         body=bytes(row[5]).decode("utf-8"),
                         meta=json.loads(row[6]) if row[6] else None, signature=row[7])


def _one_line(exc: BaseException) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or \
        type(exc).__name__


def _columns(group: "_Group") -> dict[str, Any]:
    """A group's messages as the arrays SQL_SEND_MESSAGES unnests."""
    messages = [send.message for send in group.sends]
    return {
        "count": len(messages),
        "channel": [m.channel for m in messages],
        "from_name": [m.sender for m in messages],
        "to_name": [m.to for m in messages],
        "body": [m.body.encode("utf-8") for m in messages],
        "meta": [encode_meta(m.meta) for m in messages],
        "key": [m.key for m in messages],
        "signature": [m.signature for m in messages],
    }


@dataclass
class _Send:
    message: NewMessage
    future: asyncio.Future
    # Later sends with the same (from, key) while this one was not committed yet.
    followers: list[asyncio.Future] = field(default_factory=list)


@dataclass
class _Group:
    """Writes gathered while the writer was busy, and who waits for them.

    Its messages are stored by one statement, its receipts and contacts by one
    each, its other statements one by one: each in a transaction of its own.
    """
    sends: list[_Send] = field(default_factory=list)
    by_key: dict[tuple[str, str], _Send] = field(default_factory=dict)
    # Other statements in arrival order: (sql, params, future for its row count,
    # whether it changes tokens, keys or flags).
    statements: list[tuple[str, Any, asyncio.Future, bool]] = field(default_factory=list)
    # (agent, channel) -> (acknowledged, delivered, filed) maxima, written in one statement.
    acknowledged: dict[tuple[str, str], tuple[float, float, float]] = field(default_factory=dict)
    contacts: dict[str, float] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.sends or self.statements or self.acknowledged or self.contacts)


class PostgresStore(Store):
    """One writer connection that group-commits, a pool for reads, a LISTEN connection.

    Everything runs on the event loop (psycopg's asyncio interface): no threads.
    """

    def __init__(self, url: str, listen: bool = True):
        self.url = url
        # A serving replica hears the others' commits; admin commands need not.
        self.listen = listen
        self.shown = shown_database(url)
        # Names this process's sessions in pg_stat_activity, and marks its own NOTIFYs.
        self.replica = f"agent-bus pid {os.getpid()}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: psycopg.AsyncConnection | None = None
        self._pool: AsyncConnectionPool | None = None
        self._listener: asyncio.Task | None = None
        self._committing: asyncio.Task | None = None
        self._forming = _Group()
        self._in_flight: _Group | None = None
        self._kick_scheduled = False
        self._idle = asyncio.Event()
        self._open = False
        self._acknowledged: dict[tuple[str, str], tuple[float, float, float]] = {}
        self._contacts: dict[str, float] = {}
        self._hearing = False
        self._identity_cache: dict[tuple, Any] = {}
        self._identity_generation = 0

    # -- lifecycle ---------------------------------------------------------

    def _connect_options(self) -> dict[str, Any]:
        # JIT compiling would take longer than any of our statements runs.
        options = (conninfo_to_dict(self.url).get("options") or "") + " -c jit=off"
        return {"autocommit": True, "connect_timeout": CONNECT_TIMEOUT,
                "application_name": self.replica, "options": options.strip()}

    async def _connect(self, **extra: Any) -> psycopg.AsyncConnection:
        return await psycopg.AsyncConnection.connect(self.url, **self._connect_options(), **extra)

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            writer = await self._connect()
        except psycopg.Error as exc:
            raise StoreError(
                f"cannot connect to PostgreSQL at {self.shown} ({_one_line(exc)}); check that "
                "it is running and that the URL's host, port, user and database are right "
                "(createdb NAME makes a missing database)") from None
        listening = None
        try:
            self.migrated = await self._migrate(writer)
            # reconnect_timeout=0: the pool does not retry failed connections on its
            # own schedule (1 s, doubling), it makes one when a read needs it; so reads
            # work again the moment the database is back.
            self._pool = AsyncConnectionPool(
                self.url, min_size=POOL_MIN if self.listen else 1, max_size=POOL_MAX,
                kwargs=self._connect_options(), timeout=POOL_WAIT, reconnect_timeout=0,
                open=False, name="agent-bus-reads")
            await self._pool.open(wait=True, timeout=POOL_WAIT)
            if self.listen:
                listening = await self._connect(**LISTEN_KEEPALIVES)
                await listening.execute(SQL_LISTEN)
        except BaseException as exc:
            await writer.close()
            if listening is not None:
                await listening.close()
            if self._pool is not None:
                await self._pool.close()
                self._pool = None
            if isinstance(exc, psycopg.Error):
                raise StoreError(f"PostgreSQL at {self.shown}: {_one_line(exc)}") from None
            raise
        self._writer = writer
        self._open = True
        self._idle.set()
        if listening is not None:
            self._hearing = True
            self._listener = asyncio.create_task(self._hear_commits(listening),
                                                 name="agent-bus-listen")

    async def _migrate(self, conn: psycopg.AsyncConnection) -> tuple[int, int]:
        """Apply the migrations the database lacks, one transaction each; returns the
        versions before and after. The advisory lock lets replicas start together."""
        async with conn.transaction():
            await conn.execute(SQL_MIGRATION_LOCK, (MIGRATION_LOCK,))
            has_version, has_messages = await (await conn.execute(SQL_IS_OURS)).fetchone()
            if has_messages and not has_version:
                raise StoreError(
                    f"{self.shown} has a messages table but no agent-bus schema_version: it is "
                    "not an agent-bus database. Nothing was changed; give --db an empty "
                    "database (createdb NAME) or one agent-bus made.")
            await conn.execute(SQL_CREATE_VERSION_TABLE)
            before = await self._version(conn)
        if before > SCHEMA_VERSION:
            raise StoreError(f"the database schema (version {before}) is newer than this "
                             f"agent-bus understands ({SCHEMA_VERSION}); upgrade agent-bus")
        version = before
        while version < SCHEMA_VERSION:
            async with conn.transaction():
                await conn.execute(SQL_MIGRATION_LOCK, (MIGRATION_LOCK,))
                version = await self._version(conn)  # another replica may have gone first
                if version < SCHEMA_VERSION:
                    version += 1
                    await conn.execute(MIGRATIONS[version - 1])
                    await conn.execute(SQL_SET_VERSION, (version,))
        return before, version

    @staticmethod
    async def _version(conn: psycopg.AsyncConnection) -> int:
        row = await (await conn.execute(SQL_GET_VERSION)).fetchone()
        if row is None:
            await conn.execute(SQL_INIT_VERSION)
            return 0
        return row[0]

    async def close(self) -> None:
        if not self._open:
            return
        await self._idle.wait()
        self._open = False
        if self._listener is not None:
            self._listener.cancel()
            try:
                await self._listener
            except asyncio.CancelledError:
                pass
            self._listener = None
        if self._writer is not None:
            await self._writer.close()
            self._writer = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    # -- hearing other replicas --------------------------------------------

    async def _hear_commits(self, conn: psycopg.AsyncConnection | None) -> None:
        backoff = RECONNECT_FIRST
        lost = False
        while True:
            try:
                if conn is None:
                    conn = await self._connect(**LISTEN_KEEPALIVES)
                    await conn.execute(SQL_LISTEN)
                    log.info("hearing other servers' commits again; every parked long-poll "
                             "re-checks")
                    lost, backoff = False, RECONNECT_FIRST
                    # Commits made while we were deaf were not heard: look again.
                    self._forget_identity()
                    self._hearing = True
                    self._wake_everyone()
                async for notice in conn.notifies():
                    self._heard(notice.payload)
                raise psycopg.OperationalError("the notification stream ended")
            except psycopg.Error as exc:
                self._hearing = False
                self._forget_identity()
                if not lost:
                    log.warning("lost the database connection that hears other servers' "
                                "commits (%s); reconnecting", _one_line(exc))
                    lost = True
                if conn is not None:
                    await conn.close()
                    conn = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RECONNECT_LONGEST)
            except asyncio.CancelledError:
                if conn is not None:
                    await conn.close()
                raise

    def _heard(self, payload: str) -> None:
        try:
            notice = json.loads(payload)
            if notice["replica"] == self.replica:
                return  # our own commit: handled when it committed
            if notice.get("identity"):
                self._forget_identity()
            if notice.get("wake_all"):
                self._wake_everyone()
            elif notice.get("wake") and self.on_remote_commit is not None:
                self.on_remote_commit([CommitNotice(channel, to)
                                       for channel, to in notice["wake"]])
        except (ValueError, TypeError, KeyError, AttributeError):
            log.warning("ignoring a malformed notification on %s: %.80r", NOTIFY_CHANNEL, payload)

    def _wake_everyone(self) -> None:
        if self.on_commits_missed is not None:
            self.on_commits_missed()

    def _wake_notice(self, sends: list[_Send]) -> str:
        """Whom other replicas must wake for these messages."""
        pairs = sorted({(send.message.channel, send.message.to) for send in sends})
        notice = json.dumps({"replica": self.replica, "wake": pairs}, separators=(",", ":"))
        if len(notice.encode("utf-8")) > NOTIFY_LIMIT:
            # Too many to name: every listener wakes all its waiters, which re-check.
            notice = json.dumps({"replica": self.replica, "wake_all": True})
        return notice

    # -- identity answers, cached ------------------------------------------
    #
    # Every request asks whether auth is on and every send whether secure mode is;
    # a round trip for each would halve throughput. So these answers are kept
    # while this replica hears the others' commits: every write to tokens, keys
    # or flags (by any replica, or an admin command) notifies in its transaction,
    # and the cache is dropped when that arrives, or when hearing is lost.

    def _forget_identity(self) -> None:
        self._identity_cache.clear()
        self._identity_generation += 1

    async def _identity_value(self, key: tuple, sql: str, params: Any = None) -> Any:
        if key in self._identity_cache:
            return self._identity_cache[key]
        generation = self._identity_generation
        value = await self._value(sql, params)
        # Kept only if nothing changed while we asked, and we would hear of a change.
        if self._hearing and generation == self._identity_generation:
            self._identity_cache[key] = value
        return value

    # -- group commit ------------------------------------------------------

    def _join(self) -> _Group:
        """The forming group, committed as soon as the writer is free."""
        if not self._open:
            raise BusError(errors.SHUTTING_DOWN)
        self._idle.clear()
        if not self._kick_scheduled and self._in_flight is None:
            # Let the rest of this loop iteration's requests join the same group.
            self._kick_scheduled = True
            self._loop.call_soon(self._kick)
        return self._forming

    def _kick(self) -> None:
        self._kick_scheduled = False
        if self._in_flight is not None:
            return
        group = self._forming
        if not group:
            self._idle.set()
            return
        self._forming = _Group()
        self._in_flight = group
        self._committing = self._loop.create_task(self._commit(group))

    async def _commit(self, group: _Group) -> None:
        try:
            if group.sends:
                await self._store_sends(group)
            for sql, params, future, changes_identity in group.statements:
                try:
                    outcome: int | BusError = await self._rowcount(sql, params)
                except BusError as exc:
                    outcome = exc
                if changes_identity:
                    self._forget_identity()  # before its writer hears it is done
                _settle(future, outcome)
            await self._store_receipts(group)
        except Exception as exc:  # a bug: fail what is left loudly, keep the writer going
            log.exception("unexpected error while committing")
            self._fail(group, BusError(errors.INTERNAL, type(exc).__name__))
        finally:
            self._in_flight = None
            self._kick()

    async def _writer_connection(self) -> psycopg.AsyncConnection:
        conn = self._writer
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                await conn.close()
            self._writer = None
            try:
                self._writer = await self._connect()
            except psycopg.Error as exc:
                raise BusError(errors.STORAGE_UNAVAILABLE,
                               f"cannot reach PostgreSQL: {_one_line(exc)}") from None
        return self._writer

    async def _execute(self, sql: str, params: Any) -> list[tuple]:
        """One statement on the writer connection, in a transaction of its own (autocommit);
        its rows, or a BusError. Run again where PostgreSQL says nothing was done."""
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            conn = await self._writer_connection()
            try:
                cursor = await conn.execute(sql, params)
                return await cursor.fetchall() if cursor.description else [(cursor.rowcount,)]
            except (pg_errors.AdminShutdown, pg_errors.TransactionRollback) as exc:
                # The answer was "session ended by an administrator" (a restart,
                # pg_terminate_backend: the statement was not run), or a deadlock or
                # serialization failure (PostgreSQL undid it): nothing was stored.
                problem: psycopg.Error = exc
            except psycopg.OperationalError as exc:
                if conn.broken:
                    raise BusError(errors.STORAGE_UNAVAILABLE,
                                   "the connection to PostgreSQL broke while writing, so "
                                   "whether it was stored is unknown; a retry with the same "
                                   "idempotency key is safe") from None
                raise BusError(errors.STORAGE_UNAVAILABLE, _one_line(exc)) from None
            except psycopg.Error as exc:
                log.error("PostgreSQL refused a write, nothing of it was stored: %s",
                          _one_line(exc))
                raise BusError(errors.INTERNAL, type(exc).__name__) from None
            log.warning("write attempt %d of %d did nothing, trying again: %s",
                        attempt, WRITE_ATTEMPTS, _one_line(problem))
        raise BusError(errors.STORAGE_UNAVAILABLE, _one_line(problem))

    async def _rowcount(self, sql: str, params: Any) -> int:
        return (await self._execute(sql, params))[0][0]

    async def _store_sends(self, group: _Group) -> None:
        try:
            rows = await self._execute(SQL_SEND_MESSAGES, {
                **_columns(group), "notify_channel": NOTIFY_CHANNEL,
                "notice": self._wake_notice(group.sends)})
        except BusError as exc:
            group.by_key.clear()
            for send in group.sends:
                for future in (send.future, *send.followers):
                    _settle(future, exc)
            return
        first_id = rows[0][0]
        stored = {message_id - first_id: (message_id, ts)
                  for _, message_id, ts in rows if message_id is not None}
        found = await self._find_duplicates(group, stored)
        # Answered from here on: a later send with one of these keys must not wait
        # for this group (it finds the stored message itself).
        group.by_key.clear()
        committed = []
        for index, send in enumerate(group.sends):
            outcome: SendResult | BusError
            if index in stored:
                message_id, ts = stored[index]
                m = send.message
                first = StoredMessage(id=message_id, ts=ts, channel=m.channel, sender=m.sender,
                                      to=m.to, body=m.body, meta=m.meta, signature=m.signature)
                committed.append(first)
                outcome = SendResult(first)
            elif index in found:
                outcome = SendResult(found[index], duplicate=True)
            else:
                outcome = BusError(errors.STORAGE_UNAVAILABLE, "this key was used before, and "
                                   "that first send could not be read back; retry")
            _settle(send.future, outcome)
            for follower in send.followers:
                _settle(follower, outcome if isinstance(outcome, BusError)
                        else SendResult(outcome.message, duplicate=True))
        if committed and self.on_commit is not None:
            self.on_commit(committed)

    async def _find_duplicates(self, group: _Group,
                               stored: dict[int, tuple[int, float]]) -> dict[int, StoredMessage]:
        """The first message of each send skipped as a repeated (from, key).

        Runs after COMMIT, so it must not fail the others: a send it cannot answer
        is told to retry, which its key makes safe.
        """
        found: dict[int, StoredMessage] = {}
        for index, send in enumerate(group.sends):
            message = send.message
            if index in stored or message.key is None:
                continue
            try:
                rows = await self._execute(SQL_FIND_BY_KEY, (message.sender, message.key))
            except BusError as exc:
                log.warning("could not read back the first send of a repeated key: %s", exc)
                continue
            if rows:
                found[index] = _row_to_message(rows[0])
        return found

    async def _store_receipts(self, group: _Group) -> None:
        """Receipts and contacts: fire-and-forget, so a failure is only logged."""
        try:
            if group.acknowledged:
                keys = sorted(group.acknowledged)
                receipts = [group.acknowledged[k] for k in keys]
                await self._execute(SQL_ACKNOWLEDGE, (
                    [agent for agent, _ in keys], [channel for _, channel in keys],
                    *([receipt[i] for receipt in receipts] for i in range(3))))
            if group.contacts:
                agents = sorted(group.contacts)
                await self._execute(SQL_NOTE_CONTACTS, (agents,
                                                        [group.contacts[a] for a in agents]))
        except BusError as exc:
            log.warning("receipts and contacts not stored this time: %s", exc.message)

    @staticmethod
    def _fail(group: _Group, error: BusError) -> None:
        for send in group.sends:
            for future in (send.future, *send.followers):
                _settle(future, error)
        for _sql, _params, future, _changes_identity in group.statements:
            _settle(future, error)

    async def _write(self, sql: str, params: tuple, changes_identity: bool = False) -> int:
        """One statement through the writer; its row count once it is durable.

        A change to tokens, keys or flags also notifies the other replicas in the
        same transaction, so they drop their cached answers.
        """
        if changes_identity:
            sql = SQL_TELLING_IDENTITY.format(statement=sql)
            params = (*params, NOTIFY_CHANNEL, json.dumps({"replica": self.replica,
                                                           "identity": True}))
        future = self._loop.create_future()
        self._join().statements.append((sql, params, future, changes_identity))
        return await future

    # -- reads -------------------------------------------------------------

    async def _rows(self, sql: str, params: Any = None) -> list[tuple]:
        pool = self._pool
        if pool is None:
            raise BusError(errors.SHUTTING_DOWN)
        for attempt in (1, 2):
            try:
                async with pool.connection() as conn:
                    return await (await conn.execute(sql, params)).fetchall()
            except PoolTimeout:
                raise BusError(errors.STORAGE_UNAVAILABLE,
                               f"no connection to PostgreSQL within {POOL_WAIT:g} s") from None
            except PoolClosed:
                raise BusError(errors.SHUTTING_DOWN) from None
            except psycopg.OperationalError as exc:
                if attempt == 2:
                    raise BusError(errors.STORAGE_UNAVAILABLE, _one_line(exc)) from None
                # A connection the database dropped (restart, pg_terminate_backend)
                # shows only when used: weed out the others like it, then retry.
                await pool.check()
        raise AssertionError("unreachable")

    async def _value(self, sql: str, params: Any = None) -> Any:
        rows = await self._rows(sql, params)
        return rows[0][0] if rows else None

    # -- the interface -----------------------------------------------------

    async def now(self) -> float:
        return await self._value(SQL_NOW)

    async def append(self, message: NewMessage) -> SendResult:
        group = self._join()
        future = self._loop.create_future()
        if message.key is not None:
            for pending in (self._in_flight, group):
                first = pending.by_key.get((message.sender, message.key)) if pending else None
                if first is not None:
                    # The first send with this key is not committed yet: answer with
                    # it when (and only if) it commits.
                    first.followers.append(future)
                    return await future
        send = _Send(message, future)
        group.sends.append(send)
        if message.key is not None:
            group.by_key[(message.sender, message.key)] = send
        return await future

    async def recv(self, to: str, channel: str, since: float, limit: int) -> Received:
        params = {"to": to, "channel": channel, "since": since, "limit": limit}
        rows = await self._rows(SQL_RECV_ALL_CHANNELS if channel == "*" else SQL_RECV, params)
        now = rows[0][0]
        return Received([_row_to_message(row[1:]) for row in rows if row[1] is not None], now)

    def acknowledge(self, agent: str, channel: str, since: float, delivered: float = 0.0,
                    filed: bool = False) -> None:
        key = (agent, channel)
        receipt = (since, max(since, delivered), since if filed else 0.0)
        known = self._acknowledged.get(key)
        if not self._open:
            return
        # A first poll is written even at since 0: it makes the agent a known reader.
        if known is not None and all(n <= o for n, o in zip(receipt, known)):
            return
        self._acknowledged[key] = tuple(max(n, o) for n, o in zip(receipt, known or receipt))
        # Fire-and-forget: receipts ride along with the next group commit.
        group = self._join()
        pending = group.acknowledged.get(key, (0.0, 0.0, 0.0))
        group.acknowledged[key] = tuple(max(n, o) for n, o in zip(receipt, pending))

    def note_contact(self, agent: str) -> None:
        now = time.time()
        if now - self._contacts.get(agent, 0.0) < CONTACT_EVERY or not self._open:
            return
        self._contacts[agent] = now
        self._join().contacts[agent] = now

    async def last_contacts(self) -> dict[str, float]:
        stored = dict(await self._rows(SQL_LAST_CONTACTS))
        return {**stored, **{a: t for a, t in self._contacts.items() if t > stored.get(a, 0)}}

    async def messages_by_id(self, ids: list[int]) -> list[StoredMessage]:
        if not ids:
            return []
        return [_row_to_message(r) for r in await self._rows(SQL_MESSAGES_BY_ID, (list(ids),))]

    async def receipts(self, channels: set[str]) -> tuple[list[ReceiptRow], list[WatermarkRow]]:
        wanted = sorted(channels | {"*"})
        rows = [ReceiptRow(*r) for r in await self._rows(SQL_RECEIPTS, (wanted,))]
        marks = [WatermarkRow(*r) for r in await self._rows(SQL_WATERMARKS, (wanted,))]
        return with_pending_receipts(rows, self._acknowledged, set(wanted)), marks

    async def undelivered(self, queued_before: float, limit: int = 1000) -> list[dict]:
        rows = await self._rows(SQL_UNDELIVERED, (queued_before, limit))
        return [undelivered_entry(*row) for row in rows]

    async def recent_messages(self, after: int | None, limit: int, channel: str | None = None,
                              agent: str | None = None) -> list[StoredMessage]:
        rows = await self._rows(SQL_RECENT, {"after": after or 0, "limit": limit,
                                             "channel": channel, "agent": agent})
        return [_row_to_message(row) for row in reversed(rows)]

    async def record_handoff_check(self, message_id: int, agent: str, result: str) -> None:
        await self._write(SQL_RECORD_HANDOFF_CHECK, (message_id, agent, result, time.time()))

    async def handoff_checks(self, ids: list[int]) -> dict[int, dict[str, str]]:
        if not ids:
            return {}
        out: dict[int, dict[str, str]] = {}
        for message_id, agent, result in await self._rows(SQL_HANDOFF_CHECKS, (list(ids),)):
            out.setdefault(message_id, {})[agent] = result
        return out

    async def read_unread(self, agent: str, channel: str, limit: int) -> list[StoredMessage]:
        rows = await self._rows(SQL_UNREAD, {"agent": agent, "channel": channel, "limit": limit})
        if not rows:
            return []
        await self._write(SQL_SET_WATERMARK, (agent, channel, rows[-1][0]))
        return [_row_to_message(row) for row in rows]

    async def count_unread(self, agent: str, channel: str) -> int:
        return await self._value(SQL_COUNT_UNREAD, {"agent": agent, "channel": channel})

    async def channels(self) -> list[dict]:
        return [{"channel": c, "count": n, "last_message": last}
                for c, n, last in await self._rows(SQL_CHANNELS)]

    async def registered_agents(self) -> list[dict]:
        return [{"name": r[0], "identity": r[1], "role": r[2], "registered_by": r[3],
                 "created_at": r[4]} for r in await self._rows(SQL_AGENTS)]

    async def pending_counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for channel, recipient, count in await self._rows(SQL_PENDING):
            out.setdefault(channel, {})[recipient] = count
        return out

    async def enforce_retention(self, max_age: float | None, per_queue: int | None) -> int:
        cutoff = time.time() - max_age if max_age else float("-inf")
        cap = per_queue if per_queue else 2 ** 62
        ids = [row[0] for row in await self._rows(SQL_RETENTION_CANDIDATES,
                                                  {"cutoff": cutoff, "cap": cap})]
        if not ids:
            return 0
        removed = await self._write(SQL_DELETE_MESSAGES, (ids,))
        await self._write(SQL_DELETE_HANDOFF_CHECKS, (ids,))
        return removed

    # -- identity: tokens and keys ----------------------------------------

    async def auth_enabled(self) -> bool:
        return bool(await self._identity_value(("auth",), SQL_ANY_TOKEN))

    async def token_by_hash(self, token_hash: str) -> TokenRecord | None:
        rows = await self._rows(SQL_TOKEN_BY_HASH, (token_hash,))
        if not rows:
            return None
        token_id, agent, channels, admin = rows[0]
        return TokenRecord(id=token_id, agent=agent,
                           channels=tuple(json.loads(channels)) if channels else None,
                           admin=bool(admin))

    async def create_token(self, token_hash: str, agent: str, channels: tuple[str, ...] | None,
                           admin: bool) -> None:
        await self._write(SQL_CREATE_TOKEN, (
            token_hash, agent, json.dumps(list(channels)) if channels else None, admin,
            time.time()), changes_identity=True)

    async def revoke_tokens(self, agent: str | None = None, token_id: int | None = None) -> int:
        if token_id is not None:
            return await self._write(SQL_REVOKE_TOKEN, (time.time(), token_id),
                                     changes_identity=True)
        return await self._write(SQL_REVOKE_AGENT_TOKENS, (time.time(), agent),
                                 changes_identity=True)

    async def list_tokens(self) -> list[dict]:
        return [{"id": r[0], "agent": r[1], "channels": json.loads(r[2]) if r[2] else None,
                 "admin": bool(r[3]), "created_at": r[4], "revoked_at": r[5]}
                for r in await self._rows(SQL_LIST_TOKENS)]

    async def public_key(self, name: str) -> tuple[str, str] | None:
        rows = await self._rows(SQL_PUBLIC_KEY, (name,))
        return (rows[0][0], rows[0][1]) if rows else None

    async def first_operator_key(self) -> str | None:
        return await self._identity_value(("operator",), SQL_FIRST_OPERATOR)

    async def register_agent(self, name: str, identity: str, public_key: str, role: str,
                             registered_by: str | None) -> None:
        await self._write(SQL_REGISTER, (name, identity, public_key, role, registered_by,
                                         time.time()), changes_identity=True)

    async def register_agent_signed(self, name: str, identity: str, public_key: str,
                                    registered_by: str, signed_at_ms: int) -> bool:
        return bool(await self._write(SQL_REGISTER_SIGNED, (
            name, identity, public_key, registered_by, time.time(), signed_at_ms),
            changes_identity=True))

    async def get_flag(self, name: str) -> str | None:
        return await self._identity_value(("flag", name), SQL_GET_FLAG, (name,))

    async def set_flag(self, name: str, value: str) -> None:
        await self._write(SQL_SET_FLAG, (name, value), changes_identity=True)


def _settle(future: asyncio.Future, outcome: Any) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
