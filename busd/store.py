"""The storage interface every backend implements, and the commit clock.

A store knows no HTTP. It assigns each message its id and ts at commit, keeps
idempotency keys, el-ipc watermarks and recipients' acknowledged cursors, and
tells the server (on the event loop thread) what became visible, so it can wake
parked long-polls: `on_commit` with the messages this server committed,
`on_remote_commit` with what another process sharing the database committed (a
replica, or a command writing straight into it), and
`on_commits_missed` when such news may have been lost (every waiter re-checks).
"""
from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from typing import Callable, Sequence
from urllib.parse import urlsplit

from .model import NewMessage, SendResult, StoredMessage
from .receipts import ReceiptRow, WatermarkRow


@dataclass(frozen=True)
class TokenRecord:
    id: int
    agent: str
    channels: tuple[str, ...] | None   # None: every channel
    admin: bool


@dataclass(frozen=True)
class CommitNotice:
    """What another server's commit made visible: enough to know whom to wake."""
    channel: str
    to: str


@dataclass(frozen=True)
class Received:
    """A recv batch and the cursor value that goes with it."""
    messages: list[StoredMessage]
    now: float   # every message that becomes visible later has a larger ts


CommitListener = Callable[[Sequence[StoredMessage]], None]
RemoteCommitListener = Callable[[Sequence[CommitNotice]], None]


class Store(abc.ABC):
    on_commit: CommitListener | None = None
    on_remote_commit: RemoteCommitListener | None = None
    on_commits_missed: Callable[[], None] | None = None
    # Schema versions (before, after) of the last open(): what it migrated.
    migrated: tuple[int, int] | None = None

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish every write already accepted, then release the database."""

    @abc.abstractmethod
    async def now(self) -> float:
        """A cursor value no later message can fall at or below.

        Every message that becomes visible after this call has a larger ts, so a
        client that moves its since-cursor to this value never skips one.
        """

    @abc.abstractmethod
    async def append(self, message: NewMessage) -> SendResult:
        """Store durably (returns after the commit); a repeated (from, key) returns the first."""

    @abc.abstractmethod
    async def recv(self, to: str, channel: str, since: float, limit: int) -> Received:
        """Messages for `to` (addressed, or broadcast by someone else) with ts > since, oldest
        first, and a `now` that is safe together with them.

        channel "*" reads every channel.
        """

    @abc.abstractmethod
    def acknowledge(self, agent: str, channel: str, since: float, delivered: float = 0.0,
                    filed: bool = False) -> None:
        """A reader's poll: it has everything up to `since`, was just handed messages up to
        `delivered`, and (`filed`) its inbox files up to `since` are durable. Fire-and-forget."""

    @abc.abstractmethod
    def note_contact(self, agent: str) -> None:
        """`agent` talked to the bus just now (fire-and-forget, coalesced)."""

    @abc.abstractmethod
    async def last_contacts(self) -> dict[str, float]:
        """Every agent ever seen, and when it last talked to the bus."""

    @abc.abstractmethod
    async def messages_by_id(self, ids: list[int]) -> list[StoredMessage]: ...

    @abc.abstractmethod
    async def receipts(self, channels: set[str]) -> tuple[list[ReceiptRow], list[WatermarkRow]]:
        """The readers' receipt rows on these channels (and "*"), and their el-ipc watermarks."""

    @abc.abstractmethod
    async def undelivered(self, queued_before: float, limit: int = 1000) -> list[dict]:
        """Addressed messages not yet fetched and stored before `queued_before`, plus any
        addressed to a name that has never talked to the bus: [{id, ts, from, to, channel,
        reason}], oldest first."""

    @abc.abstractmethod
    async def recent_messages(self, after: int | None, limit: int, channel: str | None = None,
                              agent: str | None = None) -> list[StoredMessage]:
        """The newest `limit` messages with id > after (None: any), whoever they are for,
        oldest first; only those on `channel`, and only those from or to `agent`, if given."""

    @abc.abstractmethod
    async def record_handoff_check(self, message_id: int, agent: str, result: str) -> None:
        """`agent`'s daemon checked handoff `message_id` as it filed it: verified, mismatch
        or unreachable. Durable when it returns; a later report replaces an earlier one."""

    @abc.abstractmethod
    async def handoff_checks(self, ids: list[int]) -> dict[int, dict[str, str]]:
        """{message id: {agent: result}} for those of `ids` someone reported a check of."""

    @abc.abstractmethod
    async def record_reads(self, agent: str, ids: list[int]) -> None:
        """`agent` was shown these messages (the caller checked that they are its own):
        `read`. Durable when it returns; ids of messages the bus does not hold are ignored."""

    @abc.abstractmethod
    async def reads(self, ids: list[int]) -> dict[int, set[str]]:
        """{message id: the agents that read it} for those of `ids` someone read."""

    @abc.abstractmethod
    async def read_unread(self, agent: str, channel: str, limit: int) -> list[StoredMessage]:
        """el-ipc read: unread messages on the channel; the watermark moves past them durably."""

    @abc.abstractmethod
    async def count_unread(self, agent: str, channel: str) -> int: ...

    @abc.abstractmethod
    async def channels(self) -> list[dict]:
        """[{channel, count, last_message}], newest first."""

    @abc.abstractmethod
    async def registered_agents(self) -> list[dict]: ...

    @abc.abstractmethod
    async def pending_counts(self) -> dict[str, dict[str, int]]:
        """{channel: {recipient: count}} of addressed messages the recipient has not fetched."""

    @abc.abstractmethod
    async def queue_counts(self) -> dict[str, dict[str, int]]:
        """{channel: {recipient: count}} of the messages the bus holds, read or not (retention
        aside): rapid's queues. A broadcast is one message, counted under its `to`, "*"."""

    @abc.abstractmethod
    async def enforce_retention(self, max_age: float | None, per_queue: int | None) -> int:
        """Delete messages older than max_age seconds or beyond the newest per_queue of
        their (channel, recipient) queue -- only those already read. Returns how many."""

    # identity: tokens (only hashes are stored) and registered public keys

    @abc.abstractmethod
    async def auth_enabled(self) -> bool:
        """True once any unrevoked token exists: from then on every caller needs one."""

    @abc.abstractmethod
    async def token_by_hash(self, token_hash: str) -> TokenRecord | None: ...

    @abc.abstractmethod
    async def create_token(self, token_hash: str, agent: str, channels: tuple[str, ...] | None,
                           admin: bool) -> None: ...

    @abc.abstractmethod
    async def revoke_tokens(self, agent: str | None = None, token_id: int | None = None) -> int:
        """Revoke one token by id, or all of an agent's; returns how many were revoked."""

    @abc.abstractmethod
    async def list_tokens(self) -> list[dict]: ...

    @abc.abstractmethod
    async def public_key(self, name: str) -> tuple[str, str] | None:
        """(public key PEM, role) of a registered agent or operator."""

    @abc.abstractmethod
    async def first_operator_key(self) -> str | None: ...

    @abc.abstractmethod
    async def register_agent(self, name: str, identity: str, public_key: str, role: str,
                             registered_by: str | None) -> None: ...

    @abc.abstractmethod
    async def register_agent_signed(self, name: str, identity: str, public_key: str,
                                    registered_by: str, signed_at_ms: int) -> bool:
        """Register (or rotate) agent `name`'s key as approved by an operator at
        `signed_at_ms`; False, and nothing changes, when its current registration was
        signed at that time or later (a replay, or an older one) or `name` is an operator."""

    @abc.abstractmethod
    async def get_flag(self, name: str) -> str | None: ...

    @abc.abstractmethod
    async def set_flag(self, name: str, value: str) -> None: ...


def is_postgres(db: str) -> bool:
    """Whether a --db value names a PostgreSQL database (else it is a SQLite path)."""
    return db.startswith(("postgresql://", "postgres://"))


def shown_database(db: str) -> str:
    """A --db value as logs and errors may show it: a PostgreSQL URL loses its password."""
    if not is_postgres(db):
        return db
    parts = urlsplit(db)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostinfo = netloc.rpartition("@")
        netloc = userinfo.split(":", 1)[0] + ":***@" + hostinfo
    query = "&".join("password=***" if item.lower().startswith("password=") else item
                     for item in parts.query.split("&")) if parts.query else ""
    return parts._replace(netloc=netloc, query=query).geturl()


class StoreError(Exception):
    """The store cannot open or run; the message says what is wrong and what to do."""


@dataclass(frozen=True, slots=True)
class Stamp:
    """A message's place in commit order: its id and its ts."""
    id: int
    ts: float


NO_STAMP = Stamp(0, 0.0)


class CommitClock:
    """Strictly increasing stamps (id, ts), above a floor.

    The rule that keeps every since-cursor whole, whichever process writes: a
    transaction that stores messages stamps them, while it holds the database's write
    lock, above the floor (the newest stamp committed before it: the largest id ever
    given and the clock row), and moves the clock row to its last stamp in the same
    transaction. `now` is the clock row read in the same snapshot as the messages it
    goes with. So a message that is not in a reader's snapshot commits later, above a
    floor that is at least that reader's `now`: a cursor moved to `now` never skips it.

    A serving store stamps a message as it joins a group (`next`, on the event loop),
    which is right whenever nobody else wrote meanwhile; under the lock `restamp`
    keeps those stamps or, if another process committed past them, gives new ones.
    """

    # At today's epoch a double resolves ~2.4e-7 s, so 1 us steps stay distinct.
    STEP = 1e-6

    def __init__(self, floor: Stamp = NO_STAMP):
        self._last = floor

    def next(self) -> Stamp:
        stamp = Stamp(self._last.id + 1, max(time.time(), self._last.ts + self.STEP))
        self._last = stamp
        return stamp

    def raise_floor(self, floor: Stamp) -> None:
        """Someone committed up to `floor`: later stamps go above it."""
        last = self._last
        if floor.id > last.id or floor.ts > last.ts:
            self._last = Stamp(max(floor.id, last.id), max(floor.ts, last.ts))


def restamp(floor: Stamp, first: Stamp, count: int) -> list[Stamp] | None:
    """What a transaction does with `count` stamps planned from `first` on (each above the
    one before), given the floor it found under the write lock.

    None: they stand (the first is above the floor, so all are: nobody else wrote since
    they were given). Otherwise another process committed past them: `count` fresh
    stamps from the floor up, to take their places in the same order.
    """
    if first.id > floor.id and first.ts > floor.ts:
        return None
    clock = CommitClock(floor)
    return [clock.next() for _ in range(count)]
