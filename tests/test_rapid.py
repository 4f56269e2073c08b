"""The rapid protocol (PROTOCOLS.md §1) against a real server over loopback."""
from __future__ import annotations

import threading
import time

from harness.bus import wait_until

WAKEUPS = "agent_bus_long_poll_wakeups_total"


def test_send_reply_shape(server, names):
    a, b = names("a", "b")
    reply = server.post("/send", json={"from": a, "to": b, "msg": "hello"})
    assert reply.status_code == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    body = reply.json()
    assert body["ok"] is True
    assert isinstance(body["ts"], float)
    assert body["channel"] == "default"
    assert isinstance(body["id"], int)


def test_recv_reply_shape_and_fields(server, names):
    a, b = names("a", "b")
    ack = server.send(a, b, "line one\nline two ✓")
    body = server.get(f"/recv?to={b}&since=0").json()
    assert set(body) == {"messages", "now"}
    assert isinstance(body["now"], float)
    [message] = body["messages"]
    assert message["ts"] == ack["ts"]
    assert message["from"] == a
    assert message["msg"] == "line one\nline two ✓"
    assert message["id"] == ack["id"] and message["to"] == b and message["channel"] == "default"


def test_since_filters_and_absent_since_is_zero(server, names):
    a, b = names("a", "b")
    first = server.send(a, b, "1")
    second = server.send(a, b, "2")
    everything = server.get(f"/recv?to={b}").json()["messages"]
    assert [m["msg"] for m in everything] == ["1", "2"]
    after_first = server.get(f"/recv?to={b}&since={first['ts']!r}").json()["messages"]
    assert [m["ts"] for m in after_first] == [second["ts"]]


def test_ts_strictly_increasing_and_now_not_behind(server, names):
    a, b = names("a", "b")
    acks = [server.send(a, b, str(i)) for i in range(20)]
    stamps = [ack["ts"] for ack in acks]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    now = server.get(f"/recv?to={b}&since=0").json()["now"]
    assert now >= stamps[-1]
    # Anything sent after a reply lands above that reply's now.
    later = server.send(a, b, "later")
    assert later["ts"] > now


def test_channel_isolation_and_channel_less_recv_is_default(server, names):
    a, b, other = names("a", "b", "other")
    server.send(a, b, "on default")
    server.send(a, b, "on other", channel=other)
    default = server.get(f"/recv?to={b}").json()["messages"]
    assert [m["msg"] for m in default] == ["on default"]
    explicit = server.get(f"/recv?to={b}&channel=default").json()["messages"]
    assert [m["msg"] for m in explicit] == ["on default"]
    on_other = server.get(f"/recv?to={b}&channel={other}").json()["messages"]
    assert [m["msg"] for m in on_other] == ["on other"]
    assert on_other[0]["channel"] == other


def test_channel_star_reads_every_channel_in_order(server, names):
    a, b, c1, c2 = names("a", "b", "c1", "c2")
    server.send(a, b, "x", channel=c1)
    server.send(a, b, "y", channel=c2)
    server.send(a, b, "z")
    got = server.get(f"/recv?to={b}&channel=*").json()["messages"]
    assert [(m["msg"], m["channel"]) for m in got] == [("x", c1), ("y", c2), ("z", "default")]


def test_broadcast_reaches_every_recipient_on_its_channel_only(server, names):
    a, b, c, ch, elsewhere = names("a", "b", "c", "ch", "elsewhere")
    server.send(a, "*", "all hands", channel=ch)
    for recipient in (b, c):
        got = server.get(f"/recv?to={recipient}&channel={ch}").json()["messages"]
        assert [(m["msg"], m["to"]) for m in got] == [("all hands", "*")]
    assert server.get(f"/recv?to={b}&channel={elsewhere}").json()["messages"] == []
    # The sender does not receive its own broadcast.
    assert server.get(f"/recv?to={a}&channel={ch}").json()["messages"] == []


def test_idempotent_retry_stores_one_message(server, names):
    a, b = names("a", "b")
    first = server.send(a, b, "once", key="k-1")
    again = server.send(a, b, "once", key="k-1")
    assert again["id"] == first["id"] and again["ts"] == first["ts"]
    assert again.get("duplicate") is True
    got = server.get(f"/recv?to={b}").json()["messages"]
    assert [m["msg"] for m in got] == ["once"]
    # The same key from another sender is a different message.
    c, = names("c")
    other = server.send(c, b, "mine", key="k-1")
    assert other["id"] != first["id"]


def test_meta_is_stored_and_returned(server, names):
    a, b = names("a", "b")
    server.send(a, b, "with meta", meta={"kind": "note", "n": 3, "ok": True, "none": None})
    [message] = server.get(f"/recv?to={b}").json()["messages"]
    assert message["meta"] == {"kind": "note", "n": 3, "ok": True, "none": None}


def test_max_truncates_and_now_never_passes_the_last_message(server, names):
    a, b = names("a", "b")
    acks = [server.send(a, b, str(i)) for i in range(7)]
    body = server.get(f"/recv?to={b}&since=0&max=3").json()
    assert [m["msg"] for m in body["messages"]] == ["0", "1", "2"]
    assert body["now"] == acks[2]["ts"]
    # A client moving its cursor to max(ts, now) still gets the rest.
    cursor = max(body["now"], body["messages"][-1]["ts"])
    rest = server.get(f"/recv?to={b}&since={cursor!r}&max=100").json()["messages"]
    assert [m["msg"] for m in rest] == ["3", "4", "5", "6"]


def test_block_wakes_on_commit_not_on_a_timer(server, names):
    a, b = names("a", "b")
    since = server.get("/healthz").json()["now"]
    result = {}

    def receive():
        started = time.monotonic()
        result["body"] = server.get(f"/recv?to={b}&since={since!r}&block=true").json()
        result["elapsed"] = time.monotonic() - started

    receiver = threading.Thread(target=receive)
    receiver.start()
    server.wait_parked()
    woken = server.metric(WAKEUPS, reason="commit")
    server.send(a, b, "wake up")
    receiver.join(10)
    assert [m["msg"] for m in result["body"]["messages"]] == ["wake up"]
    # Woken by the commit, far sooner than the 2 s hold this test server uses.
    assert server.metric(WAKEUPS, reason="commit") == woken + 1
    assert result["elapsed"] < 1.5


def test_block_holds_then_returns_empty(server, names):
    b, = names("b")
    since = server.get("/healthz").json()["now"]
    timed_out = server.metric(WAKEUPS, reason="timeout")
    started = time.monotonic()
    body = server.get(f"/recv?to={b}&since={since!r}&block=true").json()
    elapsed = time.monotonic() - started
    assert body["messages"] == []
    assert body["now"] >= since
    assert 1.5 < elapsed < 5  # the test server's hold is 2 s
    assert server.metric(WAKEUPS, reason="timeout") == timed_out + 1


def test_block_not_woken_by_other_recipients_or_channels(server, names):
    """A poll woken for nothing looks again and parks again, and its client sees nothing
    of it: the server's count of wake-ups is what tells."""
    a, b, c, ch = names("a", "b", "c", "ch")
    since = server.get("/healthz").json()["now"]
    result = {}

    def receive():
        result["body"] = server.get(f"/recv?to={b}&since={since!r}&block=true").json()

    receiver = threading.Thread(target=receive)
    receiver.start()
    server.wait_parked()
    woken = server.metric(WAKEUPS, reason="commit")
    server.send(a, c, "not for b")
    server.send(a, b, "for b elsewhere", channel=ch)
    # A send is answered after its commit woke the polls it concerns: a wake-up of
    # b's poll by either would be counted by now.
    assert server.metric(WAKEUPS, reason="commit") == woken
    mine = server.send(a, b, "for b")
    receiver.join(10)
    assert [m["id"] for m in result["body"]["messages"]] == [mine["id"]]
    assert server.metric(WAKEUPS, reason="commit") == woken + 1


def test_inbox_counts_each_queue_read_or_not_and_the_roster_what_is_unread(server, names):
    a, b, ch = names("a", "b", "ch")

    def roster_pending() -> dict:
        return next((entry["pending"] for entry in server.get("/agents").json()
                     if entry["name"] == b), {})

    server.send(a, b, "1", channel=ch)
    server.send(a, b, "2", channel=ch)
    server.send(a, "*", "all hands", channel=ch)
    body = server.get("/inbox").json()
    assert set(body) == {"recipients", "now"}
    # As the reference server counts: a queue per recipient, a broadcast once under "*".
    assert body["recipients"][ch] == {b: 2, "*": 1}
    assert roster_pending() == {ch: 2}
    # b reads everything: the queues stay as long (reading consumes nothing) ...
    got = server.get(f"/recv?to={b}&channel={ch}&since=0").json()["messages"]
    assert len(got) == 3
    server.get(f"/recv?to={b}&channel={ch}&since={got[-1]['ts']!r}")
    assert server.get("/inbox").json()["recipients"][ch] == {b: 2, "*": 1}
    # ... while the roster's pending count, what b has not fetched, drops to nothing once
    # the acknowledgement is stored (it rides a group commit: on PostgreSQL after the
    # group's sends are answered, so a later send does not prove it is there yet).
    server.send(a, b + "x", "nudge the writer", channel=ch)
    wait_until(lambda: ch not in roster_pending(), timeout=5, what="b's pending count to go")


def test_healthz_shape(server):
    body = server.get("/healthz").json()
    assert body["ok"] is True and isinstance(body["now"], float)


def test_names_arrive_raw_in_the_query_string(server, names):
    a, b = names("a.b_c", "d-e.f")
    server.send(a, b, "raw")
    # Reference clients paste names unencoded; these characters need no encoding.
    got = server.get(f"/recv?to={b}&since=0&block=false&channel=default").json()
    assert [m["from"] for m in got["messages"]] == [a]


def test_user_agent_mozilla_is_welcome(server, names):
    a, b = names("a", "b")
    reply = server.post("/send", json={"from": a, "to": b, "msg": "hi"},
                        headers={"User-Agent": "Mozilla/5.0"})
    assert reply.status_code == 200


def test_oversize_message_is_413(server, names):
    a, b = names("a", "b")
    reply = server.post("/send", json={"from": a, "to": b, "msg": "x" * (64 * 1024 + 1)})
    assert reply.status_code == 413
    assert reply.json()["code"] == 41302
    exactly = server.post("/send", json={"from": a, "to": b, "msg": "x" * (64 * 1024)})
    assert exactly.status_code == 200
