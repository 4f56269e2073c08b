"""Parked long-polls, woken the moment a matching message is committed.

The hub knows nothing of SQL: a store (SQLite in-process, PostgreSQL through
LISTEN/NOTIFY) tells it what was committed, and it wakes the waiters that care;
`publish` needs only each committed thing's `.channel` and `.to`.

Watchers (the operator console's feed) are not anyone's mailbox: they wake on every
commit and on `changed()`, which the routes call when something a watcher shows
moved without a commit (a receipt, presence, a handoff check). `version` counts
those events, so a watcher that comes back can tell whether it missed one.

`wakeups` counts why each parked long-poll's wait ended (watchers are left out: they
wake on every change by design), for /metrics: a poll woken for a commit that was not
for it would cost a fetch and show its client nothing, so it must be seen when it
happens. Everything here runs on the event loop thread.
"""
from __future__ import annotations

import asyncio
import itertools
import secrets
from typing import Iterable

from .model import ALL_CHANNELS, BROADCAST

# Why a parked long-poll's wait ended: a message for it was committed; news of some
# commits may have been lost, so every poll re-checks; the server is stopping; the
# hold ran out.
COMMIT, RECHECK, SHUTDOWN, TIMEOUT = "commit", "recheck", "shutdown", "timeout"
WAKE_REASONS = (COMMIT, RECHECK, SHUTDOWN, TIMEOUT)


class Waiter:
    __slots__ = ("channel", "name", "future", "tally")

    def __init__(self, channel: str | None, name: str, future: asyncio.Future,
                 tally: dict[str, int] | None):
        self.channel = channel
        self.name = name
        self.future = future
        self.tally = tally  # the hub's wake-up counts; None for a watcher

    def wake(self, reason: str, value: bool = True) -> None:
        """End the wait (`value` is what it returns), unless it has ended already."""
        if self.future.done():
            return
        self.future.set_result(value)
        if self.tally is not None:
            self.tally[reason] += 1

    async def wait(self, timeout: float) -> bool:
        """True if woken by a commit (or shutdown), False on timeout."""
        loop = asyncio.get_running_loop()
        handle = loop.call_later(timeout, self.wake, TIMEOUT, False)
        try:
            return await self.future
        finally:
            handle.cancel()


# A watcher's channel: it is parked on no channel, and wakes for all of them.
WATCHING = None


class WaiterHub:
    def __init__(self) -> None:
        # channel -> recipient name -> waiters; channel "*" holds recv-all waiters.
        self._by_channel: dict[str, dict[str, set[Waiter]]] = {}
        self._watchers: set[Waiter] = set()
        self._count = 0
        self.wakeups = dict.fromkeys(WAKE_REASONS, 0)
        # A fresh prefix per process: a watcher that comes back to a restarted
        # server (or another replica) never mistakes its old version for current.
        self._epoch = secrets.token_hex(4)
        self._changes = itertools.count()
        self._version = f"{self._epoch}-{next(self._changes)}"
        self.closed = False

    @property
    def version(self) -> str:
        """Changes with every commit and every `changed()`: an opaque token."""
        return self._version

    def __len__(self) -> int:
        return self._count

    def register(self, channel: str, name: str) -> Waiter:
        waiter = Waiter(channel, name, asyncio.get_running_loop().create_future(), self.wakeups)
        if self.closed:
            waiter.wake(SHUTDOWN)
        self._by_channel.setdefault(channel, {}).setdefault(name, set()).add(waiter)
        self._count += 1
        return waiter

    def register_watcher(self) -> Waiter:
        """A waiter woken by every commit and every `changed()`."""
        waiter = Waiter(WATCHING, "", asyncio.get_running_loop().create_future(), None)
        if self.closed:
            waiter.wake(SHUTDOWN)
        self._watchers.add(waiter)
        self._count += 1
        return waiter

    def changed(self) -> None:
        """Something watchers show moved without a commit: wake them."""
        self._version = f"{self._epoch}-{next(self._changes)}"
        _wake(self._watchers, COMMIT)

    def unregister(self, waiter: Waiter) -> None:
        if waiter.channel is WATCHING:
            if waiter in self._watchers:
                self._watchers.discard(waiter)
                self._count -= 1
            return
        names = self._by_channel.get(waiter.channel)
        if names is None:
            return
        group = names.get(waiter.name)
        if group is None or waiter not in group:
            return
        group.discard(waiter)
        self._count -= 1
        if not group:
            del names[waiter.name]
            if not names:
                del self._by_channel[waiter.channel]

    def publish(self, committed: Iterable) -> None:
        """Wake every waiter a committed message may concern (they re-check)."""
        committed = list(committed)
        if committed:
            self.changed()
        for message in committed:
            for channel in (message.channel, ALL_CHANNELS):
                names = self._by_channel.get(channel)
                if not names:
                    continue
                if message.to == BROADCAST:
                    for group in names.values():
                        _wake(group, COMMIT)
                else:
                    group = names.get(message.to)
                    if group:
                        _wake(group, COMMIT)

    def wake_all(self, reason: str = RECHECK) -> None:
        """Wake every parked poll to re-check: news of some commits may have been lost."""
        self.changed()
        for names in self._by_channel.values():
            for group in names.values():
                _wake(group, reason)

    def close(self) -> None:
        """Answer every parked poll now (shutdown); later polls do not park."""
        self.closed = True
        self.wake_all(SHUTDOWN)


def _wake(group: set[Waiter], reason: str) -> None:
    for waiter in group:
        waiter.wake(reason)
