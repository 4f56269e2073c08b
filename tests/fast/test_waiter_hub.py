"""WaiterHub's wake-ups, as a property: a commit wakes exactly the parked polls it may
concern (and every watcher), never another; unregistered polls are forgotten; closing
answers everyone.

Fast tier: pure logic in-process (`PY -m pytest tests/fast`).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from hypothesis import given, settings, strategies as st

from busd.model import ALL_CHANNELS, BROADCAST
from busd.waiters import WaiterHub

NAMES = st.sampled_from(["ann", "bob", "cy"])
CHANNELS = st.sampled_from(["default", "ops", ALL_CHANNELS])


@dataclass(frozen=True)
class Commit:
    channel: str
    to: str


waiters = st.lists(st.tuples(CHANNELS, NAMES, st.booleans()), max_size=12)  # (.., left?)
commits = st.lists(st.builds(Commit, st.sampled_from(["default", "ops"]),
                             st.one_of(NAMES, st.just(BROADCAST))), max_size=4)


def concerns(channel: str, name: str, commit: Commit) -> bool:
    return channel in (commit.channel, ALL_CHANNELS) and commit.to in (name, BROADCAST)


@settings(max_examples=300, deadline=None)
@given(parked=waiters, watchers=st.integers(0, 2), published=commits)
def test_a_commit_wakes_exactly_the_polls_it_concerns(parked, watchers, published):
    async def scenario() -> None:
        hub = WaiterHub()
        polls = [(hub.register(channel, name), channel, name, left)
                 for channel, name, left in parked]
        watching = [hub.register_watcher() for _ in range(watchers)]
        for waiter, _channel, _name, left in polls:
            if left:
                hub.unregister(waiter)
                hub.unregister(waiter)  # twice is harmless
        assert len(hub) == sum(not left for *_, left in polls) + watchers
        version = hub.version
        hub.publish(published)
        for waiter, channel, name, left in polls:
            expected = not left and any(concerns(channel, name, c) for c in published)
            assert waiter.future.done() == expected, (channel, name, left, published)
        assert all(w.future.done() == bool(published) for w in watching)
        assert (hub.version != version) == bool(published)

        hub.close()
        for waiter, _channel, _name, left in polls:
            # Shutdown answers every poll still parked; one that left is not touched.
            assert waiter.future.done() != left
        late = hub.register("default", "ann")
        assert late.future.done() and late.future.result() is True

    asyncio.run(scenario())
