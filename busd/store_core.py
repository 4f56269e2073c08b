"""What the SQLite and PostgreSQL stores share: the interface's methods written once over
the statements of store_sql, and the group-commit scheduler.

Writes join the forming group; the moment the writer is free, that group goes to the
database as one commit (SQLite: one transaction; PostgreSQL: one statement for its
messages, one for its receipts) while the next one forms. A store supplies only what
differs: `_rows` (a short read), `_scan` (a read that may walk many rows, kept off the
event loop where the store can), `_admit` and `_start_commit` (how a group is stamped
and committed; it calls `_finished` when done), and its connections.
"""
from __future__ import annotations

import abc
import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from . import errors
from .errors import BusError
from .model import NewMessage, SendResult, StoredMessage
from .receipts import ReceiptRow, WatermarkRow
from .store import Received, Store, StoreError, TokenRecord
from .store_sql import SCHEMA_VERSION, PostgresDialect, Queries

# Last contact is written at most this often per agent: presence needs no finer grain.
CONTACT_EVERY = 5.0


@dataclass(slots=True)
class Send:
    message: NewMessage
    future: asyncio.Future
    # Later sends with the same (from, key) while this one was not committed yet.
    followers: list[asyncio.Future] = field(default_factory=list)
    # Stamped as it joins a group, where the store stamps then (SQLite).
    stored: StoredMessage | None = None


@dataclass
class Group:
    """Writes gathered while the writer was busy, and who waits for them."""
    sends: list[Send] = field(default_factory=list)
    by_key: dict[tuple[str, str], Send] = field(default_factory=dict)
    # Other statements in arrival order: (sql, params, future for its row count,
    # whether it changes tokens, keys or flags).
    statements: list[tuple[str, Any, asyncio.Future, bool]] = field(default_factory=list)
    # (agent, channel) -> (acknowledged, delivered, filed) maxima; fire-and-forget.
    acknowledged: dict[tuple[str, str], tuple[float, float, float]] = field(default_factory=dict)
    contacts: dict[str, float] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.sends or self.statements or self.acknowledged or self.contacts)


def settle(future: asyncio.Future, outcome: Any) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def answer(send: Send, outcome: SendResult | BusError) -> None:
    """Tell a send, and the later sends with its key, what became of it."""
    settle(send.future, outcome)
    if send.followers:
        repeated = outcome if isinstance(outcome, BusError) else SendResult(outcome.message,
                                                                            duplicate=True)
        for follower in send.followers:
            settle(follower, repeated)


def refuse_newer(version: int) -> None:
    if version > SCHEMA_VERSION:
        raise StoreError(f"the database schema (version {version}) is newer than this "
                         f"agent-bus understands ({SCHEMA_VERSION}); upgrade agent-bus")


def with_pending_receipts(rows: list[ReceiptRow], pending: dict, wanted: set[str]
                          ) -> list[ReceiptRow]:
    """Receipt rows from the database, raised by what this server acknowledged and has not
    committed yet (fire-and-forget writes ride the next group): status must not lag."""
    merged = {(r.agent, r.channel): r for r in rows}
    for (agent, channel), (_since, delivered, filed) in pending.items():
        if channel not in wanted:
            continue
        row = merged.get((agent, channel))
        merged[(agent, channel)] = ReceiptRow(
            agent, channel, max(delivered, row.delivered if row else 0.0),
            max(filed, row.filed if row else 0.0))
    return list(merged.values())


def undelivered_entry(message_id: int, ts: float, sender: str, to: str, channel: str,
                      never_seen: object) -> dict:
    reason = (f"nobody named {to} has ever talked to this bus" if never_seen
              else f"queued for {time.time() - ts:.0f} s; {to} has not fetched it")
    return {"id": message_id, "ts": ts, "from": sender, "to": to, "channel": channel,
            "reason": reason}


class SQLStore(Store):
    dialect: PostgresDialect
    sql: Queries

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open = False
        self._forming = Group()
        self._in_flight: Group | None = None
        self._kick_scheduled = False
        self._idle = asyncio.Event()
        # What this server acknowledged and when it last noted each contact: the
        # database may not have it yet, and repeats are not written again.
        self._acknowledged: dict[tuple[str, str], tuple[float, float, float]] = {}
        self._contacts: dict[str, float] = {}
        self._identity_cache: dict[tuple, Any] = {}
        self._identity_generation = 0

    # -- what a store supplies ---------------------------------------------

    @abc.abstractmethod
    async def _rows(self, sql: str, params: Any = ()) -> list[tuple]:
        """A short, indexed read."""

    async def _scan(self, sql: str, params: Any = ()) -> list[tuple]:
        """A read that may walk many rows: it must not hold up the event loop."""
        return await self._rows(sql, params)

    def _admit(self, send: Send) -> StoredMessage | None:
        """A send joins the forming group: the message already stored under its key, if
        the store can tell now (None: go on). Where ids and ts are given now, give them."""
        return None

    @abc.abstractmethod
    def _start_commit(self, group: Group) -> None:
        """Take the group to the database; answer its futures and call `_finished`."""

    @abc.abstractmethod
    async def _disconnect(self) -> None:
        """Release every connection (nothing is waiting to be written)."""

    async def close(self) -> None:
        if self._open:
            await self._idle.wait()
            self._open = False
        await self._disconnect()

    # -- group commit --------------------------------------------------------

    def _join(self) -> Group:
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
        self._forming = Group()
        self._in_flight = group
        self._start_commit(group)

    def _finished(self) -> None:
        self._in_flight = None
        self._kick()

    @staticmethod
    def _fail(group: Group, error: BusError) -> None:
        for send in group.sends:
            answer(send, error)
        for _sql, _params, future, _changes_identity in group.statements:
            settle(future, error)

    def _write(self, sql: str, params: Any, changes_identity: bool = False) -> asyncio.Future:
        """One statement with the next group; the future is its row count once durable."""
        future = self._loop.create_future()
        self._join().statements.append((sql, params, future, changes_identity))
        return future

    def _receipt_statements(self, group: Group) -> list[tuple[str, Any]]:
        """A group's receipts and contacts as statements, each batch in key order."""
        acknowledged = [(*key, *group.acknowledged[key]) for key in sorted(group.acknowledged)]
        contacts = [(agent, group.contacts[agent]) for agent in sorted(group.contacts)]
        return ([(self.sql.acknowledge, p) for p in self.dialect.batch(acknowledged)]
                + [(self.sql.note_contacts, p) for p in self.dialect.batch(contacts)])

    # -- reading -------------------------------------------------------------

    async def _value(self, sql: str, params: Any = ()) -> Any:
        rows = await self._rows(sql, params)
        return rows[0][0] if rows else None

    # -- identity answers, cached ------------------------------------------
    #
    # Every request asks whether auth is on and every send whether secure mode is. So
    # these answers are kept while the store hears every change to them: its own writes
    # to tokens, keys or flags drop them as they commit, and so does news that another
    # process committed (PostgreSQL: its NOTIFY; SQLite: the writer's data_version
    # check, cued by the WAL watch). A store that cannot hear others keeps nothing.

    def _hears_identity_changes(self) -> bool:
        """Whether another process's change to tokens, keys or flags would reach
        `_forget_identity` (so cached answers may be kept)."""
        return False

    def _forget_identity(self) -> None:
        self._identity_cache.clear()
        self._identity_generation += 1

    async def _identity_value(self, key: tuple, sql: str, params: Any = ()) -> Any:
        """An answer about tokens, keys or flags, from the cache where it may be kept."""
        cache = self._identity_cache
        if key in cache:
            return cache[key]
        generation = self._identity_generation
        value = await self._value(sql, params)
        # Kept only if nothing changed while we asked, and we would hear of a change.
        if generation == self._identity_generation and self._hears_identity_changes():
            cache[key] = value
        return value

    @staticmethod
    def _message(row: tuple) -> StoredMessage:
        body = row[5]  # text in SQLite; bytea (bytes) in PostgreSQL, which text cannot hold
        return StoredMessage(id=row[0], ts=row[1], channel=row[2], sender=row[3], to=row[4],
                             body=body if type(body) is str else bytes(body).decode("utf-8"),
                             meta=json.loads(row[6]) if row[6] else None, signature=row[7])

    # -- the interface -------------------------------------------------------

    async def now(self) -> float:
        return float(await self._value(self.sql.now))

    async def recv(self, to: str, channel: str, since: float, limit: int) -> Received:
        params = {"to": to, "channel": channel, "since": since, "limit": limit}
        rows = await self._rows(self.sql.recv_all_channels_with_now if channel == "*"
                                else self.sql.recv_with_now, params)
        return Received([self._message(row[1:]) for row in rows if row[1] is not None],
                        float(rows[0][0]))

    async def append(self, message: NewMessage) -> SendResult:
        group = self._join()
        future = self._loop.create_future()
        key = (message.sender, message.key)
        if message.key is not None:
            for pending in (self._in_flight, group):
                first = pending.by_key.get(key) if pending is not None else None
                if first is not None:
                    # The first send with this key is not committed yet: answer with
                    # it when (and only if) it commits.
                    first.followers.append(future)
                    return await future
        send = Send(message, future)
        found = self._admit(send)
        if found is not None:
            return SendResult(found, duplicate=True)
        group.sends.append(send)
        if message.key is not None:
            group.by_key[key] = send
        return await future

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
        self._acknowledged[key] = tuple(map(max, receipt, known)) if known else receipt
        # Fire-and-forget: receipts ride along with the next group commit.
        group = self._join()
        group.acknowledged[key] = tuple(map(max, receipt, group.acknowledged.get(key, (0.0,) * 3)))

    def note_contact(self, agent: str) -> None:
        now = time.time()
        if now - self._contacts.get(agent, 0.0) < CONTACT_EVERY or not self._open:
            return
        self._contacts[agent] = now
        self._join().contacts[agent] = now

    async def last_contacts(self) -> dict[str, float]:
        stored = dict(await self._rows(self.sql.last_contacts))
        # What is still on its way to the disk counts too.
        return {**stored, **{a: t for a, t in self._contacts.items() if t > stored.get(a, 0)}}

    async def messages_by_id(self, ids: list[int]) -> list[StoredMessage]:
        if not ids:
            return []
        rows = await self._rows(self.sql.messages_by_id, (self.dialect.array(ids),))
        return [self._message(row) for row in rows]

    async def receipts(self, channels: set[str]) -> tuple[list[ReceiptRow], list[WatermarkRow]]:
        wanted = sorted(channels | {"*"})
        params = (self.dialect.array(wanted),)
        rows = [ReceiptRow(*r) for r in await self._rows(self.sql.receipts, params)]
        marks = [WatermarkRow(*r) for r in await self._rows(self.sql.watermarks, params)]
        return with_pending_receipts(rows, self._acknowledged, set(wanted)), marks

    async def undelivered(self, queued_before: float, limit: int = 1000) -> list[dict]:
        rows = await self._scan(self.sql.undelivered, (queued_before, limit))
        return [undelivered_entry(*row) for row in rows]

    async def recent_messages(self, after: int | None, limit: int, channel: str | None = None,
                              agent: str | None = None) -> list[StoredMessage]:
        rows = await self._scan(self.sql.recent, {"after": after or 0, "limit": limit,
                                                  "channel": channel, "agent": agent})
        return [self._message(row) for row in reversed(rows)]

    async def record_handoff_check(self, message_id: int, agent: str, result: str) -> None:
        await self._write(self.sql.record_handoff_check,
                          (message_id, agent, result, time.time()))

    async def handoff_checks(self, ids: list[int]) -> dict[int, dict[str, str]]:
        if not ids:
            return {}
        out: dict[int, dict[str, str]] = {}
        for message_id, agent, result in await self._rows(
                self.sql.handoff_checks, (self.dialect.array(ids),)):
            out.setdefault(message_id, {})[agent] = result
        return out

    async def record_reads(self, agent: str, ids: list[int]) -> None:
        if ids:
            await self._write(self.sql.record_reads, (agent, time.time(),
                                                      self.dialect.array(ids)))

    async def reads(self, ids: list[int]) -> dict[int, set[str]]:
        if not ids:
            return {}
        out: dict[int, set[str]] = {}
        for message_id, agent in await self._rows(self.sql.reads, (self.dialect.array(ids),)):
            out.setdefault(message_id, set()).add(agent)
        return out

    async def read_unread(self, agent: str, channel: str, limit: int) -> list[StoredMessage]:
        rows = await self._rows(self.sql.unread,
                                {"agent": agent, "channel": channel, "limit": limit})
        if not rows:
            return []
        await self._write(self.sql.set_watermark, (agent, channel, rows[-1][0]))
        return [self._message(row) for row in rows]

    async def count_unread(self, agent: str, channel: str) -> int:
        rows = await self._scan(self.sql.count_unread, {"agent": agent, "channel": channel})
        return rows[0][0]

    async def channels(self) -> list[dict]:
        return [{"channel": c, "count": n, "last_message": last}
                for c, n, last in await self._scan(self.sql.channels)]

    async def registered_agents(self) -> list[dict]:
        return [{"name": r[0], "identity": r[1], "role": r[2], "registered_by": r[3],
                 "created_at": r[4]} for r in await self._rows(self.sql.agents)]

    async def pending_counts(self) -> dict[str, dict[str, int]]:
        return await self._counts(self.sql.pending)

    async def queue_counts(self) -> dict[str, dict[str, int]]:
        return await self._counts(self.sql.queues)

    async def _counts(self, sql: str) -> dict[str, dict[str, int]]:
        """{channel: {recipient: count}} from rows of (channel, recipient, count)."""
        out: dict[str, dict[str, int]] = {}
        for channel, recipient, count in await self._scan(sql):
            out.setdefault(channel, {})[recipient] = count
        return out

    async def enforce_retention(self, max_age: float | None, per_queue: int | None) -> int:
        cutoff = time.time() - max_age if max_age else float("-inf")
        cap = per_queue if per_queue else 2 ** 62
        ids = [row[0] for row in await self._scan(self.sql.retention_candidates,
                                                  {"cutoff": cutoff, "cap": cap})]
        if not ids:
            return 0
        removed = await self._write(self.sql.delete_messages, (self.dialect.array(ids),))
        await self._write(self.sql.delete_handoff_checks, (self.dialect.array(ids),))
        await self._write(self.sql.delete_reads, (self.dialect.array(ids),))
        return removed

    # -- identity: tokens and keys ------------------------------------------

    async def auth_enabled(self) -> bool:
        return bool(await self._identity_value(("auth",), self.sql.any_token))

    async def token_by_hash(self, token_hash: str) -> TokenRecord | None:
        rows = await self._rows(self.sql.token_by_hash, (token_hash,))
        if not rows:
            return None
        token_id, agent, channels, admin = rows[0]
        return TokenRecord(id=token_id, agent=agent,
                           channels=tuple(json.loads(channels)) if channels else None,
                           admin=bool(admin))

    async def create_token(self, token_hash: str, agent: str, channels: tuple[str, ...] | None,
                           admin: bool) -> None:
        await self._write(self.sql.create_token, (
            token_hash, agent, json.dumps(list(channels)) if channels else None, admin,
            time.time()), changes_identity=True)

    async def revoke_tokens(self, agent: str | None = None, token_id: int | None = None) -> int:
        if token_id is not None:
            return await self._write(self.sql.revoke_token, (time.time(), token_id),
                                     changes_identity=True)
        return await self._write(self.sql.revoke_agent_tokens, (time.time(), agent),
                                 changes_identity=True)

    async def list_tokens(self) -> list[dict]:
        return [{"id": r[0], "agent": r[1], "channels": json.loads(r[2]) if r[2] else None,
                 "admin": bool(r[3]), "created_at": r[4], "revoked_at": r[5]}
                for r in await self._rows(self.sql.list_tokens)]

    async def public_key(self, name: str) -> tuple[str, str] | None:
        rows = await self._rows(self.sql.public_key, (name,))
        return (rows[0][0], rows[0][1]) if rows else None

    async def first_operator_key(self) -> str | None:
        return await self._identity_value(("operator",), self.sql.first_operator)

    async def register_agent(self, name: str, identity: str, public_key: str, role: str,
                             registered_by: str | None) -> None:
        await self._write(self.sql.register, (name, identity, public_key, role, registered_by,
                                              time.time()), changes_identity=True)

    async def register_agent_signed(self, name: str, identity: str, public_key: str,
                                    registered_by: str, signed_at_ms: int) -> bool:
        return bool(await self._write(self.sql.register_signed, (
            name, identity, public_key, registered_by, time.time(), signed_at_ms),
            changes_identity=True))

    async def get_flag(self, name: str) -> str | None:
        return await self._identity_value(("flag", name), self.sql.get_flag, (name,))

    async def set_flag(self, name: str, value: str) -> None:
        await self._write(self.sql.set_flag, (name, value), changes_identity=True)
