"""Messages written straight into the database by another process, beside a running server
(el-ipc's CLI mode), on SQLite and on PostgreSQL.

The other process is the real `agent-bus send --db` command: it runs the bus's own send
flow (busd/service.py) on the store opened beside the server. The server must treat what
it commits like its own commits: wake the long-polls it concerns at once, and keep ids and
ts strictly increasing in commit order, so no since-cursor skips a message. And the rules
of a send hold there as over HTTP: the message rules, idempotency keys, secure mode.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time

import pytest
import requests

from busd.model import DEFAULT_MAX_MSG_BYTES, NewMessage
from busd.store_factory import open_store
from busd.store_sqlite import SQLiteStore
from harness.bus import BusServer, agent_bus_cmd, park, repo_env, wait_until
from harness.load import advanced
from harness.processes import finish


def cli_send(db: str, message: dict, **env: str) -> subprocess.CompletedProcess:
    """`agent-bus send TO --db DB --channel C --from S [--key K]`, the body on stdin."""
    args = ["send", message["to"], "--db", db, "--channel", message.get("channel", "default"),
            "--from", message["sender"]]
    if message.get("key") is not None:
        args += ["--key", message["key"]]
    return subprocess.run(agent_bus_cmd(*args), input=message["body"].encode(),
                          capture_output=True, env=repo_env(**env), timeout=60)


def write_directly(db: str, messages: list[dict], **env: str) -> list[dict]:
    """Each message through its own `agent-bus send --db` process; their acks."""
    acks = []
    for message in messages:
        done = cli_send(db, message, **env)
        assert done.returncode == 0, done.stderr.decode()
        acks.append(json.loads(done.stdout))
    return acks


class CliWriter(threading.Thread):
    """A writer sending its messages one `agent-bus send --db` process after another."""

    def __init__(self, db: str, messages: list[dict]):
        super().__init__(name="cli-writer")
        self.db, self.messages = db, messages
        self.acks: list[dict] = []
        self.failure: str | None = None

    def run(self) -> None:
        try:
            self.acks = write_directly(self.db, self.messages)
        except AssertionError as exc:
            self.failure = str(exc)


def test_a_cli_send_wakes_a_parked_recv_and_a_parked_messages_wait(server, names):
    sender, bob, room, carol = names("cli", "bob", "room", "carol")
    since = server.get("/healthz").json()["now"]
    rapid = park(server, f"/recv?to={bob}&since={since!r}&block=true")
    elipc = park(server, f"/messages?channel={room}&agent={carol}&wait=true")

    bob_sent_at = time.monotonic()
    [for_bob] = write_directly(server.db, [
        {"channel": "default", "sender": sender, "to": bob, "body": "straight in"}])
    rapid.join(10)
    room_sent_at = time.monotonic()
    [for_room] = write_directly(server.db, [
        {"channel": room, "sender": sender, "to": "*", "body": "to the room"}])
    elipc.join(10)

    assert [(m["id"], m["ts"], m["msg"]) for m in rapid.body["messages"]] == \
        [(for_bob["id"], for_bob["ts"], "straight in")]
    assert [(m["id"], m["content"]) for m in elipc.body] == [(for_room["id"], "to the room")]
    # Woken by the commit: the test server holds a poll 2 s, and a poll not woken would
    # have come back empty. Each figure includes the whole `agent-bus send` process (its
    # start-up, its durable commit).
    assert rapid.answered_at - bob_sent_at < 1
    assert elipc.answered_at - room_sent_at < 1


def test_a_waiting_cli_read_on_the_database_is_woken_by_a_send(server, names):
    """`agent-bus read CHANNEL AGENT --db DB --wait` parks in its own process and hears the
    server's commits (and other commands') as a server hears a replica's."""
    room, carol, sender = names("room", "carol", "web")

    def contact() -> float | None:
        return {a["name"]: a["last_seen"] for a in server.get("/agents").json()}.get(carol)

    for send in (lambda: server.post("/send", json={"channel": room, "sender": sender,
                                                     "content": "over http"}),
                 lambda: write_directly(server.db, [{"channel": room, "sender": sender,
                                                     "to": "*", "body": "from the cli"}])):
        before = contact()
        reader = subprocess.Popen(agent_bus_cmd("read", room, carol, "--db", server.db,
                                                "--wait"), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=repo_env())
        try:
            # Its contact is recorded in the database just before it looks.
            wait_until(lambda: contact() != before, 20, what="the reader to begin")
            sent_at = time.monotonic()
            send()
        finally:
            out, err = finish(reader, 20)
        assert reader.returncode == 0, err
        assert len(json.loads(out)) == 1
        # Woken: a read that waited out its hold (25 s) would have printed [].
        assert time.monotonic() - sent_at < 10


def test_a_direct_write_right_after_the_servers_own_commit_wakes_a_parked_poll(server, names):
    """The server turns its WAL watch off while it commits (its own writes are no news):
    a direct write just after, with nothing after it, still wakes the poll. (This
    process is the other one here, its store opened beside the server beforehand, so
    that its write lands within a millisecond or so of the server's commit.)"""
    sender, bob, other = names("cli", "bob", "other")
    message = NewMessage(channel="default", sender=sender, to=bob, body="right after")

    async def send_then_write_directly() -> tuple[int, float]:
        store = open_store(server.db, exclusive=False)
        await store.open()
        try:
            server.send(sender, other, "the server's own")
            written_at = time.monotonic()
            return (await store.append(message)).message.id, written_at
        finally:
            await store.close()

    since = server.get("/healthz").json()["now"]
    rapid = park(server, f"/recv?to={bob}&since={since!r}&block=true")
    stored_id, written_at = asyncio.run(send_then_write_directly())
    rapid.join(10)
    assert [m["id"] for m in rapid.body["messages"]] == [stored_id]
    assert rapid.answered_at - written_at < 1


def test_cli_writers_and_http_senders_at_once_lose_and_repeat_nothing(server, names):
    """8 `agent-bus send --db` writers and 8 HTTP senders into one database while a reader
    follows the rapid cursor rule: every message once, ids and ts strictly increasing
    together (commit order)."""
    sink, = names("sink")
    per_writer, per_sender = 10, 25
    writers = [CliWriter(server.db, [
        {"channel": "default", "sender": f"cli{n}", "to": sink, "body": f"cli{n}:{i}"}
        for i in range(per_writer)]) for n in range(8)]
    acked: list[dict] = []
    lock = threading.Lock()

    def http_sender(n: int) -> None:
        with requests.Session() as session:
            for i in range(per_sender):
                reply = session.post(server.url + "/send", json={
                    "from": f"web{n}", "to": sink, "msg": f"web{n}:{i}"}, timeout=30)
                assert reply.status_code == 200, reply.text
                with lock:
                    acked.append(reply.json())

    received: list[dict] = []
    expected = 8 * per_writer + 8 * per_sender
    stop = threading.Event()

    def reader() -> None:
        since, deadline = 0.0, time.monotonic() + 120
        with requests.Session() as session:
            while len(received) < expected and time.monotonic() < deadline \
                    and not stop.is_set():
                body = session.get(f"{server.url}/recv", params={
                    "to": sink, "since": repr(since), "block": "true"}, timeout=40).json()
                received.extend(body["messages"])
                since = advanced(since, body)

    threads = [threading.Thread(target=http_sender, args=(n,)) for n in range(8)]
    follower = threading.Thread(target=reader)
    for thread in [*writers, *threads, follower]:
        thread.start()
    try:
        for thread in [*writers, *threads]:
            thread.join(120)
        assert [w.failure for w in writers if w.failure] == []
        follower.join(120)
    finally:
        stop.set()  # a failed writer: the reader must not wait for what never comes
        for thread in [*writers, *threads, follower]:
            thread.join(120)

    sent = {ack["id"] for w in writers for ack in w.acks} | {ack["id"] for ack in acked}
    assert len(sent) == expected
    ids = [m["id"] for m in received]
    assert len(ids) == len(set(ids)), "a message was delivered twice"
    assert set(ids) == sent, f"{len(sent - set(ids))} messages never reached the reader"
    stamps = [m["ts"] for m in received]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    assert ids == sorted(ids), "ts and ids disagree on the commit order"
    assert sorted(m["msg"] for m in received) == sorted(
        [f"cli{n}:{i}" for n in range(8) for i in range(per_writer)]
        + [f"web{n}:{i}" for n in range(8) for i in range(per_sender)])


def test_a_key_used_by_http_and_by_a_cli_send_stores_one_message(server, names):
    sender, bob = names("both", "bob")
    first = server.send(sender, bob, "over http", key="k-1")
    [again] = write_directly(server.db, [{"channel": "default", "sender": sender, "to": bob,
                                          "body": "over http", "key": "k-1"}])
    assert again == {"ok": True, "id": first["id"], "ts": first["ts"], "channel": "default",
                     "duplicate": True}
    [direct] = write_directly(server.db, [{"channel": "default", "sender": sender, "to": bob,
                                           "body": "straight in", "key": "k-2"}])
    repeat = server.post("/send", json={"from": sender, "to": bob, "msg": "straight in",
                                        "key": "k-2"}).json()
    assert (repeat["id"], repeat["ts"], repeat.get("duplicate")) == \
        (direct["id"], direct["ts"], True)
    assert len(server.get(f"/recv?to={bob}&since=0").json()["messages"]) == 2


def test_two_stores_racing_into_one_sqlite_file_keep_keys_and_commit_order(tmp_path):
    """Two processes' stores on one file, each with a group admitted before either
    committed: both were stamped ids 1 and 2, and both found no first send of the key
    they share. The one that commits second finds, under the write lock, the key taken
    (it answers with the first message) and its stamps passed (it gives new ones)."""
    path = str(tmp_path / "bus.db")
    shared = NewMessage(channel="default", sender="racer", to="bob", body="once", key="k")
    mine = NewMessage(channel="default", sender="racer", to="bob", body="server's")
    theirs = NewMessage(channel="default", sender="racer", to="bob", body="beside it")

    async def race():
        server = SQLiteStore(path)
        await server.open()
        beside = SQLiteStore(path, exclusive=False)
        await beside.open()
        try:
            # Admitted in one loop iteration, so before either group commits.
            return await asyncio.gather(server.append(shared), server.append(mine),
                                        beside.append(shared), beside.append(theirs))
        finally:
            await beside.close()
            await server.close()

    first, mine_stored, second, theirs_stored = asyncio.run(race())
    assert sorted([first.duplicate, second.duplicate]) == [False, True]
    assert first.message == second.message
    stored = sorted([first.message, mine_stored.message, theirs_stored.message],
                    key=lambda m: m.id)
    assert len({m.id for m in stored}) == 3
    assert [m.ts for m in stored] == sorted(m.ts for m in stored)
    assert len({m.ts for m in stored}) == 3


def test_a_cli_send_obeys_the_message_rules_of_a_send(tmp_path):
    db = str(tmp_path / "bus.db")
    for message, refusal in (
            ({"sender": "cli", "to": "bob", "body": "x" * (DEFAULT_MAX_MSG_BYTES + 1)},
             "the message is too large"),
            ({"sender": "../etc", "to": "bob", "body": "x"}, "from")):
        done = cli_send(db, message)
        assert done.returncode == 1, done.stderr
        assert refusal in done.stderr.decode()
    [first] = write_directly(db, [{"sender": "cli", "to": "bob", "body": "fine"}])
    assert first["id"] == 1  # the refused ones stored nothing


@pytest.fixture(params=["sqlite", "postgresql"])
def own_server(request, tmp_path):
    """A server of this test's own (it turns secure mode on), on SQLite and PostgreSQL."""
    if request.param == "sqlite":
        db = str(tmp_path / "bus.db")
        with BusServer(db, "--hold", "5") as bus:
            yield bus
    else:
        db = request.getfixturevalue("postgres_db")
        with BusServer(db, "--hold", "5") as bus:
            yield bus


def test_secure_mode_refuses_an_unsigned_cli_send_and_takes_a_signed_one(own_server,
                                                                         tmp_path):
    """Once an operator exists, `agent-bus send --db` is held to the rule of a /send: signed
    by the sender's registered key (AGENT_BUS_KEY), or refused with the same error."""
    bus, db = own_server, own_server.db
    seeded = subprocess.run(agent_bus_cmd("seed", "root", "--db", db), capture_output=True,
                            env=repo_env(), timeout=60)
    assert seeded.returncode == 0, seeded.stderr
    (tmp_path / "root.key").write_bytes(seeded.stdout)
    for args in (("keygen", "--out", str(tmp_path / "herald")),
                 ("register", "herald", "--pubkey", str(tmp_path / "herald.pub"), "--as",
                  "root", "--key", str(tmp_path / "root.key"))):
        done = subprocess.run(agent_bus_cmd(*args), capture_output=True, timeout=60,
                              env=repo_env(AGENT_BUS_URL=bus.url))
        assert done.returncode == 0, done.stderr
    over_http = bus.post("/send", json={"channel": "ops", "sender": "herald",
                                        "content": "unsigned"})
    assert over_http.status_code == 403
    message = {"channel": "ops", "sender": "herald", "to": "*", "body": "unsigned"}

    unsigned = cli_send(db, message)
    assert unsigned.returncode == 1
    assert over_http.json()["error"] in unsigned.stderr.decode()
    forged = cli_send(db, {**message, "body": "forged"}, AGENT_BUS_KEY=str(tmp_path / "root.key"))
    assert forged.returncode == 1 and b"registered key" in forged.stderr

    reader = park(bus, "/messages?channel=ops&agent=carol&wait=true")
    [signed] = write_directly(db, [{**message, "body": "signed"}],
                              AGENT_BUS_KEY=str(tmp_path / "herald.key"))
    reader.join(10)
    assert reader.body == [{"id": signed["id"], "sender": "herald", "content": "signed",
                            "timestamp": signed["ts"], "signed": True}]
    assert bus.get("/messages?channel=ops&agent=dave").json() == reader.body
    assert bus.stop() == 0
