"""The receive rule (busd/receive.py), in-process: the cursor never skips, never repeats.

A model of what PROTOCOLS.md §1 promises -- every message committed later has a larger
ts than any `now` or ts handed out before, and a batch cut short by `max` answers a
`now` no larger than its last message -- against which a reader that handles each
reply and then calls Cursor.advance must see every message exactly once, in order.
"""
from __future__ import annotations

import math
import threading

from hypothesis import given, settings, strategies as st

from busd import jqtext
from busd.client import BusClientError
from busd.receive import Backoff, Cursor, CursorFile, follow

FINITE = st.floats(min_value=0, max_value=1e11, allow_nan=False, allow_infinity=False)
NOT_A_TS = st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.just(math.nan),
                     st.just(math.inf), st.just(-math.inf))


def batch_of(ts_values, now) -> dict:
    return {"messages": [{"id": i, "ts": ts} for i, ts in enumerate(ts_values)], "now": now}


@given(FINITE, st.lists(st.one_of(FINITE, NOT_A_TS), max_size=8), st.one_of(FINITE, NOT_A_TS))
def test_advance_is_the_max_of_since_the_finite_ts_and_a_finite_now(since, ts_values, now):
    cursor = Cursor(since)
    batch = batch_of(ts_values, now)
    fresh = cursor.fresh(batch)
    moved = cursor.advance(batch)
    numbers = [v for v in [since, now, *ts_values]
               if isinstance(v, float) and math.isfinite(v)]
    assert cursor.since == max(numbers)
    assert moved == (cursor.since != since)
    assert fresh == [m for m in batch["messages"] if isinstance(m["ts"], float)
                     and math.isfinite(m["ts"]) and m["ts"] > since]
    assert cursor.fresh(batch) == []          # handled once: never again


@given(st.lists(st.one_of(st.none(), st.integers(), st.text(max_size=2), st.lists(st.none()),
                          st.dictionaries(st.text(max_size=2), st.none(), max_size=2)),
                max_size=4))
def test_a_reply_that_is_not_a_batch_moves_nothing(replies):
    cursor = Cursor(5.0)
    for reply in replies:
        assert cursor.fresh(reply) == [] and cursor.advance(reply) is False
    assert cursor.since == 5.0


@st.composite
def bus_histories(draw):
    """Commits (strictly increasing ts) interleaved with polls (a max, and a `now` the
    server may answer: any clock value not past the next commit)."""
    gaps = draw(st.lists(st.floats(min_value=1e-6, max_value=10), min_size=1, max_size=60))
    commits, ts = [], 1.5e9
    for gap in gaps:
        ts += gap
        commits.append(ts)
    polls = draw(st.lists(st.tuples(st.integers(0, len(commits)), st.integers(1, 7),
                                    st.floats(0, 1)), min_size=1, max_size=40))
    return commits, sorted(polls)


@settings(max_examples=300)
@given(bus_histories())
def test_a_reader_sees_every_message_once_in_order(history):
    commits, polls = history
    cursor, seen = Cursor(0.0), []

    def serve(committed: int, limit: int, where: float) -> dict:
        visible = [ts for ts in commits[:committed] if ts > cursor.since]
        batch = visible[:limit]
        if len(visible) > limit:
            now = batch[-1]                     # cut short: now is its last message
        else:
            # The clock: at least the newest commit, never past the next one.
            low = commits[committed - 1] if committed else 0.0
            high = commits[committed] if committed < len(commits) else low + 1
            now = max(low, min(low + (high - low) * where, math.nextafter(high, 0)))
        return batch_of(batch, now)

    for committed, limit, where in polls + [(len(commits), len(commits) + 1, 0.0)]:
        reply = serve(committed, limit, where)
        seen += [m["ts"] for m in cursor.fresh(reply)]
        cursor.advance(reply)
    while True:  # drain what the last polls left
        reply = serve(len(commits), 7, 0.0)
        if not cursor.fresh(reply):
            break
        seen += [m["ts"] for m in cursor.fresh(reply)]
        cursor.advance(reply)
    assert seen == commits


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_a_cursor_file_reads_back_the_number_it_saved(tmp_path_factory, value):
    path = tmp_path_factory.mktemp("cursor") / "c"
    CursorFile(str(path)).save(value)
    assert CursorFile(str(path)).load() == value
    assert path.read_text() == jqtext.number(value) + "\n"


def test_a_cursor_file_that_holds_no_number_is_refused(tmp_path):
    for text in ("12abc\n", "nan\n", "inf\n"):
        (tmp_path / "c").write_text(text)
        try:
            CursorFile(str(tmp_path / "c")).load()
        except ValueError as exc:
            assert "not a cursor" in str(exc)
        else:
            raise AssertionError(f"{text!r} was read as a cursor")
    assert CursorFile(str(tmp_path / "missing")).load(7.0) == 7.0


def test_backoff_doubles_to_its_cap_takes_a_longer_hint_and_resets():
    backoff = Backoff(0.5, 4.0)
    assert [backoff.delay() for _ in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert backoff.delay(9.0) == 9.0
    backoff.reset()
    assert backoff.delay() == 0.5


def test_follow_retries_what_is_transient_and_raises_a_refusal():
    stop = threading.Event()
    replies = [BusClientError("down", transient=True), BusClientError("slow", transient=True,
                                                                       retry_after=0.0),
               {"messages": [], "now": 1.0}, BusClientError("no", status=403)]
    reported = []

    def poll():
        reply = replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    got = []
    try:
        for reply in follow(poll, stop, backoff=Backoff(0.001, 0.002),
                            on_error=lambda exc, delay: reported.append((str(exc), delay))):
            got.append(reply)
    except BusClientError as exc:
        assert str(exc) == "no"
    else:
        raise AssertionError("a refusal must be raised")
    assert got == [{"messages": [], "now": 1.0}]
    assert reported == [("down", 0.001), ("slow", 0.002)]
    # With `once`, a transient error is raised too.
    replies[:] = [BusClientError("down", transient=True)]
    try:
        list(follow(poll, stop, once=True))
    except BusClientError as exc:
        assert exc.transient
    else:
        raise AssertionError("once: every error is raised")
