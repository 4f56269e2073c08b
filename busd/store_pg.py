"""The PostgreSQL store: any number of bus servers (replicas) share one database.

Order across replicas. Every transaction that inserts messages locks the one
row of the `clock` table first and holds that row lock to COMMIT, so these
transactions run one at a time, whichever replica sent them, and each becomes
visible before the next one can take the lock. A replica takes the lock before it
fixes its group: the sends that reach it while another replica holds the clock join
the group, so replicas taking turns commit in larger groups. Each takes its ids and stamps
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
from typing import Any, Awaitable, Callable

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

from . import errors
from .errors import BusError
from .model import SendResult, StoredMessage, encode_meta
from .store import CommitNotice, StoreError, shown_database
from .store_core import Group, Send, SQLStore, answer, refuse_newer, settle
from .store_sql import POSTGRES, SCHEMA_VERSION, US_TO_TS, Queries

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

SQL_MIGRATION_LOCK = "SELECT pg_advisory_xact_lock(%s)"
SQL_IS_OURS = ("SELECT to_regclass('schema_version') IS NOT NULL, "
               "to_regclass('messages') IS NOT NULL")

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
    SELECT s.last_id - %(count)s + m.ord, (s.last_us - %(count)s + m.ord){US_TO_TS},
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
# A group's transaction begins by locking the clock row (SQL_SEND_MESSAGES updates it
# under that lock); one round trip, simple protocol (no parameters).
SQL_TAKE_THE_CLOCK = "BEGIN; SELECT last_id FROM clock FOR UPDATE"


async def _roll_back(conn: psycopg.AsyncConnection) -> None:
    """End a transaction a failed write left open, so the connection serves the next one."""
    if conn.broken or conn.info.transaction_status not in (TransactionStatus.INTRANS,
                                                           TransactionStatus.INERROR):
        return
    try:
        await conn.execute(PostgresStore.sql.roll_back)
    except psycopg.Error as exc:
        log.warning("could not roll back a failed write (%s); the connection is replaced",
                    _one_line(exc))
        await conn.close()


def _one_line(exc: BaseException) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or \
        type(exc).__name__


def _columns(group: Group) -> dict[str, Any]:
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


class PostgresStore(SQLStore):
    """One writer connection that group-commits, a pool for reads, a LISTEN connection.

    Everything runs on the event loop (psycopg's asyncio interface): no threads. A
    group's messages are stored by one statement, its receipts and contacts by one
    each, its other statements one by one: each in a transaction of its own.
    """

    dialect = POSTGRES
    sql = Queries(POSTGRES)

    def __init__(self, url: str, listen: bool = True):
        super().__init__()
        self.url = url
        # A serving replica hears the others' commits; admin commands need not.
        self.listen = listen
        self.shown = shown_database(url)
        # Names this process's sessions in pg_stat_activity, and marks its own NOTIFYs.
        self.replica = f"agent-bus pid {os.getpid()}"
        self._writer: psycopg.AsyncConnection | None = None
        self._pool: AsyncConnectionPool | None = None
        self._listener: asyncio.Task | None = None
        self._committing: asyncio.Task | None = None
        self._hearing = False

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
        self._idle.set()
        self._open = True
        if listening is not None:
            self._hearing = True
            self._listener = asyncio.create_task(self._hear_commits(listening),
                                                 name="agent-bus-listen")

    async def _migrate(self, conn: psycopg.AsyncConnection,
                       upto: int = SCHEMA_VERSION) -> tuple[int, int]:
        """Apply the migrations the database lacks (up to version `upto`), one transaction
        each; returns the versions before and after. The advisory lock lets replicas
        start together."""
        async with conn.transaction():
            await conn.execute(SQL_MIGRATION_LOCK, (MIGRATION_LOCK,))
            has_version, has_messages = await (await conn.execute(SQL_IS_OURS)).fetchone()
            if has_messages and not has_version:
                raise StoreError(
                    f"{self.shown} has a messages table but no agent-bus schema_version: it is "
                    "not an agent-bus database. Nothing was changed; give --db an empty "
                    "database (createdb NAME) or one agent-bus made.")
            await conn.execute(self.sql.create_version_table)
            before = await self._version(conn)
        refuse_newer(before)
        version = before
        while version < upto:
            async with conn.transaction():
                await conn.execute(SQL_MIGRATION_LOCK, (MIGRATION_LOCK,))
                version = await self._version(conn)  # another replica may have gone first
                if version < upto:
                    version += 1
                    await conn.execute(self.sql.migrations[version - 1])
                    await conn.execute(self.sql.set_version, (version,))
        return before, version

    async def _version(self, conn: psycopg.AsyncConnection) -> int:
        row = await (await conn.execute(self.sql.get_version)).fetchone()
        if row is None:
            await conn.execute(self.sql.init_version)
            return 0
        return row[0]

    async def _disconnect(self) -> None:
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

    def _wake_notice(self, sends: list[Send]) -> str:
        """Whom other replicas must wake for these messages."""
        pairs = sorted({(send.message.channel, send.message.to) for send in sends})
        notice = json.dumps({"replica": self.replica, "wake": pairs}, separators=(",", ":"))
        if len(notice.encode("utf-8")) > NOTIFY_LIMIT:
            # Too many to name: every listener wakes all its waiters, which re-check.
            notice = json.dumps({"replica": self.replica, "wake_all": True})
        return notice

    # -- identity answers, cached (store_core) ---------------------------------
    #
    # A round trip for each would halve throughput. Every write to tokens, keys or
    # flags (by any replica, or an admin command) notifies in its transaction, and the
    # cache is dropped when that arrives, or when hearing is lost.

    def _hears_identity_changes(self) -> bool:
        return self._hearing

    # -- group commit ------------------------------------------------------

    def _start_commit(self, group: Group) -> None:
        self._committing = self._loop.create_task(self._commit(group))

    async def _commit(self, group: Group) -> None:
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
                settle(future, outcome)
            await self._store_receipts(group)
        except Exception as exc:  # a bug: fail what is left loudly, keep the writer going
            log.exception("unexpected error while committing")
            self._fail(group, BusError(errors.INTERNAL, type(exc).__name__))
        finally:
            self._finished()

    async def _writer_connection(self) -> psycopg.AsyncConnection:
        conn = self._writer
        if conn is not None and not conn.closed:
            # Whatever the server sent while this connection sat idle is a goodbye (a
            # restart, pg_terminate_backend): read it now, so a connection already gone is
            # replaced before a statement goes out whose fate would then be unknown.
            try:
                conn.pgconn.consume_input()
            except psycopg.OperationalError:
                pass
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
        async def statement(conn: psycopg.AsyncConnection) -> list[tuple]:
            cursor = await conn.execute(sql, params)
            return await cursor.fetchall() if cursor.description else [(cursor.rowcount,)]

        return await self._attempt(statement)

    async def _attempt(self, work: Callable[[psycopg.AsyncConnection], Awaitable[list[tuple]]]
                       ) -> list[tuple]:
        """`work` on the writer connection: its rows, or a BusError. Run again where
        PostgreSQL says nothing was done; a transaction `work` left open is rolled back."""
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            conn = await self._writer_connection()
            try:
                return await work(conn)
            except (pg_errors.AdminShutdown, pg_errors.TransactionRollback) as exc:
                # The answer was "session ended by an administrator" (a restart,
                # pg_terminate_backend: the statement was not run), or a deadlock or
                # serialization failure (PostgreSQL undid it): nothing was stored.
                problem: psycopg.Error = exc
                await _roll_back(conn)
            except psycopg.OperationalError as exc:
                if conn.broken:
                    raise BusError(errors.STORAGE_UNAVAILABLE,
                                   "the connection to PostgreSQL broke while writing, so "
                                   "whether it was stored is unknown; a retry with the same "
                                   "idempotency key is safe") from None
                await _roll_back(conn)
                raise BusError(errors.STORAGE_UNAVAILABLE, _one_line(exc)) from None
            except psycopg.Error as exc:
                await _roll_back(conn)
                log.error("PostgreSQL refused a write, nothing of it was stored: %s",
                          _one_line(exc))
                raise BusError(errors.INTERNAL, type(exc).__name__) from None
            log.warning("write attempt %d of %d did nothing, trying again: %s",
                        attempt, WRITE_ATTEMPTS, _one_line(problem))
        raise BusError(errors.STORAGE_UNAVAILABLE, _one_line(problem))

    async def _rowcount(self, sql: str, params: Any) -> int:
        return (await self._execute(sql, params))[0][0]

    async def _store_sends(self, group: Group) -> None:
        async def under_the_clock(conn: psycopg.AsyncConnection) -> list[tuple]:
            # The clock row's lock first: while another replica's group holds it (to its
            # COMMIT), the sends that reach this replica join this group, so replicas
            # that take turns on the clock commit in larger groups.
            await conn.execute(SQL_TAKE_THE_CLOCK)
            self._take_latecomers(group)
            async with conn.pipeline():  # the group and its COMMIT: one round trip
                cursor = await conn.execute(SQL_SEND_MESSAGES, {
                    **_columns(group), "notify_channel": NOTIFY_CHANNEL,
                    "notice": self._wake_notice(group.sends)})
                await conn.execute(self.sql.commit)
            return await cursor.fetchall()

        try:
            rows = await self._attempt(under_the_clock)
        except BusError as exc:
            group.by_key.clear()
            for send in group.sends:
                answer(send, exc)
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
            answer(send, outcome)
        if committed and self.on_commit is not None:
            self.on_commit(committed)

    def _take_latecomers(self, group: Group) -> None:
        """Sends that joined the forming group while `group` waited for the clock ride
        along with it (after its own: arrival order). Their keys stay findable: a later
        send with one of them waits for `group`, as it would have for the forming one."""
        forming = self._forming
        if forming.sends:
            group.sends.extend(forming.sends)
            group.by_key.update(forming.by_key)
            forming.sends, forming.by_key = [], {}

    async def _find_duplicates(self, group: Group,
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
                rows = await self._execute(self.sql.find_by_key, (message.sender, message.key))
            except BusError as exc:
                log.warning("could not read back the first send of a repeated key: %s", exc)
                continue
            if rows:
                found[index] = self._message(rows[0])
        return found

    async def _store_receipts(self, group: Group) -> None:
        """Receipts and contacts: fire-and-forget, so a failure is only logged."""
        try:
            for sql, params in self._receipt_statements(group):
                await self._execute(sql, params)
        except BusError as exc:
            log.warning("receipts and contacts not stored this time: %s", exc.message)

    def _write(self, sql: str, params: tuple, changes_identity: bool = False) -> asyncio.Future:
        # A change to tokens, keys or flags also notifies the other replicas in the
        # same transaction, so they drop their cached answers.
        if changes_identity:
            sql = SQL_TELLING_IDENTITY.format(statement=sql)
            params = (*params, NOTIFY_CHANNEL, json.dumps({"replica": self.replica,
                                                           "identity": True}))
        return super()._write(sql, params, changes_identity)

    # -- reads -------------------------------------------------------------

    async def _rows(self, sql: str, params: Any = ()) -> list[tuple]:
        pool = self._pool
        if pool is None:
            raise BusError(errors.SHUTTING_DOWN)
        for attempt in (1, 2):
            try:
                async with pool.connection() as conn:
                    return await (await conn.execute(sql, params or None)).fetchall()
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
