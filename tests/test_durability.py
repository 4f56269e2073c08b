"""Nothing acknowledged is lost, nothing is delivered twice: load, crashes, restarts."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import threading
import time

import requests

from busd.client import BusClient
from busd.receive import CursorFile, listen
from harness.bus import BusServer, SendBurst, agent_bus_cmd, repo_env, wait_until


class CursorReceiver(threading.Thread):
    """A receiver that follows the rapid client rule: cursor = max(max ts, now)."""

    def __init__(self, url: str, name: str, expected: int, timeout: float = 60):
        super().__init__(name=f"receiver-{name}")
        self.url, self.to, self.expected, self.timeout = url, name, expected, timeout
        self.received: list[dict] = []

    def run(self) -> None:
        session = requests.Session()
        since = 0.0
        deadline = time.monotonic() + self.timeout
        while len(self.received) < self.expected and time.monotonic() < deadline:
            body = session.get(f"{self.url}/recv", params={
                "to": self.to, "since": repr(since), "block": "true"}, timeout=40).json()
            self.received.extend(body["messages"])
            stamps = [m["ts"] for m in body["messages"]]
            since = max([since, body["now"], *stamps])
        session.close()


def test_8_concurrent_senders_2000_messages_received_exactly_once_in_order(server, names):
    to, = names("sink")
    senders = [f"{to}-s{i}" for i in range(8)]
    acks: dict[str, list[dict]] = {s: [] for s in senders}
    receiver = CursorReceiver(server.url, to, expected=2000)
    receiver.start()

    def send_all(sender: str) -> None:
        with requests.Session() as session:
            for i in range(250):
                reply = session.post(f"{server.url}/send", json={
                    "from": sender, "to": to, "msg": f"{sender}:{i}"}, timeout=30)
                assert reply.status_code == 200
                acks[sender].append(reply.json())

    threads = [threading.Thread(target=send_all, args=(s,)) for s in senders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    receiver.join(90)

    got = receiver.received
    assert len(got) == 2000
    assert len({m["id"] for m in got}) == 2000, "a message was delivered twice"
    stamps = [m["ts"] for m in got]
    assert stamps == sorted(stamps) and len(set(stamps)) == 2000
    acked_ids = {a["id"] for per_sender in acks.values() for a in per_sender}
    assert {m["id"] for m in got} == acked_ids
    # Each sender's own messages arrive in the order it sent them.
    for sender in senders:
        mine = [m["msg"] for m in got if m["from"] == sender]
        assert mine == [f"{sender}:{i}" for i in range(250)]


def test_kill_9_during_a_burst_loses_no_acknowledged_message(tmp_path):
    with BusServer(tmp_path / "bus.db") as bus:
        burst = SendBurst(lambda sender: bus.url, "survivor", [f"s{i}" for i in range(4)]).start()
        acked = burst.acked
        wait_until(lambda: len(acked) >= 400, timeout=30, what="400 acknowledged sends")
        bus.kill()
        burst.stop()

        bus.start()
        stored = []
        since = 0.0
        while True:
            body = bus.get(f"/recv?to=survivor&since={since!r}&max=1000").json()
            if not body["messages"]:
                break
            stored.extend(body["messages"])
            since = body["messages"][-1]["ts"]
        stored_ids = {m["id"] for m in stored}
        missing = [a for a in acked if a["id"] not in stored_ids]
        assert not missing, f"{len(missing)} acknowledged messages lost"
        # New sends after the restart land above everything from before.
        after = bus.send("s0", "survivor", "after restart")
        assert after["ts"] > max(m["ts"] for m in stored)
        assert after["id"] > max(stored_ids)
        assert bus.stop() == 0


def test_idempotency_key_survives_a_restart(tmp_path):
    with BusServer(tmp_path / "bus.db") as bus:
        first = bus.send("a", "b", "x", key="retry-me")
        bus.kill()
        bus.start()
        again = bus.send("a", "b", "x", key="retry-me")
        assert again["id"] == first["id"] and again["duplicate"] is True
        assert bus.stop() == 0


def test_listen_never_skips_or_repeats_across_a_server_restart(tmp_path):
    with BusServer(tmp_path / "bus.db", "--hold", "1") as bus:
        client = BusClient(bus.url)
        cursor = CursorFile(str(tmp_path / "cursor"))
        stop = threading.Event()
        got: list[dict] = []

        def follow() -> None:
            for message in listen(client, "follower", cursor=cursor, stop=stop):
                got.append(message)

        follower = threading.Thread(target=follow)
        follower.start()
        for i in range(30):
            bus.send("a", "follower", f"before {i}")
        wait_until(lambda: len(got) >= 30, what="the first 30 messages")
        bus.restart()
        for i in range(30):
            bus.send("a", "follower", f"after {i}")
        wait_until(lambda: len(got) >= 60, timeout=30, what="all 60 messages")
        stop.set()
        follower.join(10)
        client.close()
        assert [m["msg"] for m in got] == [f"before {i}" for i in range(30)] + \
                                          [f"after {i}" for i in range(30)]
        assert cursor.load() >= got[-1]["ts"]
        assert bus.stop() == 0


def test_healthz_answers_within_3s_of_launch_and_sigterm_answers_parked_polls(tmp_path):
    started = time.monotonic()
    bus = BusServer(tmp_path / "bus.db").start()
    assert bus.get("/healthz").status_code == 200
    assert time.monotonic() - started < 3.0

    answers = []

    def park() -> None:
        answers.append(bus.get("/recv?to=parked&since=0&block=true"))

    parked = [threading.Thread(target=park) for _ in range(5)]
    for thread in parked:
        thread.start()
    bus.wait_parked(5)
    stopping = time.monotonic()
    pid = bus.pid
    code = bus.stop(timeout=5)
    for thread in parked:
        thread.join(5)
    assert code == 0, f"server {pid} exited {code}"
    assert time.monotonic() - stopping < 5.0
    assert [a.status_code for a in answers] == [200] * 5
    assert all(a.json()["messages"] == [] for a in answers)


def test_default_db_is_created_0600_in_the_state_dir(tmp_path):
    env = repo_env(XDG_STATE_HOME=str(tmp_path / "state"))
    proc = subprocess.Popen(agent_bus_cmd("serve", "--port", "0"), env=env,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stderr.readline()
        assert "listening on" in line
        db = tmp_path / "state" / "agent-bus" / "bus.db"
        assert db.exists()
        assert stat.S_IMODE(os.stat(db).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(db.parent).st_mode) == 0o700
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        proc.stderr.close()


def test_refuses_a_non_loopback_address_without_auth(tmp_path):
    result = subprocess.run(agent_bus_cmd("serve", "--host", "0.0.0.0", "--port", "0",
                                          "--db", str(tmp_path / "bus.db")),
                            env=repo_env(), capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0 without authentication" in result.stderr


def test_a_second_server_on_the_same_database_refuses_to_start(tmp_path):
    with BusServer(tmp_path / "bus.db") as bus:
        result = subprocess.run(agent_bus_cmd("serve", "--port", "0", "--db", bus.db),
                                env=repo_env(), capture_output=True, text=True, timeout=20)
        assert result.returncode == 2
        assert "in use by another agent-bus server" in result.stderr
        assert bus.get("/healthz").status_code == 200
        assert bus.stop() == 0


def test_concurrent_sends_with_one_key_store_one_message(server, names):
    a, b = names("a", "b")
    replies: list[dict] = []

    def send() -> None:
        with requests.Session() as session:
            reply = session.post(f"{server.url}/send", json={
                "from": a, "to": b, "msg": "only once", "key": "same"}, timeout=10)
            replies.append(reply.json())

    threads = [threading.Thread(target=send) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert len({r["id"] for r in replies}) == 1
    assert sum(1 for r in replies if not r.get("duplicate")) == 1
    assert len(server.get(f"/recv?to={b}").json()["messages"]) == 1
