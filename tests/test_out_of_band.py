"""Messages written straight into the database by another process, beside a running server
(el-ipc's CLI mode: `agent-bus send --db`), on SQLite and on PostgreSQL.

The other process is a child Python process that opens the store the way the CLI will:
store_factory.append_directly, one store opened per message, the store's own write path.
(The CLI stage switches these children to `agent-bus send --db`.) The server must treat
what they commit like its own commits: wake the long-polls it concerns at once, and keep
ids and ts strictly increasing in commit order, so no since-cursor skips a message.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import pytest
import requests

from busd import errors
from busd.errors import BusError
from busd.model import DEFAULT_MAX_MSG_BYTES, NewMessage
from busd.store_factory import append_directly, open_store
from busd.store_sqlite import SQLiteStore
from harness.bus import park, repo_env
from harness.load import advanced

# A child process storing each JSON line of stdin (NewMessage's fields) as a message, as
# `agent-bus send --db` will; one JSON line per message on stdout: id, ts, duplicate.
WRITER = """
import json, sys
from busd.model import NewMessage
from busd.store_factory import append_directly, open_store
for line in sys.stdin:
    result = append_directly(sys.argv[1], NewMessage(**json.loads(line)))
    print(json.dumps({"id": result.message.id, "ts": result.message.ts,
                      "duplicate": result.duplicate}), flush=True)
"""


def start_writer(db: str, messages: list[dict]) -> subprocess.Popen:
    writer = subprocess.Popen([sys.executable, "-c", WRITER, db], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=repo_env())
    writer.stdin.write("".join(json.dumps(m) + "\n" for m in messages))
    writer.stdin.close()
    return writer


def finish_writer(writer: subprocess.Popen, timeout: float = 60) -> list[dict]:
    try:
        out = writer.stdout.read()
        writer.wait(timeout)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    errors_text = writer.stderr.read()
    writer.stdout.close()
    writer.stderr.close()
    assert writer.returncode == 0, errors_text
    return [json.loads(line) for line in out.splitlines()]


def write_directly(db: str, messages: list[dict]) -> list[dict]:
    return finish_writer(start_writer(db, messages))


def test_a_direct_write_wakes_a_parked_recv_and_a_parked_messages_wait(server, names):
    sender, bob, room, carol = names("cli", "bob", "room", "carol")
    since = server.get("/healthz").json()["now"]
    rapid = park(server, f"/recv?to={bob}&since={since!r}&block=true")
    elipc = park(server, f"/messages?channel={room}&agent={carol}&wait=true")

    written_at = time.monotonic()
    [for_bob, for_room] = write_directly(server.db, [
        {"channel": "default", "sender": sender, "to": bob, "body": "straight in"},
        {"channel": room, "sender": sender, "to": "*", "body": "to the room"}])
    rapid.join(10)
    elipc.join(10)

    assert [(m["id"], m["ts"], m["msg"]) for m in rapid.body["messages"]] == \
        [(for_bob["id"], for_bob["ts"], "straight in")]
    assert [(m["id"], m["content"]) for m in elipc.body] == [(for_room["id"], "to the room")]
    # Woken by the commit: the test server holds a poll 2 s, the write itself takes less
    # than a second, and a poll not woken would have come back empty.
    assert rapid.answered_at - written_at < 1 and elipc.answered_at - written_at < 1


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


def test_direct_writers_and_http_senders_at_once_lose_and_repeat_nothing(server, names):
    """8 writer processes and 8 HTTP senders into one database while a reader follows the
    rapid cursor rule: every message once, and ts in the order of ids (commit order)."""
    sink, = names("sink")
    per_sender = 25
    writers = [start_writer(server.db, [
        {"channel": "default", "sender": f"cli{n}", "to": sink, "body": f"cli{n}:{i}"}
        for i in range(per_sender)]) for n in range(8)]
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
    expected = 16 * per_sender
    stop = threading.Event()

    def reader() -> None:
        since, deadline = 0.0, time.monotonic() + 90
        with requests.Session() as session:
            while len(received) < expected and time.monotonic() < deadline \
                    and not stop.is_set():
                body = session.get(f"{server.url}/recv", params={
                    "to": sink, "since": repr(since), "block": "true"}, timeout=40).json()
                received.extend(body["messages"])
                since = advanced(since, body)

    threads = [threading.Thread(target=http_sender, args=(n,)) for n in range(8)]
    threads.append(threading.Thread(target=reader))
    for thread in threads:
        thread.start()
    try:
        written = [ack for writer in writers for ack in finish_writer(writer)]
        for thread in threads[:-1]:
            thread.join(60)
        threads[-1].join(60)
    finally:
        stop.set()  # a failed writer: the reader must not wait for what never comes
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
        for thread in threads:
            thread.join(60)

    sent = {ack["id"] for ack in written} | {ack["id"] for ack in acked}
    assert len(sent) == expected
    ids = [m["id"] for m in received]
    assert len(ids) == len(set(ids)), "a message was delivered twice"
    assert set(ids) == sent, f"{len(sent - set(ids))} messages never reached the reader"
    stamps = [m["ts"] for m in received]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    assert ids == sorted(ids), "ts and ids disagree on the commit order"
    assert sorted(m["msg"] for m in received) == sorted(
        [f"cli{n}:{i}" for n in range(8) for i in range(per_sender)]
        + [f"web{n}:{i}" for n in range(8) for i in range(per_sender)])


def test_a_key_used_by_http_and_by_a_direct_write_stores_one_message(server, names):
    sender, bob = names("both", "bob")
    first = server.send(sender, bob, "over http", key="k-1")
    [again] = write_directly(server.db, [{"channel": "default", "sender": sender, "to": bob,
                                          "body": "over http", "key": "k-1"}])
    assert again == {"id": first["id"], "ts": first["ts"], "duplicate": True}
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


def test_a_direct_write_obeys_the_message_rules_of_a_send(tmp_path):
    db = str(tmp_path / "bus.db")
    with pytest.raises(BusError) as too_large:
        append_directly(db, NewMessage(channel="default", sender="cli", to="bob",
                                       body="x" * (DEFAULT_MAX_MSG_BYTES + 1)))
    assert too_large.value.kind == errors.MSG_TOO_LARGE
    with pytest.raises(BusError) as bad_name:
        append_directly(db, NewMessage(channel="default", sender="../etc", to="bob", body="x"))
    assert bad_name.value.kind == errors.BAD_NAME
