"""CommitClock's promise, as a property: whatever the wall clock does (it may step back),
and however assigning, committing, abandoning and `now` interleave, a since-cursor moved
to a `now` value never skips a message.

Fast tier: pure logic in-process (`PY -m pytest tests/fast`).
"""
from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings, strategies as st

import busd.store
from busd.store import CommitClock


class WallClock:
    """Stands in for the `time` module inside busd.store: a wall clock the test moves."""

    def __init__(self, start: float):
        self.value = start

    def time(self) -> float:
        return self.value


operations = st.lists(st.one_of(
    st.tuples(st.just("tick"), st.floats(-2.0, 2.0)),   # the wall clock moves, maybe back
    st.tuples(st.just("assign")),
    st.tuples(st.just("settle"), st.integers(1, 4), st.booleans()),  # committed, or abandoned
    st.tuples(st.just("now")),
), max_size=80)


@settings(max_examples=300, deadline=None)
@given(start=st.floats(1.6e9, 1.9e9), last_ts=st.floats(0, 1.9e9), steps=operations)
def test_every_later_stamp_exceeds_every_now_and_no_now_passes_an_unsettled_stamp(
        start, last_ts, steps):
    wall = WallClock(start)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(busd.store, "time", wall)
        run(CommitClock(last_ts), wall, last_ts, steps)


def run(clock: CommitClock, wall: WallClock, last_ts: float, steps: list[tuple]) -> None:
    pending: deque[float] = deque()   # assigned, not yet settled, in commit order
    highest_now = last_ts
    highest_ts = last_ts
    for step in steps:
        if step[0] == "tick":
            wall.value += step[1]
        elif step[0] == "assign":
            ts = clock.assign()
            assert ts > highest_now, "a stamp at or below a `now` already handed out"
            assert ts > highest_ts, "stamps must strictly increase"
            highest_ts = ts
            pending.append(ts)
        elif step[0] == "settle" and pending:
            count = min(step[1], len(pending))
            done = [pending.popleft() for _ in range(count)]
            clock.settled(count, done[-1] if step[2] else None)
        elif step[0] == "now":
            now = clock.now()
            assert not pending or now < pending[0], \
                "`now` reached a stamp not yet visible: a cursor moved there would skip it"
            highest_now = max(highest_now, now)
        assert clock.high_water() >= max(highest_ts, highest_now)
