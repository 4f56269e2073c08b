"""The embedded SQLite store: one writer thread that group-commits, reads on the loop.

Durability: WAL with synchronous=FULL, so a send is acknowledged only after its
commit reached the disk. Concurrent writes queue up while a commit is being
synced and are committed together in the next transaction (group commit), so
durability does not cost throughput. Reads use their own connection on the event
loop thread; WAL lets them run beside the writer, and they are short indexed
lookups.
"""
from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import queue
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from . import errors
from .errors import BusError
from .model import NewMessage, SendResult, StoredMessage, encode_meta
from .receipts import ReceiptRow, WatermarkRow
from .store import (CONTACT_EVERY, CommitClock, Received, Store, StoreError, TokenRecord,
                    undelivered_entry, with_pending_receipts)

log = logging.getLogger("busd.store")

# Numbered migrations: index + 1 is the schema version each one produces.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE messages (
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        ts        REAL    NOT NULL UNIQUE,
        channel   TEXT    NOT NULL,
        from_name TEXT    NOT NULL,
        to_name   TEXT    NOT NULL,
        body      TEXT    NOT NULL,
        meta      TEXT,
        key       TEXT,
        signature TEXT
    );
    CREATE UNIQUE INDEX messages_by_key ON messages (from_name, key) WHERE key IS NOT NULL;
    CREATE INDEX messages_by_recipient ON messages (to_name, channel, ts);
    CREATE INDEX messages_by_channel ON messages (channel, id);
    CREATE TABLE watermarks (
        agent   TEXT    NOT NULL,
        channel TEXT    NOT NULL,
        last_id INTEGER NOT NULL,
        PRIMARY KEY (agent, channel)
    ) WITHOUT ROWID;
    CREATE TABLE acknowledged (
        agent   TEXT NOT NULL,
        channel TEXT NOT NULL,
        ts      REAL NOT NULL,
        PRIMARY KEY (agent, channel)
    ) WITHOUT ROWID;
    CREATE TABLE agents (
        name          TEXT PRIMARY KEY,
        identity      TEXT NOT NULL DEFAULT '',
        public_key    TEXT NOT NULL,
        role          TEXT NOT NULL DEFAULT 'agent',
        registered_by TEXT,
        created_at    REAL NOT NULL
    );
    """,
    # 2: per-agent bearer tokens; only a hash of each token is kept.
    """
    CREATE TABLE tokens (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        hash       TEXT    NOT NULL UNIQUE,
        agent      TEXT    NOT NULL,
        channels   TEXT,
        admin      INTEGER NOT NULL DEFAULT 0,
        created_at REAL    NOT NULL,
        revoked_at REAL
    );
    CREATE INDEX tokens_by_agent ON tokens (agent);
    """,
    # 3: delivery receipts (what each reader fetched and filed) and last contact.
    """
    ALTER TABLE acknowledged ADD COLUMN delivered_ts REAL NOT NULL DEFAULT 0;
    ALTER TABLE acknowledged ADD COLUMN filed_ts REAL NOT NULL DEFAULT 0;
    UPDATE acknowledged SET delivered_ts = ts;
    CREATE TABLE presence (
        agent     TEXT PRIMARY KEY,
        last_seen REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    # 4: what recipients' daemons found when they checked a handoff on arrival.
    """
    CREATE TABLE handoff_checks (
        message_id INTEGER NOT NULL,
        agent      TEXT    NOT NULL,
        result     TEXT    NOT NULL,
        checked_at REAL    NOT NULL,
        PRIMARY KEY (message_id, agent)
    ) WITHOUT ROWID;
    """,
    # 5: `signed` means verified. Until now an unverifiable signature (a sender with no
    # registered key, on a bus without an operator) was kept and shown as signed: keep a
    # stored signature only where its sender had a registered key when it was sent, the
    # only case in which the bus verified it. And each agent's registration remembers
    # when its operator signed it, so a replayed or older registration is refused.
    """
    ALTER TABLE agents ADD COLUMN registration_signed_at INTEGER;
    UPDATE messages SET signature = NULL
        WHERE signature IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM agents WHERE agents.name = messages.from_name
                                   AND agents.created_at <= messages.ts);
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)

SQL_CREATE_VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
SQL_GET_VERSION = "SELECT version FROM schema_version"
SQL_SET_VERSION = "UPDATE schema_version SET version = ?"
SQL_INIT_VERSION = "INSERT INTO schema_version (version) VALUES (0)"

SQL_GET_CLOCK = "SELECT value FROM meta WHERE key = 'clock'"
SQL_SET_CLOCK = ("INSERT INTO meta (key, value) VALUES ('clock', ?) "
                 "ON CONFLICT (key) DO UPDATE SET value = excluded.value")
SQL_MAX_TS = "SELECT MAX(ts) FROM messages"

_COLUMNS = "id, ts, channel, from_name, to_name, body, meta, signature"
SQL_FIND_BY_KEY = f"SELECT {_COLUMNS} FROM messages WHERE from_name = ? AND key = ?"
SQL_INSERT = ("INSERT INTO messages (id, ts, channel, from_name, to_name, body, meta, key, "
              "signature) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
# AUTOINCREMENT's counter remembers ids of deleted rows too: ids never repeat.
SQL_MAX_ID = ("SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0), "
              "COALESCE((SELECT MAX(id) FROM messages), 0))")

# A recipient gets what is addressed to it and what others broadcast on the channel.
SQL_RECV = (f"SELECT {_COLUMNS} FROM messages "
            "WHERE to_name IN (?, '*') AND channel = ? AND ts > ? "
            "AND NOT (to_name = '*' AND from_name = ?) ORDER BY ts LIMIT ?")
SQL_RECV_ALL_CHANNELS = (f"SELECT {_COLUMNS} FROM messages "
                         "WHERE to_name IN (?, '*') AND ts > ? "
                         "AND NOT (to_name = '*' AND from_name = ?) ORDER BY ts LIMIT ?")

# el-ipc readers see the whole channel's broadcasts (their own included, as the
# older server did) and what is addressed to them.
SQL_GET_WATERMARK = "SELECT last_id FROM watermarks WHERE agent = ? AND channel = ?"
SQL_SET_WATERMARK = ("INSERT INTO watermarks (agent, channel, last_id) VALUES (?, ?, ?) "
                     "ON CONFLICT (agent, channel) DO UPDATE SET last_id = "
                     "MAX(last_id, excluded.last_id)")
SQL_UNREAD = (f"SELECT {_COLUMNS} FROM messages "
              "WHERE channel = ? AND id > ? AND to_name IN (?, '*') ORDER BY id LIMIT ?")
SQL_COUNT_UNREAD = ("SELECT COUNT(*) FROM messages "
                    "WHERE channel = ? AND id > ? AND to_name IN (?, '*')")

SQL_ACKNOWLEDGE = (
    "INSERT INTO acknowledged (agent, channel, ts, delivered_ts, filed_ts) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (agent, channel) DO UPDATE SET ts = MAX(ts, excluded.ts), "
    "delivered_ts = MAX(delivered_ts, excluded.delivered_ts), "
    "filed_ts = MAX(filed_ts, excluded.filed_ts)")
# Not yet fetched by its recipient (on that channel, or by an all-channels reader).
_NOT_FETCHED = (
    "m.to_name <> '*' AND m.ts > MAX("
    "COALESCE((SELECT delivered_ts FROM acknowledged WHERE agent = m.to_name "
    "AND channel = m.channel), 0), "
    "COALESCE((SELECT delivered_ts FROM acknowledged WHERE agent = m.to_name "
    "AND channel = '*'), 0))")
SQL_PENDING = (f"SELECT m.channel, m.to_name, COUNT(*) FROM messages m WHERE {_NOT_FETCHED} "
               "GROUP BY m.channel, m.to_name")
SQL_NOTE_CONTACT = ("INSERT INTO presence (agent, last_seen) VALUES (?, ?) "
                    "ON CONFLICT (agent) DO UPDATE SET last_seen = "
                    "MAX(last_seen, excluded.last_seen)")
SQL_LAST_CONTACTS = "SELECT agent, last_seen FROM presence"
SQL_RECEIPTS = ("SELECT agent, channel, delivered_ts, filed_ts FROM acknowledged "
                "WHERE channel IN ({marks})")
SQL_WATERMARKS = "SELECT agent, channel, last_id FROM watermarks WHERE channel IN ({marks})"
SQL_MESSAGES_BY_ID = f"SELECT {_COLUMNS} FROM messages WHERE id IN ({{marks}}) ORDER BY id"
SQL_UNDELIVERED = (
    f"SELECT m.id, m.ts, m.from_name, m.to_name, m.channel, "
    "(m.to_name NOT IN (SELECT agent FROM presence) "
    " AND m.to_name NOT IN (SELECT name FROM agents)) AS never_seen "
    f"FROM messages m WHERE {_NOT_FETCHED} AND (m.ts < ? OR ("
    "m.to_name NOT IN (SELECT agent FROM presence) "
    "AND m.to_name NOT IN (SELECT name FROM agents))) "
    "ORDER BY m.id LIMIT ?")

SQL_TOKEN_BY_HASH = ("SELECT id, agent, channels, admin FROM tokens "
                     "WHERE hash = ? AND revoked_at IS NULL")
SQL_ANY_TOKEN = "SELECT EXISTS (SELECT 1 FROM tokens WHERE revoked_at IS NULL)"
SQL_CREATE_TOKEN = ("INSERT INTO tokens (hash, agent, channels, admin, created_at) "
                    "VALUES (?, ?, ?, ?, ?)")
SQL_REVOKE_AGENT_TOKENS = ("UPDATE tokens SET revoked_at = ? "
                           "WHERE agent = ? AND revoked_at IS NULL")
SQL_REVOKE_TOKEN = "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL"
SQL_COUNT_AGENT_TOKENS = "SELECT COUNT(*) FROM tokens WHERE agent = ? AND revoked_at IS NULL"
SQL_COUNT_TOKEN = "SELECT COUNT(*) FROM tokens WHERE id = ? AND revoked_at IS NULL"
SQL_LIST_TOKENS = ("SELECT id, agent, channels, admin, created_at, revoked_at FROM tokens "
                   "ORDER BY id")
SQL_PUBLIC_KEY = "SELECT public_key, role FROM agents WHERE name = ?"
SQL_FIRST_OPERATOR = ("SELECT public_key FROM agents WHERE role = 'operator' "
                      "ORDER BY created_at, name LIMIT 1")
SQL_REGISTER = ("INSERT INTO agents (name, identity, public_key, role, registered_by, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                "identity = excluded.identity, public_key = excluded.public_key, "
                "role = excluded.role, registered_by = excluded.registered_by")
# A registration takes effect only over an older one (or none), never over an operator.
SQL_REGISTER_SIGNED = (
    "INSERT INTO agents (name, identity, public_key, role, registered_by, created_at, "
    "registration_signed_at) VALUES (?, ?, ?, 'agent', ?, ?, ?) "
    "ON CONFLICT (name) DO UPDATE SET identity = excluded.identity, "
    "public_key = excluded.public_key, role = excluded.role, "
    "registered_by = excluded.registered_by, "
    "registration_signed_at = excluded.registration_signed_at "
    "WHERE agents.role = 'agent' AND (agents.registration_signed_at IS NULL "
    "OR agents.registration_signed_at < excluded.registration_signed_at)")
SQL_REGISTRATION = "SELECT public_key, registration_signed_at, role FROM agents WHERE name = ?"
SQL_GET_FLAG = "SELECT value FROM meta WHERE key = ?"
SQL_SET_FLAG = ("INSERT INTO meta (key, value) VALUES (?, ?) "
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
WHERE (r.ts < :cutoff OR r.newer > :cap)
  AND CASE WHEN r.to_name <> '*' THEN
        r.ts <= MAX(
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
LIMIT 5000
"""
SQL_DELETE_MESSAGE = "DELETE FROM messages WHERE id = ?"
SQL_DELETE_HANDOFF_CHECKS = "DELETE FROM handoff_checks WHERE message_id = ?"

# The operator console's feed: every recipient's messages, newest first (the caller
# turns them round), optionally one channel's, or those from or to one agent.
SQL_RECENT = (f"SELECT {_COLUMNS} FROM messages WHERE id > :after "
              "AND (:channel IS NULL OR channel = :channel) "
              "AND (:agent IS NULL OR from_name = :agent OR to_name = :agent) "
              "ORDER BY id DESC LIMIT :limit")
SQL_RECORD_HANDOFF_CHECK = (
    "INSERT INTO handoff_checks (message_id, agent, result, checked_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (message_id, agent) DO UPDATE SET result = excluded.result, "
    "checked_at = excluded.checked_at")
SQL_HANDOFF_CHECKS = ("SELECT message_id, agent, result FROM handoff_checks "
                      "WHERE message_id IN ({marks})")

SQL_CHANNELS = ("SELECT channel, COUNT(*), MAX(ts) FROM messages "
                "GROUP BY channel ORDER BY MAX(ts) DESC")
SQL_AGENTS = ("SELECT name, identity, role, registered_by, created_at FROM agents "
              "ORDER BY created_at")

def _row_to_message(row: tuple) -> StoredMessage:
    return StoredMessage(id=row[0], ts=row[1], channel=row[2], sender=row[3], to=row[4],
                         body=row[5], meta=json.loads(row[6]) if row[6] else None,
                         signature=row[7])


@dataclass
class _Group:
    """Writes that commit together: plain statements, and what to answer once they did."""
    statements: list[tuple[str, tuple]] = field(default_factory=list)
    answers: list[tuple[asyncio.Future, Any]] = field(default_factory=list)
    messages: list[StoredMessage] = field(default_factory=list)
    by_key: dict[tuple[str, str], StoredMessage] = field(default_factory=dict)
    error: BusError | None = None


_STOP = object()


class SQLiteStore(Store):
    """Group commit, pipelined: while one group is being synced to disk, the next forms.

    Everything but the commit itself happens on the event loop thread: ids and ts
    are given as a message joins a group, so they follow commit order, and the
    writer thread only runs plain statements and COMMIT. That keeps the two
    threads from contending for the GIL.
    """

    def __init__(self, path: str, exclusive: bool = True):
        self.path = path
        # A server takes the database for itself; admin commands (tokens, keys)
        # open it beside a running server.
        self.exclusive = exclusive
        self._clock = CommitClock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._reader: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock_file: int | None = None
        self._acknowledged: dict[tuple[str, str], tuple[float, float, float]] = {}
        self._contacts: dict[str, float] = {}
        self._forming = _Group()
        self._in_flight: _Group | None = None
        self._kick_scheduled = False
        self._next_id = 1
        self._idle = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, mode=0o700, exist_ok=True)
        self._lock_file = self._take_lock() if self.exclusive else None
        writer_conn = None
        try:
            created = None
            if not os.path.exists(self.path):
                created = self._create(folder)
            elif os.path.getsize(self.path) == 0:
                # Checked before connecting: setting WAL mode would write a header into it.
                raise sqlite3.DatabaseError("the file is empty")
            writer_conn = self._connect()
            self._check_usable(writer_conn)
            self.migrated = created or self._migrate(writer_conn)
            self._clock = CommitClock(self._load_clock(writer_conn))
            self._next_id = (writer_conn.execute(SQL_MAX_ID).fetchone()[0] or 0) + 1
            self._reader = self._connect()
            self._reader.execute("PRAGMA query_only = ON")
        except sqlite3.DatabaseError as exc:
            self._abandon_open(writer_conn)
            raise StoreError(
                f"{self.path} is not a usable agent-bus database ({exc}); it may be corrupt or "
                "truncated. Nothing was changed. Restore it from a backup, or move it away to "
                "start a fresh bus.") from None
        except BaseException:
            self._abandon_open(writer_conn)
            raise
        self._acknowledged = {}
        self._contacts = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._writer = threading.Thread(target=self._write_loop, args=(writer_conn,),
                                        name="busd-sqlite-writer", daemon=True)
        self._writer.start()

    def _create(self, folder: str) -> tuple[int, int]:
        """A new database appears whole or not at all: made aside, then renamed in.

        So a file at the path that is empty or half-written is never ours, and is
        refused instead of being silently taken for a fresh bus.
        """
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".bus-new-", suffix=".db")  # 0600
        os.close(fd)
        try:
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                migrated = self._migrate(conn)
            finally:
                conn.close()
            os.replace(tmp, self.path)
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        finally:
            for leftover in (tmp, tmp + "-wal", tmp + "-shm"):
                if os.path.exists(leftover):
                    os.unlink(leftover)
        return migrated

    def _check_usable(self, conn: sqlite3.Connection) -> None:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "schema_version" not in tables:
            raise sqlite3.DatabaseError("it has no agent-bus schema")
        problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError("; ".join(problems))

    def _abandon_open(self, conn: sqlite3.Connection | None) -> None:
        for handle in (conn, self._reader):
            if handle is not None:
                handle.close()
        self._reader = None
        self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None

    def _take_lock(self) -> int:
        # One server per database file: two would each keep their own clock and
        # could hand out the same ts. The lock dies with the process (even kill -9).
        fd = os.open(self.path + ".lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(f"{self.path} is in use by another agent-bus server; stop it "
                             "first, or give this one its own --db") from None
        return fd

    async def close(self) -> None:
        if self._writer is not None:
            await self._idle.wait()
            self._queue.put(_STOP)
            writer, self._writer = self._writer, None
            await asyncio.get_running_loop().run_in_executor(None, writer.join)
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self._release_lock()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> tuple[int, int]:
        """Apply the migrations the database lacks; returns its versions before and after."""
        conn.execute(SQL_CREATE_VERSION_TABLE)
        row = conn.execute(SQL_GET_VERSION).fetchone()
        if row is None:
            conn.execute(SQL_INIT_VERSION)
            version = 0
        else:
            version = row[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"the database schema (version {version}) is newer than this "
                             f"agent-bus understands ({SCHEMA_VERSION}); upgrade agent-bus")
        for number in range(version + 1, SCHEMA_VERSION + 1):
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Statement by statement: executescript() would commit half-way.
                for statement in MIGRATIONS[number - 1].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(SQL_SET_VERSION, (number,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return version, SCHEMA_VERSION

    @staticmethod
    def _load_clock(conn: sqlite3.Connection) -> float:
        row = conn.execute(SQL_GET_CLOCK).fetchone()
        stored = float(row[0]) if row else 0.0
        newest = conn.execute(SQL_MAX_TS).fetchone()[0] or 0.0
        return max(stored, newest)

    # -- group commit ------------------------------------------------------

    def _join(self, sql: str, params: tuple, answer: Any = None,
              future: asyncio.Future | None = None) -> _Group:
        """Add a statement to the forming group; commit it as soon as the writer is free."""
        if self._writer is None:
            raise BusError(errors.SHUTTING_DOWN)
        group = self._forming
        group.statements.append((sql, params))
        if future is not None:
            group.answers.append((future, answer))
        self._idle.clear()
        if not self._kick_scheduled and self._in_flight is None:
            # Let the rest of this loop iteration's requests join the same group.
            self._kick_scheduled = True
            self._loop.call_soon(self._kick)
        return group

    def _kick(self) -> None:
        self._kick_scheduled = False
        if self._in_flight is not None:
            return
        group = self._forming
        if not group.statements and not group.answers:
            self._idle.set()
            return
        self._forming = _Group()
        self._in_flight = group
        if group.messages:
            group.statements.append((SQL_SET_CLOCK, (repr(self._clock.high_water()),)))
        self._queue.put(group)

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        while True:
            group = self._queue.get()
            if group is _STOP:
                break
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for sql, params in group.statements:
                        conn.execute(sql, params)
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                log.error("commit failed, nothing of this group was stored: %s", exc)
                group.error = BusError(errors.STORAGE_UNAVAILABLE, str(exc))
            except Exception as exc:  # a bug: fail the group loudly, keep the writer alive
                log.exception("unexpected error in the writer")
                group.error = BusError(errors.INTERNAL, type(exc).__name__)
            try:
                self._loop.call_soon_threadsafe(self._committed, group)
            except RuntimeError:
                break  # the loop is gone: nobody is waiting for an answer
        conn.close()

    def _committed(self, group: _Group) -> None:
        self._in_flight = None
        ok = group.error is None
        if group.messages:
            self._clock.settled(len(group.messages), group.messages[-1].ts if ok else None)
        for future, answer in group.answers:
            if future.done():
                continue
            if ok:
                future.set_result(answer)
            else:
                future.set_exception(group.error)
        if ok and group.messages and self.on_commit is not None:
            self.on_commit(group.messages)
        self._kick()

    def _find_pending_key(self, sender: str, key: str) -> tuple[_Group, StoredMessage] | None:
        for group in (self._in_flight, self._forming):
            if group is not None and (sender, key) in group.by_key:
                return group, group.by_key[(sender, key)]
        return None

    # -- the interface -----------------------------------------------------

    async def now(self) -> float:
        return self._clock.now()

    async def append(self, message: NewMessage) -> SendResult:
        future = self._loop.create_future()
        if message.key is not None:
            pending = self._find_pending_key(message.sender, message.key)
            if pending is not None:
                # The first send with this key is not committed yet: answer with it
                # when (and only if) its group commits.
                group, first = pending
                group.answers.append((future, SendResult(first, duplicate=True)))
                return await future
            row = self._reader.execute(SQL_FIND_BY_KEY, (message.sender, message.key)).fetchone()
            if row is not None:
                return SendResult(_row_to_message(row), duplicate=True)
        stored = StoredMessage(id=self._next_id, ts=self._clock.assign(), channel=message.channel,
                               sender=message.sender, to=message.to, body=message.body,
                               meta=message.meta, signature=message.signature)
        self._next_id += 1
        group = self._join(SQL_INSERT, (
            stored.id, stored.ts, stored.channel, stored.sender, stored.to, stored.body,
            encode_meta(stored.meta), message.key, stored.signature),
            SendResult(stored), future)
        group.messages.append(stored)
        if message.key is not None:
            group.by_key[(message.sender, message.key)] = stored
        return await future

    async def recv(self, to: str, channel: str, since: float, limit: int) -> Received:
        # Sampled before the read: a commit that lands in between is above it.
        now = self._clock.now()
        if channel == "*":
            rows = self._reader.execute(SQL_RECV_ALL_CHANNELS, (to, since, to, limit))
        else:
            rows = self._reader.execute(SQL_RECV, (to, channel, since, to, limit))
        return Received([_row_to_message(row) for row in rows.fetchall()], now)

    def acknowledge(self, agent: str, channel: str, since: float, delivered: float = 0.0,
                    filed: bool = False) -> None:
        key = (agent, channel)
        receipt = (since, max(since, delivered), since if filed else 0.0)
        known = self._acknowledged.get(key)
        if self._writer is None:
            return
        # A first poll is written even at since 0: it makes the agent a known reader.
        if known is not None and all(n <= o for n, o in zip(receipt, known)):
            return
        self._acknowledged[key] = tuple(max(n, o) for n, o in zip(receipt, known or receipt))
        # Fire-and-forget: receipts ride along with the next group commit.
        self._join(SQL_ACKNOWLEDGE, (agent, channel, *receipt))

    def note_contact(self, agent: str) -> None:
        now = time.time()
        if now - self._contacts.get(agent, 0.0) < CONTACT_EVERY or self._writer is None:
            return
        self._contacts[agent] = now
        self._join(SQL_NOTE_CONTACT, (agent, now))

    async def last_contacts(self) -> dict[str, float]:
        stored = dict(self._reader.execute(SQL_LAST_CONTACTS).fetchall())
        # What is still on its way to the disk counts too.
        return {**stored, **{a: t for a, t in self._contacts.items() if t > stored.get(a, 0)}}

    async def messages_by_id(self, ids: list[int]) -> list[StoredMessage]:
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        return [_row_to_message(r) for r in
                self._reader.execute(SQL_MESSAGES_BY_ID.format(marks=marks), ids).fetchall()]

    async def receipts(self, channels: set[str]) -> tuple[list[ReceiptRow], list[WatermarkRow]]:
        wanted = sorted(channels | {"*"})
        marks = ",".join("?" * len(wanted))
        rows = [ReceiptRow(*r) for r in
                self._reader.execute(SQL_RECEIPTS.format(marks=marks), wanted).fetchall()]
        watermarks = [WatermarkRow(*r) for r in
                      self._reader.execute(SQL_WATERMARKS.format(marks=marks), wanted).fetchall()]
        return with_pending_receipts(rows, self._acknowledged, set(wanted)), watermarks

    async def undelivered(self, queued_before: float, limit: int = 1000) -> list[dict]:
        rows = self._reader.execute(SQL_UNDELIVERED, (queued_before, limit)).fetchall()
        return [undelivered_entry(*row) for row in rows]

    async def recent_messages(self, after: int | None, limit: int, channel: str | None = None,
                              agent: str | None = None) -> list[StoredMessage]:
        rows = self._reader.execute(SQL_RECENT, {"after": after or 0, "limit": limit,
                                                 "channel": channel, "agent": agent}).fetchall()
        return [_row_to_message(row) for row in reversed(rows)]

    async def record_handoff_check(self, message_id: int, agent: str, result: str) -> None:
        await self._write(SQL_RECORD_HANDOFF_CHECK, (message_id, agent, result, time.time()))

    async def handoff_checks(self, ids: list[int]) -> dict[int, dict[str, str]]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        out: dict[int, dict[str, str]] = {}
        for message_id, agent, result in self._reader.execute(
                SQL_HANDOFF_CHECKS.format(marks=marks), ids).fetchall():
            out.setdefault(message_id, {})[agent] = result
        return out

    async def read_unread(self, agent: str, channel: str, limit: int) -> list[StoredMessage]:
        row = self._reader.execute(SQL_GET_WATERMARK, (agent, channel)).fetchone()
        last_id = row[0] if row else 0
        rows = self._reader.execute(SQL_UNREAD, (channel, last_id, agent, limit)).fetchall()
        if not rows:
            return []
        future = self._loop.create_future()
        self._join(SQL_SET_WATERMARK, (agent, channel, rows[-1][0]), None, future)
        await future
        return [_row_to_message(r) for r in rows]

    async def count_unread(self, agent: str, channel: str) -> int:
        row = self._reader.execute(SQL_GET_WATERMARK, (agent, channel)).fetchone()
        last_id = row[0] if row else 0
        return self._reader.execute(SQL_COUNT_UNREAD, (channel, last_id, agent)).fetchone()[0]

    async def channels(self) -> list[dict]:
        return [{"channel": c, "count": n, "last_message": last}
                for c, n, last in self._reader.execute(SQL_CHANNELS).fetchall()]

    async def registered_agents(self) -> list[dict]:
        return [{"name": r[0], "identity": r[1], "role": r[2], "registered_by": r[3],
                 "created_at": r[4]} for r in self._reader.execute(SQL_AGENTS).fetchall()]

    async def pending_counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for channel, recipient, count in self._reader.execute(SQL_PENDING).fetchall():
            out.setdefault(channel, {})[recipient] = count
        return out

    async def enforce_retention(self, max_age: float | None, per_queue: int | None) -> int:
        cutoff = time.time() - max_age if max_age else float("-inf")
        cap = per_queue if per_queue else 2 ** 62
        ids = [row[0] for row in self._reader.execute(
            SQL_RETENTION_CANDIDATES, {"cutoff": cutoff, "cap": cap}).fetchall()]
        if ids:
            future = self._loop.create_future()
            for message_id in ids:  # all in one group: one commit
                self._join(SQL_DELETE_MESSAGE, (message_id,))
                self._join(SQL_DELETE_HANDOFF_CHECKS, (message_id,), None,
                           future if message_id == ids[-1] else None)
            await future
        return len(ids)

    # -- identity: tokens and keys ----------------------------------------

    async def _write(self, sql: str, params: tuple) -> None:
        future = self._loop.create_future()
        self._join(sql, params, None, future)
        await future

    async def auth_enabled(self) -> bool:
        return bool(self._reader.execute(SQL_ANY_TOKEN).fetchone()[0])

    async def token_by_hash(self, token_hash: str) -> TokenRecord | None:
        row = self._reader.execute(SQL_TOKEN_BY_HASH, (token_hash,)).fetchone()
        if row is None:
            return None
        channels = tuple(json.loads(row[2])) if row[2] else None
        return TokenRecord(id=row[0], agent=row[1], channels=channels, admin=bool(row[3]))

    async def create_token(self, token_hash: str, agent: str, channels: tuple[str, ...] | None,
                           admin: bool) -> None:
        await self._write(SQL_CREATE_TOKEN, (
            token_hash, agent, json.dumps(list(channels)) if channels else None,
            int(admin), time.time()))

    async def revoke_tokens(self, agent: str | None = None, token_id: int | None = None) -> int:
        if token_id is not None:
            count_sql, update_sql, target = SQL_COUNT_TOKEN, SQL_REVOKE_TOKEN, token_id
        else:
            count_sql, update_sql, target = SQL_COUNT_AGENT_TOKENS, SQL_REVOKE_AGENT_TOKENS, agent
        count = self._reader.execute(count_sql, (target,)).fetchone()[0]
        if count:
            await self._write(update_sql, (time.time(), target))
        return count

    async def list_tokens(self) -> list[dict]:
        return [{"id": r[0], "agent": r[1], "channels": json.loads(r[2]) if r[2] else None,
                 "admin": bool(r[3]), "created_at": r[4], "revoked_at": r[5]}
                for r in self._reader.execute(SQL_LIST_TOKENS).fetchall()]

    async def public_key(self, name: str) -> tuple[str, str] | None:
        row = self._reader.execute(SQL_PUBLIC_KEY, (name,)).fetchone()
        return (row[0], row[1]) if row else None

    async def first_operator_key(self) -> str | None:
        row = self._reader.execute(SQL_FIRST_OPERATOR).fetchone()
        return row[0] if row else None

    async def register_agent(self, name: str, identity: str, public_key: str, role: str,
                             registered_by: str | None) -> None:
        await self._write(SQL_REGISTER, (name, identity, public_key, role, registered_by,
                                         time.time()))

    async def register_agent_signed(self, name: str, identity: str, public_key: str,
                                    registered_by: str, signed_at_ms: int) -> bool:
        # The writer gives no row counts: look before (a replay of the current
        # registration) and after (a newer one that committed first). Two identical
        # requests at once both pass, and did the same.
        row = self._reader.execute(SQL_REGISTRATION, (name,)).fetchone()
        if row is not None and (row[2] != "agent" or (row[1] or 0) >= signed_at_ms):
            return False
        await self._write(SQL_REGISTER_SIGNED, (name, identity, public_key, registered_by,
                                                time.time(), signed_at_ms))
        row = self._reader.execute(SQL_REGISTRATION, (name,)).fetchone()
        return row is not None and row[0] == public_key and row[1] == signed_at_ms

    async def get_flag(self, name: str) -> str | None:
        row = self._reader.execute(SQL_GET_FLAG, (name,)).fetchone()
        return row[0] if row else None

    async def set_flag(self, name: str, value: str) -> None:
        await self._write(SQL_SET_FLAG, (name, value))
