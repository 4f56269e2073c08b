"""Receipt states (busd/receipts.py) as properties: a recipient's state only moves on as
its cursors do; a broadcast's readers are who polled its channel, and its state is the
least advanced of theirs; what other channels and other agents did changes nothing.

Fast tier: pure logic in-process (`PY -m pytest tests/fast`).
"""
from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from busd.model import BROADCAST, StoredMessage
from busd.receipts import (DELIVERED, FILED, ORDER, QUEUED, READ, ReceiptRow, WatermarkRow,
                           message_states)

AGENTS = st.sampled_from(["ann", "bob", "cy", "dee"])
CHANNELS = st.sampled_from(["default", "ops"])
# Whole numbers, so that cursors often sit exactly on a message's ts. A cursor at 0 has
# passed nothing; a message's ts is a time, never 0.
STAMPS = st.integers(0, 8).map(float)
MESSAGE_STAMPS = st.integers(1, 8).map(float)

MESSAGES = st.lists(st.builds(StoredMessage, id=st.integers(1, 10), ts=MESSAGE_STAMPS,
                              channel=CHANNELS, sender=AGENTS, to=AGENTS | st.just(BROADCAST),
                              body=st.just("")), max_size=6)
ROWS = st.lists(st.builds(ReceiptRow, agent=AGENTS, channel=CHANNELS | st.just("*"),
                          delivered=STAMPS, filed=STAMPS), max_size=8)
# One watermark per agent and channel, as the store keeps them.
MARKS = st.lists(st.builds(WatermarkRow, agent=AGENTS, channel=CHANNELS,
                           last_id=st.integers(0, 10)), max_size=4,
                 unique_by=lambda mark: (mark.agent, mark.channel))


def advanced(rows: list[ReceiptRow], marks: list[WatermarkRow], steps: list[tuple[int, int]],
             more_rows: list[ReceiptRow], more_marks: list[WatermarkRow]):
    """The same readers later: every cursor at or past where it was, and perhaps more."""
    steps = steps + [(0, 0)] * (len(rows) + len(marks))
    later_rows = [dataclasses.replace(row, delivered=row.delivered + up, filed=row.filed + on)
                  for row, (up, on) in zip(rows, steps)]
    later_marks = [dataclasses.replace(mark, last_id=mark.last_id + up)
                   for mark, (up, _) in zip(marks, steps)]
    known = {(mark.agent, mark.channel) for mark in marks}
    new_marks = [mark for mark in more_marks if (mark.agent, mark.channel) not in known]
    return later_rows + more_rows, later_marks + new_marks


@settings(max_examples=300, deadline=None)
@given(messages=MESSAGES, rows=ROWS, marks=MARKS,
       steps=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), max_size=8),
       more_rows=ROWS, more_marks=MARKS)
def test_a_recipients_state_never_goes_back_as_its_cursors_move_on(messages, rows, marks, steps,
                                                                   more_rows, more_marks):
    before = message_states(messages, rows, marks)
    after = message_states(messages, *advanced(rows, marks, steps, more_rows, more_marks))
    for earlier, later in zip(before, after):
        # A broadcast may gain readers (someone new polled its channel); none is lost.
        assert set(earlier["recipients"]) <= set(later["recipients"])
        for name, state in earlier["recipients"].items():
            assert ORDER[later["recipients"][name]] >= ORDER[state], (name, earlier, later)


@settings(max_examples=300, deadline=None)
@given(messages=MESSAGES, rows=ROWS, marks=MARKS)
def test_a_broadcasts_state_is_the_least_advanced_of_its_readers(messages, rows, marks):
    for message, shown in zip(messages, message_states(messages, rows, marks)):
        assert (shown["id"], shown["ts"], shown["from"], shown["to"], shown["channel"]) == (
            message.id, message.ts, message.sender, message.to, message.channel)
        recipients = shown["recipients"]
        if message.to != BROADCAST:
            assert list(recipients) == [message.to]
        else:
            # Its readers: whoever polled its channel (or all channels), but its sender.
            polled = {r.agent for r in rows if r.channel in (message.channel, "*")}
            read = {w.agent for w in marks if w.channel == message.channel}
            assert set(recipients) == (polled | read) - {message.sender}
            # Each reader is where the same message addressed to it alone would be.
            for name, state in recipients.items():
                alone = dataclasses.replace(message, to=name)
                [addressed] = message_states([alone], rows, marks)
                assert addressed["recipients"] == {name: state}
        least = min(recipients.values(), key=ORDER.__getitem__, default=QUEUED)
        assert shown["state"] == least


@settings(max_examples=300, deadline=None)
@given(messages=MESSAGES, rows=ROWS, marks=MARKS, elsewhere=ROWS, other_marks=MARKS)
def test_other_channels_change_nothing(messages, rows, marks, elsewhere, other_marks):
    noise = [dataclasses.replace(row, channel="elsewhere") for row in elsewhere]
    other = [dataclasses.replace(mark, channel="elsewhere") for mark in other_marks]
    assert message_states(messages, rows + noise, marks + other) == message_states(
        messages, rows, marks)


@settings(max_examples=300, deadline=None)
@given(rows=ROWS, marks=MARKS, ts=MESSAGE_STAMPS, message_id=st.integers(1, 10),
       channel=CHANNELS, to=AGENTS)
def test_an_addressed_message_is_where_its_recipients_cursors_put_it(rows, marks, ts,
                                                                     message_id, channel, to):
    message = StoredMessage(id=message_id, ts=ts, channel=channel, sender="boss", to=to, body="")
    [shown] = message_states([message], rows, marks)
    mine = [r for r in rows if r.agent == to and r.channel in (channel, "*")]
    read = [w for w in marks if w.agent == to and w.channel == channel]
    # filed: a filed cursor passed it; delivered: a fetch or a cursor passed it, or its
    # el-ipc watermark did; else queued.
    if any(r.filed >= ts for r in mine):
        assert shown["state"] == FILED
    elif any(r.delivered >= ts for r in mine) or any(w.last_id >= message_id for w in read):
        assert shown["state"] == DELIVERED
    else:
        assert shown["state"] == QUEUED
    # Nobody else's cursors count.
    strangers = [dataclasses.replace(r, agent="zed") for r in rows]
    assert message_states([message], mine + strangers, marks) == [shown]


READS = st.dictionaries(st.integers(1, 10), st.sets(AGENTS, max_size=3), max_size=5)


@settings(max_examples=300, deadline=None)
@given(messages=MESSAGES, rows=ROWS, marks=MARKS, reads=READS)
def test_read_is_a_recipients_own_report_and_comes_after_every_other_state(messages, rows,
                                                                           marks, reads):
    """A recipient that reported reading a message is `read` whatever its cursors say; one
    that did not is as before; the sender of a broadcast never becomes its reader; and the
    message is `read` only when all its recipients are."""
    before = message_states(messages, rows, marks)
    after = message_states(messages, rows, marks, reads)
    for message, earlier, later in zip(messages, before, after):
        read_by = reads.get(message.id, set())
        assert message.sender not in later["recipients"] or message.to != BROADCAST
        for name, state in later["recipients"].items():
            if name in read_by:
                assert state == READ
            else:
                assert state == earlier["recipients"][name]
        if later["recipients"]:
            everyone = all(s == READ for s in later["recipients"].values())
            assert (later["state"] == READ) == everyone
