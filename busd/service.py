"""What the bus does for a request, whatever carried it: the flows of a send, an el-ipc
read, the channel list, the roster, receipt states and the agent card, each once.

The HTTP routes (api/) parse a request, call a flow here with the caller's principal
and answer with what it returns; `agent-bus ... --db` (busd/direct.py) calls the same
flows straight on the database, with no server. So identity (identity.Access),
signatures, receipts and the long-poll follow one set of rules on both paths. Nothing
here knows HTTP.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, TypeVar

from . import agent_card, errors, roster, secretguard
from .errors import BusError
from .identity import Access, Principal
from .metrics import BusMetrics
from .model import Limits, NewMessage, SendResult, StoredMessage
from .receipts import Presence
from .store import Store
from .waiters import Waiter, WaiterHub

# el-ipc's GET /messages (and `agent-bus read`) hands out at most this many per read.
READ_BATCH = 1000


@dataclass
class BusSettings:
    hold_seconds: float = 25.0          # long-poll hold; clients time out at 35 s
    default_batch: int = 100            # rapid's default `max`
    max_batch: int = 1000               # most messages one read hands out; a larger `max` gets this
    body_timeout: float = 10.0          # a body must arrive within this
    secret_guard: bool = False          # refuse bodies that look like keys or credentials
    online_window: float = 60.0         # contact this recent counts as online
    limits: Limits = field(default_factory=Limits)
    card_name: str = agent_card.DEFAULT_NAME
    card_description: str = agent_card.DEFAULT_DESCRIPTION
    public_url: str = ""                # the card's url; "" = as the request reached the bus


@dataclass
class Bus:
    """One bus as the flows see it: its store, settings and access rules, and (where
    long-polls park) the hub that wakes them and who is present."""
    store: Store
    settings: BusSettings
    access: Access
    hub: WaiterHub = field(default_factory=WaiterHub)
    metrics: BusMetrics = None  # type: ignore[assignment]
    presence: Presence = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.presence is None:
            self.presence = Presence(self.settings.online_window)
        if self.metrics is None:
            self.metrics = BusMetrics(parked_waiters=lambda: len(self.hub),
                                      wakeups=lambda: self.hub.wakeups)

    def hear_commits(self) -> None:
        """Wake parked long-polls on what the store commits: this process's commits, other
        processes' (a replica, a `--db` command), and when such news may have been lost."""
        self.store.on_commit = self.committed
        self.store.on_remote_commit = self.hub.publish
        self.store.on_commits_missed = self.hub.wake_all

    def committed(self, messages) -> None:
        """The store made these visible: wake their receivers, count them."""
        self.hub.publish(messages)
        self.metrics.committed(messages)


# -- sending --------------------------------------------------------------------------

async def send(bus: Bus, principal: Principal, message: NewMessage, *,
               signed_at: object = None, legacy: bool = False,
               allow_secret: bool = False) -> SendResult:
    """The one way a send is stored: the secret guard (where the bus has it on), who may
    send it, its signature (secure mode), then a durable commit. `message` has passed
    the message rules (model.check_*); `legacy`: el-ipc's signature format may apply."""
    if bus.settings.secret_guard and not allow_secret:
        if problem := secretguard.refusal(message.body):
            raise BusError(errors.SECRET_REFUSED,
                           problem.replace("--allow-secret", '"allow_secret": true'))
    if signed_at is not None and (not isinstance(signed_at, int) or isinstance(signed_at, bool)):
        raise BusError(errors.WRONG_TYPE, "signed_at must be whole milliseconds since 1970")
    bus.access.check_send_as(principal, message.sender, message.channel)
    message = await bus.access.verify_send(message, signed_at, legacy)
    bus.store.note_contact(message.sender)
    result = await bus.store.append(message)
    if result.duplicate and message.signature and signed_at is not None:
        first = result.message
        raise BusError(errors.REPLAY, fields={"id": first.id, "ts": first.ts})
    return result


def send_ack(result: SendResult) -> dict:
    """A send's acknowledgement as rapid's /send answers it (and `agent-bus send` prints)."""
    stored = result.message
    ack = {"ok": True, "ts": stored.ts, "channel": stored.channel, "id": stored.id}
    if result.duplicate:
        ack["duplicate"] = True
    return ack


# -- reading --------------------------------------------------------------------------

async def read_unread(bus: Bus, principal: Principal, channel: str, agent: str,
                      wait: bool) -> list[StoredMessage]:
    """el-ipc's read: what `agent` has not read on `channel` (at most READ_BATCH, oldest
    first), its watermark moved past them durably; with `wait`, parked until a matching
    commit or the hold ends."""
    bus.access.check_read_as(principal, agent, channel)
    bus.store.note_contact(agent)

    async def fetch():
        return await bus.store.read_unread(agent, channel, READ_BATCH)

    found = await long_poll(bus, channel, agent, fetch, wait, has_messages=bool)
    if found:
        bus.hub.changed()  # the watermark moved: these are delivered now
    bus.metrics.handed_out(found)
    return found


Found = TypeVar("Found")


async def wait_for_news(bus: Bus, fetch: Callable[[], Awaitable[Found]], block: bool,
                        news: Callable[[Found], bool], register: Callable[[], Waiter]) -> Found:
    """Fetch; if `block` and nothing is news, wait for a wake-up (or the hold) and look
    again. Returns what the last fetch found (a rapid fetch carries its own safe `now`)."""
    if not block or bus.hub.closed:
        return await fetch()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bus.settings.hold_seconds
    while True:
        # Registered before looking, so a change between the look and the wait still wakes us.
        waiter = register()
        try:
            found = await fetch()
            remaining = deadline - loop.time()
            if news(found) or remaining <= 0 or bus.hub.closed:
                return found
            await waiter.wait(remaining)
        finally:
            bus.hub.unregister(waiter)


async def long_poll(bus: Bus, channel: str, name: str, fetch: Callable[[], Awaitable[Found]],
                    block: bool, has_messages: Callable[[Found], bool]) -> Found:
    """Fetch; if nothing and `block`, park (seen as present) until a matching commit or
    the hold ends."""
    if not block or bus.hub.closed:
        return await fetch()
    bus.presence.parked_now(name)
    bus.hub.changed()  # presence: the console shows who is listening
    hung_up = False
    try:
        return await wait_for_news(bus, fetch, True, has_messages,
                                   lambda: bus.hub.register(channel, name))
    except asyncio.CancelledError:
        hung_up = True  # the client went away (the server cancels its handler)
        raise
    finally:
        bus.presence.unparked(name, hung_up, time.time())
        bus.hub.changed()


# -- what is on the bus ------------------------------------------------------------------

async def channels(bus: Bus, principal: Principal) -> list[dict]:
    """el-ipc's channel list, newest first (admins, on the channels they may see)."""
    bus.access.check_admin(principal)
    return [row for row in await bus.store.channels()
            if bus.access.sees_channel(principal, row["channel"])]


async def agents(bus: Bus, principal: Principal) -> list[dict]:
    """The roster: registered agents and every agent that has talked to the bus, with
    whether it can receive right now (el-ipc's fields, and ours beside them)."""
    if not principal.admin:
        bus.access.require_token(principal)
    return await roster.roster(bus.store, bus.access, bus.presence, principal)


async def states(bus: Bus, principal: Principal, ids: list[int]) -> list[dict]:
    """Receipt states of messages, in the order of `ids` ("unknown" for one that is
    missing or not the principal's to follow)."""
    if not principal.admin:
        bus.access.require_token(principal)
    # An id no database integer can hold is simply unknown (the stores cannot look it up).
    stored_range = sorted({i for i in ids if 0 < i < 2 ** 63})
    found = [m for m in await bus.store.messages_by_id(stored_range)
             # A sender may follow its own messages; admins follow everyone's; both only
             # on the channels their token may see.
             if (principal.admin or m.sender == principal.name)
             and bus.access.sees_channel(principal, m.channel)]
    known = await roster.states(bus.store, found)
    return [known.get(i, {"id": i, "state": "unknown"}) for i in ids]


async def card(bus: Bus, url: str, version: str) -> dict:
    """The bus's agent card; `url`: where the bus is reached, unless its settings name a
    public URL."""
    settings = bus.settings
    return agent_card.build(
        name=settings.card_name, description=settings.card_description,
        url=settings.public_url or url, version=version,
        tokens=await bus.store.auth_enabled(), operator_key=await bus.store.first_operator_key())
