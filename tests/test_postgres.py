"""Several bus servers on one PostgreSQL database: they behave as one bus.

Each test starts real `agent-bus serve` replicas on a fresh database. The
protocol suite itself runs on PostgreSQL through the parametrized `server`
fixture; this module covers what only replicas can show.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
from contextlib import ExitStack

import pytest
import requests

from harness.bus import BusServer, SendBurst, agent_bus_cmd, park, repo_env, wait_until
from harness.postgres import PrivatePostgres


def no_tracebacks(bus: BusServer) -> None:
    assert not [line for line in bus.log if "Traceback" in line], "".join(bus.log)


@pytest.fixture
def replicas(postgres_db):
    """Two servers, A and B, on one fresh database; a factory for more options."""
    with ExitStack() as stack:
        def start(*extra: str) -> BusServer:
            return stack.enter_context(BusServer(postgres_db, "--hold", "10", *extra))

        yield start
        # ExitStack kills what is still running; a clean stop is checked here.


def stop_cleanly(*servers: BusServer) -> None:
    for bus in servers:
        assert bus.stop() == 0
        no_tracebacks(bus)


def test_a_send_through_one_replica_wakes_receivers_parked_on_the_other(replicas, names):
    a, b = replicas(), replicas()
    sender, receiver, channel = names("sender", "receiver", "room")
    since = b.get("/healthz").json()["now"]
    rapid = park(b, f"/recv?to={receiver}&since={since!r}&block=true")
    elipc = park(b, f"/messages?channel={channel}&agent={receiver}&wait=true")

    sent_at = time.monotonic()
    ack = a.send(sender, receiver, "across")
    a.post("/send", json={"channel": channel, "sender": sender, "content": "to the room"})
    rapid.join(15)
    elipc.join(15)

    assert [m["id"] for m in rapid.body["messages"]] == [ack["id"]]
    assert [m["content"] for m in elipc.body] == ["to the room"]
    # Woken by the commit, not by the 10 s hold running out.
    assert rapid.answered_at - sent_at < 2 and elipc.answered_at - sent_at < 2
    stop_cleanly(a, b)


class AlternatingReceiver(threading.Thread):
    """A rapid receiver that asks each replica in turn, with the client's cursor rule:
    cursor = max(max ts of the batch, now), default batch size."""

    def __init__(self, urls: list[str], name: str, expected: int, timeout: float = 90):
        super().__init__(name=f"receiver-{name}")
        self.urls, self.to, self.expected, self.timeout = urls, name, expected, timeout
        self.received: list[dict] = []

    def run(self) -> None:
        sessions = [requests.Session() for _ in self.urls]
        since = 0.0
        turn = 0
        deadline = time.monotonic() + self.timeout
        while len(self.received) < self.expected and time.monotonic() < deadline:
            body = sessions[turn].get(f"{self.urls[turn]}/recv", params={
                "to": self.to, "since": repr(since), "block": "true"}, timeout=40).json()
            self.received.extend(body["messages"])
            since = max([since, body["now"], *(m["ts"] for m in body["messages"])])
            turn = (turn + 1) % len(self.urls)
        for session in sessions:
            session.close()


def test_senders_on_both_replicas_and_an_alternating_receiver_lose_and_repeat_nothing(
        replicas, names):
    a, b = replicas(), replicas()
    to, = names("sink")
    senders = [(f"{to}-a{i}", a) for i in range(4)] + [(f"{to}-b{i}", b) for i in range(4)]
    acks: dict[str, list[dict]] = {name: [] for name, _ in senders}
    receiver = AlternatingReceiver([a.url, b.url], to, expected=2000)
    receiver.start()

    def send_all(sender: str, bus: BusServer) -> None:
        with requests.Session() as session:
            for i in range(250):
                reply = session.post(f"{bus.url}/send", json={
                    "from": sender, "to": to, "msg": f"{sender}:{i}"}, timeout=30)
                assert reply.status_code == 200, reply.text
                acks[sender].append(reply.json())

    threads = [threading.Thread(target=send_all, args=pair) for pair in senders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    receiver.join(120)

    got = receiver.received
    assert len(got) == 2000
    assert len({m["id"] for m in got}) == 2000, "a message was delivered twice"
    stamps, ids = [m["ts"] for m in got], [m["id"] for m in got]
    assert stamps == sorted(stamps) and len(set(stamps)) == 2000
    assert ids == sorted(ids), "ids must follow ts: both are given in commit order"
    assert {m["id"] for m in got} == {a["id"] for per in acks.values() for a in per}
    for sender, _ in senders:
        mine = [m["msg"] for m in got if m["from"] == sender]
        assert mine == [f"{sender}:{i}" for i in range(250)]
    stop_cleanly(a, b)


def test_kill_9_of_one_replica_during_a_burst_loses_no_acknowledged_message(replicas, names):
    a, b = replicas(), replicas()
    to, = names("survivor")
    senders = [f"s{i}" for i in range(6)]
    burst = SendBurst(lambda sender: (a if senders.index(sender) < 4 else b).url, to, senders,
                      timeout=10).start()
    acked = burst.acked
    wait_until(lambda: len(acked) >= 600, timeout=30, what="600 acknowledged sends")
    a.kill()
    burst.stop()

    stored_ids = set()
    since = 0.0
    while True:
        body = b.get(f"/recv?to={to}&since={since!r}&max=1000").json()
        if not body["messages"]:
            break
        stored_ids.update(m["id"] for m in body["messages"])
        since = body["messages"][-1]["ts"]
    missing = [ack for ack in acked if ack["id"] not in stored_ids]
    assert not missing, f"{len(missing)} acknowledged messages lost"
    # B goes on stamping above everything A wrote.
    after = b.send("s0", to, "after the crash")
    assert after["ts"] > since and after["id"] > max(stored_ids)
    stop_cleanly(b)


def test_idempotency_keys_watermarks_and_tokens_are_shared(replicas, names, postgres_db):
    a, b = replicas(), replicas()
    sender, reader, channel = names("sender", "reader", "room")

    first = a.send(sender, reader, "once", key="k-1")
    again = b.send(sender, reader, "once", key="k-1")
    assert (again["id"], again["ts"], again.get("duplicate")) == (first["id"], first["ts"], True)

    for text in ("one", "two"):
        a.post("/send", json={"channel": channel, "sender": sender, "content": text})
    got = a.get(f"/messages?channel={channel}&agent={reader}").json()
    assert [m["content"] for m in got] == ["one", "two"]
    assert b.get(f"/messages?channel={channel}&agent={reader}").json() == []

    def manage(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run(agent_bus_cmd("token", *args, "--db", postgres_db),
                              capture_output=True, text=True, env=repo_env(), timeout=30)
        assert done.returncode == 0, done.stderr
        return done

    manage("create", sender)  # keeps auth on once the reader's token is revoked
    token = manage("create", reader).stdout.strip()
    bearer = {"Authorization": f"Bearer {token}"}
    for bus in (a, b):
        assert bus.get(f"/recv?to={reader}").status_code == 401
        assert bus.get(f"/recv?to={reader}", headers=bearer).status_code == 200
    manage("revoke", reader)
    for bus in (a, b):
        assert bus.get(f"/recv?to={reader}", headers=bearer).status_code == 401
    stop_cleanly(a, b)


def test_concurrent_sends_with_one_key_through_both_replicas_store_one_message(replicas, names):
    a, b = replicas(), replicas()
    sender, to = names("sender", "to")
    replies: list[dict] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def send(bus: BusServer) -> None:
        start.wait(10)
        reply = bus.post("/send", json={"from": sender, "to": to, "msg": "x", "key": "same"})
        with lock:
            replies.append(reply.json())

    threads = [threading.Thread(target=send, args=(a if i % 2 else b,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(replies) == 8, "every send must be answered"
    assert len({(r["id"], r["ts"]) for r in replies}) == 1, replies
    assert sum(1 for r in replies if not r.get("duplicate")) == 1
    assert len(a.get(f"/recv?to={to}").json()["messages"]) == 1
    stop_cleanly(a, b)


def test_retention_on_one_replica_counts_what_was_read_through_the_other(replicas, names):
    reader, sleeper = names("reader", "sleeper")
    a = replicas("--retain-per-queue", "3", "--retention-every", "0.2")
    b = replicas()
    acks = [b.send("a", reader, f"r{i}") for i in range(10)]
    unread = [b.send("a", sleeper, f"s{i}") for i in range(10)]
    b.get(f"/recv?to={reader}&since={acks[5]['ts']!r}")  # reader has read its first 6

    def reader_ids():
        return [m["id"] for m in b.get(f"/recv?to={reader}&since=0&max=100").json()["messages"]]

    wait_until(lambda: len(reader_ids()) == 4, timeout=15, what="retention to run")
    assert reader_ids() == [ack["id"] for ack in acks[6:]]
    kept = [m["id"] for m in b.get(f"/recv?to={sleeper}&since=0&max=100").json()["messages"]]
    assert kept == [ack["id"] for ack in unread]
    stop_cleanly(a, b)


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_migrate_applies_the_schema_once(store, request, tmp_path):
    from busd.store_sql import SCHEMA_VERSION
    if store == "sqlite":
        db = str(tmp_path / "bus.db")
    else:
        db = request.getfixturevalue("postgres_db")

    def migrate() -> str:
        done = subprocess.run(agent_bus_cmd("migrate", "--db", db),
                              capture_output=True, text=True, env=repo_env(), timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert f"schema version 0 -> {SCHEMA_VERSION}" in migrate()
    assert f"schema version {SCHEMA_VERSION}, already up to date" in migrate()


def test_an_unreachable_database_is_a_clear_error_at_start(tmp_path):
    done = subprocess.run(
        agent_bus_cmd("serve", "--port", "0", "--db",
                      "postgresql://someone:secret@127.0.0.1:1/nowhere"),
        capture_output=True, text=True, env=repo_env(), timeout=30)
    assert done.returncode == 2
    assert "cannot connect to PostgreSQL" in done.stderr and "Traceback" not in done.stderr
    assert "secret" not in done.stderr, "the password must not be shown"


def terminate_sessions(postgres, db_url: str, bus: BusServer) -> int:
    """Cut every database connection of one replica, as a network fault or an admin would."""
    rows = postgres.run_sql(
        db_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s", (f"agent-bus pid {bus.pid}",))
    return len(rows)


def test_a_replica_whose_connections_are_cut_reconnects_and_misses_nothing(
        replicas, names, postgres, postgres_db):
    a, b = replicas(), replicas()
    sender, receiver = names("sender", "receiver")
    since = a.get("/healthz").json()["now"]
    poll = park(a, f"/recv?to={receiver}&since={since!r}&block=true")

    assert terminate_sessions(postgres, postgres_db, a) >= 3  # writer, listener, pool
    # Sent through B while A may still be deaf: A hears of it when it reconnects.
    ack = b.send(sender, receiver, "while A was cut off")
    poll.join(15)
    assert [m["id"] for m in poll.body["messages"]] == [ack["id"]]
    wait_until(lambda: any("hearing other servers' commits again" in line for line in a.log),
               what="A to log its reconnection")
    # A's own writes and reads work again at once: its broken connections are replaced.
    assert terminate_sessions(postgres, postgres_db, a) >= 1
    assert a.post("/send", json={"from": sender, "to": receiver, "msg": "via A"}).status_code == 200
    assert len(a.get(f"/recv?to={receiver}&since=0").json()["messages"]) == 2
    stop_cleanly(a, b)


@pytest.fixture
def private_postgres():
    """A PostgreSQL of this test's own, which it may stop and start."""
    problem = PrivatePostgres.problem()
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"cannot run a private PostgreSQL: {problem} (CI is set: this test "
                        "must run)", pytrace=False)
        pytest.skip(f"cannot run a private PostgreSQL: {problem}")
    with PrivatePostgres() as postgres:
        yield postgres


def test_postgresql_stopped_and_started_under_a_parked_long_poll(private_postgres, names):
    with BusServer(private_postgres.url, "--hold", "30") as a, \
            BusServer(private_postgres.url, "--hold", "30") as b:
        sender, receiver = names("sender", "receiver")
        since = a.get("/healthz").json()["now"]
        poll = park(a, f"/recv?to={receiver}&since={since!r}&block=true")
        private_postgres.stop()
        try:
            # With the database down a send is refused at once with a 503, not a 500 or
            # a hang.
            started_at = time.monotonic()
            refused = b.post("/send", json={"from": sender, "to": receiver, "msg": "lost"},
                             timeout=30)
            assert refused.status_code == 503 and refused.json()["code"] == 50301, refused.text
            assert time.monotonic() - started_at < 10
        finally:
            private_postgres.start()
        assert poll.is_alive(), "the parked poll must stay parked while the database is away"
        ack = b.send(sender, receiver, "after the restart")
        poll.join(30)
        assert [m["id"] for m in poll.body["messages"]] == [ack["id"]]
        wait_until(lambda: any("hearing other servers' commits again" in line for line in a.log),
                   what="A to log its reconnection")
        stop_cleanly(a, b)
