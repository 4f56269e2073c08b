"""The embedded SQLite store: one writer thread that group-commits, reads beside it.

Durability: WAL with synchronous=FULL, so a send is acknowledged only after its
commit reached the disk. Concurrent writes queue up while a commit is being
synced and are committed together in the next transaction (group commit), so
durability does not cost throughput. WAL lets reads run beside the writer: short
indexed lookups on the event loop thread, and reads that walk many rows
(retention, pending counts, dead letters, the console's lists) on a thread of their
own, so parked long-polls are answered while they run.

Other processes. A server takes the file for itself (one server per database file),
and other processes may still write into it (`agent-bus send --db`): they open an
ordinary store with exclusive=False and write through this same writer. So ids and
ts follow one rule whoever writes (store.CommitClock): every transaction begins with
BEGIN IMMEDIATE, which holds SQLite's one write lock to its end, and asks
`PRAGMA data_version`, which changes only when another connection has committed
since this one last asked. If one has, the floor (the largest id ever given, the
clock row) is read again, and a group stamped at or below it is stamped anew. The
clock row moves to each group's last stamp in its transaction, and `now` is that
row, read in the same statement as the messages.

Hearing them. A serving store watches the WAL file with inotify while its writer is
idle: another process's commit writes to it, and the event queues a look. The event
can come before that commit is visible (frames are written before they are synced
and published), so it is a cue, not news: the look's BEGIN IMMEDIATE waits for the
commit to finish, and its data_version check tells whether another process
committed. The writer turns the watch off in its first transaction (its own writes
are no news) and leaves it off while jobs keep coming: each of their transactions
checks data_version anyway. Idle for LOOK_AFTER, it turns the watch on and looks once
more, which covers the time it was off. Other processes' new messages wake the
long-polls parked on them, as a replica's do on PostgreSQL. What they heard also drops
the cached answers about tokens, keys and flags (store_core), and so does the WAL watch's
cue itself, so a token or operator another process adds counts from the next request.
"""
from __future__ import annotations

import asyncio
import ctypes
import fcntl
import logging
import os
import queue
import sqlite3
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

from . import errors
from .errors import BusError
from .model import SendResult, StoredMessage, encode_meta
from .store import NO_STAMP, CommitClock, CommitNotice, Stamp, StoreError, restamp
from .store_core import Group, Send, SQLStore, answer, refuse_newer, settle
from .store_sql import SCHEMA_VERSION, SQLITE, Queries

log = logging.getLogger("busd.store")

# A (from, key) another process stored first is skipped (row count 0), not an error.
SQL_INSERT = ("INSERT INTO messages (id, ts, channel, from_name, to_name, body, meta, key, "
              "signature) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
              "ON CONFLICT (from_name, key) WHERE key IS NOT NULL DO NOTHING")
# AUTOINCREMENT's counter remembers ids of deleted rows too: ids never repeat.
SQL_MAX_ID = ("SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0), "
              "COALESCE((SELECT MAX(id) FROM messages), 0))")
SQL_MAX_TS = "SELECT MAX(ts) FROM messages"
# The clock row: `meta`'s value under this key (store_sql.SQLiteDialect.clock_now).
CLOCK_FLAG = "clock"
# Changes when another connection has committed since this one last asked.
SQL_DATA_VERSION = "PRAGMA data_version"
# Whom other processes' new messages concern; more pairs than this: wake every poll.
SQL_NEW_RECIPIENTS = "SELECT DISTINCT channel, to_name FROM messages WHERE id > ? LIMIT ?"
NOTICE_LIMIT = 1000
# How long the writer, idle after a transaction of its own, waits for its next job
# before it turns the WAL watch on again and looks for other processes' commits
# (seconds): the longest another process's commit waits to be heard while this server
# writes. Under steady traffic (a job at least this often) the watch stays off and
# each transaction looks, at no extra cost.
LOOK_AFTER = 0.02

_STOP = object()
# A writer job: a transaction that only looks for other processes' commits.
_LOOK = object()


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK if anything in it raised."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute(SQLiteStore.sql.roll_back)
        raise
    conn.execute(SQLiteStore.sql.commit)


def _insert_params(send: Send) -> tuple:
    m = send.stored
    return (m.id, m.ts, m.channel, m.sender, m.to, m.body, encode_meta(m.meta), send.message.key,
            m.signature)


def _fetch(conn: sqlite3.Connection, sql: str, params: Any) -> list[tuple]:
    return conn.execute(sql, params).fetchall()


@dataclass
class Written:
    """What a transaction did: the row counts of its other statements, the sends that
    another process stored first under their (from, key) (index -> that message), and
    its last stamp (None: it stored no message)."""
    counts: list[int]
    duplicates: dict[int, StoredMessage]
    top: Stamp | None


@dataclass
class Heard:
    """What a transaction found other processes had committed since the writer last
    looked: the floor now, and whom their messages concern (None: too many to name)."""
    floor: Stamp
    recipients: list[CommitNotice] | None


class WalWatch:
    """Calls `on_write` on the event loop when the file is written while the watch is on
    (inotify IN_MODIFY): a cue to look, no more. Linux's inotify through ctypes: a file
    descriptor the loop polls with everything else, so no thread of its own. `on` and
    `off` may be called from any thread; off, the kernel makes no event for a write."""

    IN_MODIFY = 0x2
    # Off: only the file's deletion would be reported, which the server's writes never do.
    IN_DELETE_SELF = 0x400

    def __init__(self, path: str, loop: asyncio.AbstractEventLoop, on_write: Callable[[], None]):
        # PyDLL: the calls keep the GIL. They take a microsecond; letting go of the GIL
        # for each would hand it to the event loop and make the writer wait to get it back.
        libc = ctypes.PyDLL(None, use_errno=True)
        try:
            init, self._add_watch = libc.inotify_init1, libc.inotify_add_watch
        except AttributeError:
            raise OSError("inotify is not available on this system") from None
        self._add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
        fd = init(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        self._fd: int | None = fd
        self._path = os.fsencode(path)
        self._failed = False
        if not self._set(self.IN_MODIFY):
            error = ctypes.get_errno()
            os.close(fd)
            raise OSError(error, os.strerror(error), path)
        self._loop = loop
        self._on_write = on_write
        loop.add_reader(fd, self._written)

    def _set(self, mask: int) -> bool:
        # The same path again changes the one watch's mask; events already made stay.
        return self._add_watch(self._fd, self._path, mask) >= 0

    def on(self) -> None:
        if not self._set(self.IN_MODIFY) and not self._failed:
            self._failed = True
            log.warning("cannot watch %s again (%s): messages other processes write into "
                        "the database wake parked long-polls only when this server next "
                        "writes", os.fsdecode(self._path), os.strerror(ctypes.get_errno()))

    @property
    def working(self) -> bool:
        """False once the watch could not be turned on again: an idle writer would then
        not hear other processes' commits."""
        return not self._failed

    def off(self) -> None:
        self._set(self.IN_DELETE_SELF)  # if this fails, the server's writes are reported too

    def _written(self) -> None:
        try:
            os.read(self._fd, 4096)  # events are a few bytes each; what is left waits
        except BlockingIOError:
            return
        self._on_write()

    def close(self) -> None:
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None


class SQLiteStore(SQLStore):
    """Group commit, pipelined: while one group is being synced to disk, the next forms.

    Everything but the commit itself happens on the event loop thread: ids and ts
    are given as a message joins a group, so they follow commit order, and the
    writer thread only runs plain statements and COMMIT. That keeps the two
    threads from contending for the GIL.
    """

    dialect = SQLITE
    sql = Queries(SQLITE)

    def __init__(self, path: str, exclusive: bool = True, listen: bool | None = None):
        super().__init__()
        self.path = path
        # A server takes the database for itself; admin commands (tokens, keys) and
        # commands that write straight into it open it beside a running server.
        self.exclusive = exclusive
        # A serving store hears other processes' commits (it has long-polls to wake).
        self.listen = exclusive if listen is None else listen
        # On the loop: stamps given as sends join a group (usually right; see restamp).
        self._clock = CommitClock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._reader: sqlite3.Connection | None = None
        self._scanner: sqlite3.Connection | None = None
        self._scans: ThreadPoolExecutor | None = None
        self._lock_file: int | None = None
        self._watch: WalWatch | None = None
        # A look is queued for the writer and has not begun (set on the loop, cleared
        # by the writer as it begins one).
        self._look_queued = False
        # The writer thread's: the newest stamp committed by anyone as far as it knows,
        # and data_version when it last asked.
        self._floor = NO_STAMP
        self._seen_version: int | None = None

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
            # Asked before the floor is read: a commit in between is looked at again.
            self._seen_version = writer_conn.execute(SQL_DATA_VERSION).fetchone()[0]
            self._floor = self._read_floor(writer_conn)
            self._clock = CommitClock(self._floor)
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
        if self.listen:
            self._watch = self._watch_wal()
        self._writer = threading.Thread(target=self._write_loop, args=(writer_conn,),
                                        name="busd-sqlite-writer", daemon=True)
        self._writer.start()
        self._open = True

    def _wal_written(self) -> None:
        """Another process wrote the WAL: the writer looks (once for a run of events)."""
        # Its commit may change tokens, keys or flags: ask again from now on (the look's
        # `_heard` drops what is asked before that commit is visible).
        self._forget_identity()
        if not self._look_queued:
            self._look_queued = True
            self._queue.put(_LOOK)

    def _watch_wal(self) -> WalWatch | None:
        wal = self.path + "-wal"  # there while any connection is open (ours are)
        try:
            return WalWatch(wal, self._loop, self._wal_written)
        except OSError as exc:
            log.warning("cannot watch %s (%s): messages other processes write into the "
                        "database wake parked long-polls only when this server next "
                        "writes", wal, exc)
            return None

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
        if self._watch is not None:  # after the writer, which turns it on and off
            self._watch.close()
            self._watch = None
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
    def _read_floor(cls, conn: sqlite3.Connection) -> Stamp:
        """The newest stamp ever committed: the largest id ever given, and the clock row
        (or the newest ts, in a database from before the clock row was kept exactly)."""
        row = conn.execute(cls.sql.get_flag, (CLOCK_FLAG,)).fetchone()
        clock = float(row[0]) if row else 0.0
        newest = conn.execute(SQL_MAX_TS).fetchone()[0] or 0.0
        return Stamp(conn.execute(SQL_MAX_ID).fetchone()[0] or 0, max(clock, newest))

    # -- group commit ------------------------------------------------------

    def _admit(self, send: Send) -> StoredMessage | None:
        message = send.message
        if message.key is not None:
            row = self._reader.execute(self.sql.find_by_key,
                                       (message.sender, message.key)).fetchone()
            if row is not None:
                return self._message(row)
        # Stamped now, on the loop thread: ids and ts follow the order groups commit in
        # (the writer gives new ones only if another process committed past them).
        stamp = self._clock.next()
        send.stored = StoredMessage(
            id=stamp.id, ts=stamp.ts, channel=message.channel, sender=message.sender,
            to=message.to, body=message.body, meta=message.meta, signature=message.signature)
        return None

    def _start_commit(self, group: Group) -> None:
        work = [(SQL_INSERT, _insert_params(send)) for send in group.sends]
        work += [(sql, params) for sql, params, _future, _changes_identity in group.statements]
        work += self._receipt_statements(group)
        self._queue.put((group, work))

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        watch = self._watch
        # The WAL watch is on only while this writer is idle: it goes off in the first
        # transaction after (its own writes are no news) and stays off while jobs keep
        # coming, for each transaction's data_version check sees what other processes
        # committed meanwhile. When no job comes for LOOK_AFTER, it goes on again and a
        # transaction that only looks covers the time it was off.
        watching = watch is not None
        while True:
            if watch is not None and not watching:
                try:
                    job = self._queue.get(timeout=LOOK_AFTER)
                except queue.Empty:
                    watch.on()
                    watching = True
                    job = _LOOK
            else:
                job = self._queue.get()
            if job is _STOP:
                break
            if job is _LOOK:
                self._look_queued = False
                if not self._look(conn):
                    break
                continue
            group, work = job
            heard: Heard | None = None
            outcome: Written | BusError
            try:
                with _transaction(conn):
                    if watching:
                        watch.off()  # under the write lock: nobody else writes meanwhile
                        watching = False
                    heard = self._catch_up(conn)
                    outcome = self._store(conn, group, work)
                if outcome.top is not None:
                    self._floor = outcome.top
            except sqlite3.Error as exc:
                log.error("commit failed, nothing of this group was stored: %s", exc)
                outcome = BusError(errors.STORAGE_UNAVAILABLE, str(exc))
            except Exception as exc:  # a bug: fail the group loudly, keep the writer alive
                log.exception("unexpected error in the writer")
                outcome = BusError(errors.INTERNAL, type(exc).__name__)
            try:
                # One wake-up of the loop per group: what was heard, then the outcome.
                self._loop.call_soon_threadsafe(self._committed, group, outcome, heard)
            except RuntimeError:
                break  # the loop is gone: nobody is waiting for an answer
        conn.close()

    def _look(self, conn: sqlite3.Connection) -> bool:
        """A transaction of its own that only looks for other processes' commits (it
        writes nothing, so it makes no WAL write to report). False: the loop is gone."""
        heard: Heard | None = None
        try:
            with _transaction(conn):
                heard = self._catch_up(conn)
        except sqlite3.Error as exc:
            log.warning("could not look for other processes' commits (%s); every parked "
                        "long-poll re-checks", exc)
            heard = Heard(self._floor, None)
        try:
            if heard is not None:
                self._loop.call_soon_threadsafe(self._heard, heard)
        except RuntimeError:
            return False
        return True

    def _catch_up(self, conn: sqlite3.Connection) -> Heard | None:
        """In the writer's transaction, before it writes: what other processes committed
        since it last looked (None: nothing)."""
        version = conn.execute(SQL_DATA_VERSION).fetchone()[0]
        if version == self._seen_version:
            return None
        self._seen_version = version
        before = self._floor
        self._floor = self._read_floor(conn)
        recipients = None
        if self.listen:
            rows = conn.execute(SQL_NEW_RECIPIENTS, (before.id, NOTICE_LIMIT + 1)).fetchall()
            if len(rows) <= NOTICE_LIMIT:
                recipients = [CommitNotice(channel, to) for channel, to in rows]
        return Heard(self._floor, recipients)

    def _store(self, conn: sqlite3.Connection, group: Group, work: list) -> Written:
        """The group's statements, its messages stamped above the floor; the clock row
        moves to its last stamp."""
        sends = group.sends
        top = None
        if sends:
            first = sends[0].stored
            fresh = restamp(self._floor, Stamp(first.id, first.ts), len(sends))
            if fresh is not None:
                for send, stamp in zip(sends, fresh):
                    send.stored = replace(send.stored, id=stamp.id, ts=stamp.ts)
                work = [(SQL_INSERT, _insert_params(send)) for send in sends] + work[len(sends):]
            last = sends[-1].stored
            top = Stamp(last.id, last.ts)
            work = [*work, (self.sql.set_flag, (CLOCK_FLAG, repr(top.ts)))]
        counts = [conn.execute(sql, params).rowcount for sql, params in work]
        duplicates = {}
        if 0 in counts[:len(sends)]:  # another process stored one's (from, key) first
            for index, send in enumerate(sends):
                if counts[index] == 0:
                    row = conn.execute(self.sql.find_by_key,
                                       (send.message.sender, send.message.key)).fetchone()
                    duplicates[index] = self._message(row)
        return Written(counts[len(sends):], duplicates, top)

    def _hears_identity_changes(self) -> bool:
        # While the writer is busy each of its transactions checks data_version; while
        # it is idle, the WAL watch cues a look.
        return self._open and self._watch is not None and self._watch.working

    def _heard(self, heard: Heard) -> None:
        """On the loop thread: other processes committed; wake whom it concerns."""
        self._forget_identity()  # they may have changed tokens, keys or flags
        self._clock.raise_floor(heard.floor)
        if not self.listen:
            return
        if heard.recipients is None:
            if self.on_commits_missed is not None:
                self.on_commits_missed()
        elif heard.recipients and self.on_remote_commit is not None:
            self.on_remote_commit(heard.recipients)

    def _committed(self, group: Group, outcome: Written | BusError,
                   heard: Heard | None = None) -> None:
        """On the loop thread: the writer is done with `group` (or failed it), and what
        it heard of other processes' commits in that transaction."""
        if heard is not None:
            self._heard(heard)
        if isinstance(outcome, BusError):
            self._forget_identity()
            self._fail(group, outcome)
            # It may have failed before looking: whatever others committed, re-check.
            if self.listen and self.on_commits_missed is not None:
                self.on_commits_missed()
        else:
            committed = []
            for index, send in enumerate(group.sends):
                first = outcome.duplicates.get(index) if outcome.duplicates else None
                if first is not None:
                    answer(send, SendResult(first, duplicate=True))
                else:
                    committed.append(send.stored)
                    answer(send, SendResult(send.stored))
            if any(changes_identity for *_, changes_identity in group.statements):
                self._forget_identity()  # before its writer hears it is done
            for (_sql, _params, future, _changes_identity), count in zip(group.statements,
                                                                        outcome.counts):
                settle(future, count)
            if outcome.top is not None:
                self._clock.raise_floor(outcome.top)
            if committed and self.on_commit is not None:
                self.on_commit(committed)
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
