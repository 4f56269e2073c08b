"""The commit clock's promise, as a property: whatever the wall clock does (it may step
back), however several processes writing into one database interleave (a server that
stamps sends as they join a group, commands that open the database beside it, each with
its own idea of the floor, possibly stale), and whenever readers take `now`:

- ids and ts strictly increase in commit order, whoever commits;
- every ts committed exceeds every `now` read before its commit, so a since-cursor
  moved to a `now` never skips a message.

The database is modelled by what the stores keep in it (the largest id, the clock row);
the stamps come from the very functions the SQLite store's writer uses (CommitClock,
restamp). Fast tier: pure logic in-process (`PY -m pytest tests/fast`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings, strategies as st

import busd.store
from busd.store import NO_STAMP, CommitClock, Stamp, restamp


class WallClock:
    """Stands in for the `time` module inside busd.store: a wall clock the test moves."""

    def __init__(self, start: float):
        self.value = start

    def time(self) -> float:
        return self.value


@dataclass
class Database:
    """What every writer finds under the write lock: the floor (largest id ever given,
    the clock row); and `now` is the clock row as committed."""
    floor: Stamp = NO_STAMP
    committed: list[Stamp] = field(default_factory=list)


@dataclass
class Writer:
    """A process writing into the database: its loop-side clock and the group it forms."""
    clock: CommitClock
    forming: list[Stamp] = field(default_factory=list)


WRITERS = 3

operations = st.lists(st.one_of(
    st.tuples(st.just("tick"), st.floats(-2.0, 2.0)),        # the wall clock moves, maybe back
    st.tuples(st.just("join"), st.integers(0, WRITERS - 1)),  # a send joins a writer's group
    st.tuples(st.just("commit"), st.integers(0, WRITERS - 1), st.booleans()),  # or rolled back
    st.tuples(st.just("reopen"), st.integers(0, WRITERS - 1)),  # a new process opens the file
    st.tuples(st.just("hear"), st.integers(0, WRITERS - 1)),    # a writer learns the floor
    st.tuples(st.just("now"),),
), max_size=120)


@settings(max_examples=400, deadline=None)
@given(start=st.floats(1.6e9, 1.9e9), floor_id=st.integers(0, 10 ** 6),
       floor_ts=st.floats(0, 1.9e9), steps=operations)
def test_stamps_increase_in_commit_order_above_every_now_whoever_writes(
        start, floor_id, floor_ts, steps):
    wall = WallClock(start)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(busd.store, "time", wall)
        run(Database(Stamp(floor_id, floor_ts)), wall, steps)


def run(db: Database, wall: WallClock, steps: list[tuple]) -> None:
    # Each writer opened the database at some point before: its floor may be stale.
    writers = [Writer(CommitClock(Stamp(db.floor.id // (n + 1), db.floor.ts / (n + 1))))
               for n in range(WRITERS)]
    highest_now = db.floor.ts
    for step in steps:
        kind = step[0]
        if kind == "tick":
            wall.value += step[1]
        elif kind == "join":
            writer = writers[step[1]]
            stamp = writer.clock.next()
            if writer.forming:
                previous = writer.forming[-1]
                assert stamp.id > previous.id and stamp.ts > previous.ts
            writer.forming.append(stamp)
        elif kind == "commit":
            writer = writers[step[1]]
            planned, writer.forming = writer.forming, []
            if not planned:
                continue
            fresh = restamp(db.floor, planned[0], len(planned))
            stamps = planned if fresh is None else fresh
            assert len(stamps) == len(planned)
            if not step[2]:
                continue  # rolled back: nothing of it is visible, the floor stays
            last = db.floor
            for stamp in stamps:
                assert stamp.id > last.id, "ids must strictly increase in commit order"
                assert stamp.ts > last.ts, "ts must strictly increase in commit order"
                assert stamp.ts > highest_now, "a stamp at or below a `now` already read"
                last = stamp
            db.committed += stamps
            db.floor = stamps[-1]  # the clock row moves to the last stamp, in the transaction
            writer.clock.raise_floor(db.floor)
        elif kind == "reopen":
            writers[step[1]] = Writer(CommitClock(db.floor))
        elif kind == "hear":
            writers[step[1]].clock.raise_floor(db.floor)
        elif kind == "now":
            now = db.floor.ts
            assert all(stamp.ts <= now for stamp in db.committed), \
                "a committed message above `now`: the truncated-batch rule needs it at or below"
            highest_now = max(highest_now, now)


def test_restamp_keeps_stamps_above_the_floor_and_replaces_those_at_or_below_it():
    assert restamp(Stamp(5, 10.0), Stamp(6, 10.5), 3) is None
    fresh = restamp(Stamp(9, 20.0), Stamp(6, 10.5), 3)
    assert [s.id for s in fresh] == [10, 11, 12]
    assert all(s.ts > 20.0 for s in fresh) and fresh == sorted(fresh, key=lambda s: s.ts)
    # An id above the floor is not enough: the ts must be above it too (and the other way).
    assert restamp(Stamp(5, 20.0), Stamp(6, 10.5), 1) is not None
    assert restamp(Stamp(9, 10.0), Stamp(6, 10.5), 1) is not None
