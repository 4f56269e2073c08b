"""The embedded SQLite store: one writer thread that group-commits, reads beside it.

Durability: WAL with synchronous=FULL, so a send is acknowledged only after its
commit reached the disk. Concurrent writes queue up while a commit is being
synced and are committed together in the next transaction (group commit), so
durability does not cost throughput. WAL lets reads run beside the writer: short
indexed lookups on the event loop thread, and reads that walk many rows
(retention, pending counts, dead letters, the console's lists) on a thread of their
own, so parked long-polls are answered while they run.
"""
from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import queue
import sqlite3
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Iterator

from . import errors
from .errors import BusError
from .model import SendResult, StoredMessage, encode_meta
from .store import CommitClock, Received, StoreError
from .store_core import Group, Send, SQLStore, answer, refuse_newer, settle
from .store_sql import SCHEMA_VERSION, SQLITE, Queries

log = logging.getLogger("busd.store")

SQL_INSERT = ("INSERT INTO messages (id, ts, channel, from_name, to_name, body, meta, key, "
              "signature) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
# AUTOINCREMENT's counter remembers ids of deleted rows too: ids never repeat.
SQL_MAX_ID = ("SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0), "
              "COALESCE((SELECT MAX(id) FROM messages), 0))")
SQL_MAX_TS = "SELECT MAX(ts) FROM messages"
# The clock's high water, kept in `meta` under this key.
CLOCK_FLAG = "clock"

_STOP = object()


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK if anything in it raised."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _insert_params(send: Send) -> tuple:
    m = send.stored
    return (m.id, m.ts, m.channel, m.sender, m.to, m.body, encode_meta(m.meta), send.message.key,
            m.signature)


def _fetch(conn: sqlite3.Connection, sql: str, params: Any) -> list[tuple]:
    return conn.execute(sql, params).fetchall()


class SQLiteStore(SQLStore):
    """Group commit, pipelined: while one group is being synced to disk, the next forms.

    Everything but the commit itself happens on the event loop thread: ids and ts
    are given as a message joins a group, so they follow commit order, and the
    writer thread only runs plain statements and COMMIT. That keeps the two
    threads from contending for the GIL.
    """

    dialect = SQLITE
    sql = Queries(SQLITE)

    def __init__(self, path: str, exclusive: bool = True):
        super().__init__()
        self.path = path
        # A server takes the database for itself; admin commands (tokens, keys)
        # open it beside a running server.
        self.exclusive = exclusive
        self._clock = CommitClock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._reader: sqlite3.Connection | None = None
        self._scanner: sqlite3.Connection | None = None
        self._scans: ThreadPoolExecutor | None = None
        self._lock_file: int | None = None
        self._next_id = 1

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
            self._reader = self._connect(query_only=True)
            self._scanner = self._connect(query_only=True)
        except sqlite3.DatabaseError as exc:
            self._release(writer_conn)
            raise StoreError(
                f"{self.path} is not a usable agent-bus database ({exc}); it may be corrupt or "
                "truncated. Nothing was changed. Restore it from a backup, or move it away to "
                "start a fresh bus.") from None
        except BaseException:
            self._release(writer_conn)
            raise
        self._acknowledged = {}
        self._contacts = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._scans = ThreadPoolExecutor(1, thread_name_prefix="busd-sqlite-scan")
        self._writer = threading.Thread(target=self._write_loop, args=(writer_conn,),
                                        name="busd-sqlite-writer", daemon=True)
        self._writer.start()
        self._open = True

    def _create(self, folder: str) -> tuple[int, int]:
        """A new database appears whole or not at all: made aside, then renamed in.

        So a file at the path that is empty or half-written is never ours, and is
        refused instead of being silently taken for a fresh bus.
        """
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".bus-new-", suffix=".db")  # 0600
        os.close(fd)
        try:
            conn = self._connect(tmp)
            try:
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

    def _release(self, conn: sqlite3.Connection | None) -> None:
        """Close these connections and the readers, and give up the file lock."""
        for handle in (conn, self._reader, self._scanner):
            if handle is not None:
                handle.close()
        self._reader = self._scanner = None
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

    async def _disconnect(self) -> None:
        loop = asyncio.get_running_loop()
        if self._writer is not None:
            self._queue.put(_STOP)
            writer, self._writer = self._writer, None
            await loop.run_in_executor(None, writer.join)
        if self._scans is not None:
            scans, self._scans = self._scans, None
            await loop.run_in_executor(None, scans.shutdown)
        self._release(None)

    def _connect(self, path: str | None = None, query_only: bool = False) -> sqlite3.Connection:
        conn = sqlite3.connect(path or self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        if query_only:
            conn.execute("PRAGMA query_only = ON")
        return conn

    @classmethod
    def _migrate(cls, conn: sqlite3.Connection, upto: int = SCHEMA_VERSION) -> tuple[int, int]:
        """Apply the migrations the database lacks (up to version `upto`); returns its
        versions before and after."""
        conn.execute(cls.sql.create_version_table)
        row = conn.execute(cls.sql.get_version).fetchone()
        if row is None:
            conn.execute(cls.sql.init_version)
        version = row[0] if row else 0
        refuse_newer(version)
        for number in range(version + 1, upto + 1):
            with _transaction(conn):
                # Statement by statement: executescript() would commit half-way.
                for statement in cls.sql.migrations[number - 1].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(cls.sql.set_version, (number,))
        return version, max(version, upto)

    @classmethod
    def _load_clock(cls, conn: sqlite3.Connection) -> float:
        row = conn.execute(cls.sql.get_flag, (CLOCK_FLAG,)).fetchone()
        stored = float(row[0]) if row else 0.0
        newest = conn.execute(SQL_MAX_TS).fetchone()[0] or 0.0
        return max(stored, newest)

    # -- group commit ------------------------------------------------------

    def _admit(self, send: Send) -> StoredMessage | None:
        message = send.message
        if message.key is not None:
            row = self._reader.execute(self.sql.find_by_key,
                                       (message.sender, message.key)).fetchone()
            if row is not None:
                return self._message(row)
        # Stamped now, on the loop thread: ids and ts follow the order groups commit in.
        send.stored = StoredMessage(
            id=self._next_id, ts=self._clock.assign(), channel=message.channel,
            sender=message.sender, to=message.to, body=message.body, meta=message.meta,
            signature=message.signature)
        self._next_id += 1
        return None

    def _start_commit(self, group: Group) -> None:
        work = [(SQL_INSERT, _insert_params(send)) for send in group.sends]
        work += [(sql, params) for sql, params, _future, _changes_identity in group.statements]
        work += self._receipt_statements(group)
        if group.sends:
            work.append((self.sql.set_flag, (CLOCK_FLAG, repr(self._clock.high_water()))))
        self._queue.put((group, work))

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        while (job := self._queue.get()) is not _STOP:
            group, work = job
            outcome: list[int] | BusError
            try:
                with _transaction(conn):
                    outcome = [conn.execute(sql, params).rowcount for sql, params in work]
            except sqlite3.Error as exc:
                log.error("commit failed, nothing of this group was stored: %s", exc)
                outcome = BusError(errors.STORAGE_UNAVAILABLE, str(exc))
            except Exception as exc:  # a bug: fail the group loudly, keep the writer alive
                log.exception("unexpected error in the writer")
                outcome = BusError(errors.INTERNAL, type(exc).__name__)
            try:
                self._loop.call_soon_threadsafe(self._committed, group, outcome)
            except RuntimeError:
                break  # the loop is gone: nobody is waiting for an answer
        conn.close()

    def _committed(self, group: Group, outcome: list[int] | BusError) -> None:
        """On the loop thread: the writer is done with `group` (row counts, or an error)."""
        messages = [send.stored for send in group.sends]
        ok = not isinstance(outcome, BusError)
        if messages:
            self._clock.settled(len(messages), messages[-1].ts if ok else None)
        if not ok:
            self._fail(group, outcome)
        else:
            for send in group.sends:
                answer(send, SendResult(send.stored))
            counts = outcome[len(group.sends):]
            for (_sql, _params, future, _changes_identity), count in zip(group.statements,
                                                                        counts):
                settle(future, count)
            if messages and self.on_commit is not None:
                self.on_commit(messages)
        self._finished()

    # -- reads -------------------------------------------------------------

    async def _rows(self, sql: str, params: Any = ()) -> list[tuple]:
        return _fetch(self._reader, sql, params)

    async def _scan(self, sql: str, params: Any = ()) -> list[tuple]:
        # One scan at a time, on its own connection and thread: sqlite3 lets go of
        # the GIL while SQLite walks the rows, so the loop answers meanwhile.
        if self._scans is None:
            raise BusError(errors.SHUTTING_DOWN)
        return await self._loop.run_in_executor(self._scans, _fetch, self._scanner, sql, params)

    # -- the interface -----------------------------------------------------

    async def now(self) -> float:
        return self._clock.now()

    async def recv(self, to: str, channel: str, since: float, limit: int) -> Received:
        # Sampled before the read: a commit that lands in between is above it.
        now = self._clock.now()
        rows = await self._rows(self.sql.recv_all_channels if channel == "*" else self.sql.recv,
                                {"to": to, "channel": channel, "since": since, "limit": limit})
        return Received(list(map(self._message, rows)), now)
