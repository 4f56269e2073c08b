"""Faults the bus must survive without losing or inventing anything."""
from __future__ import annotations

import os
import subprocess

import pytest
import requests

from harness.bus import BusServer, SendBurst, agent_bus_cmd, repo_env, wait_until


def serve_once(db, timeout=20):
    return subprocess.run(agent_bus_cmd("serve", "--port", "0", "--db", str(db)),
                          env=repo_env(), capture_output=True, text=True, timeout=timeout)


def filled_db(tmp_path, count=300):
    with BusServer(tmp_path / "bus.db") as bus:
        for i in range(count):
            bus.send("a", "b", f"message {i} " + "x" * 200)
        assert bus.stop() == 0
    return tmp_path / "bus.db"


def test_a_corrupt_database_is_refused_with_a_clear_error(tmp_path):
    db = filled_db(tmp_path)
    data = bytearray(db.read_bytes())
    for offset in range(4096, len(data), 4096):  # scribble over every page but the header
        data[offset + 100:offset + 600] = os.urandom(500)
    db.write_bytes(bytes(data))
    before = db.read_bytes()
    result = serve_once(db)
    assert result.returncode == 2
    assert "not a usable agent-bus database" in result.stderr
    assert "Restore it from a backup" in result.stderr
    assert db.read_bytes() == before  # nothing was "repaired" or replaced


def test_a_truncated_database_is_refused(tmp_path):
    db = filled_db(tmp_path)
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2])
    result = serve_once(db)
    assert result.returncode == 2 and "not a usable agent-bus database" in result.stderr


@pytest.mark.parametrize("content", [b"", b"this is not sqlite at all" * 100])
def test_an_empty_or_foreign_file_is_never_taken_for_a_fresh_bus(tmp_path, content):
    db = tmp_path / "bus.db"
    db.write_bytes(content)
    result = serve_once(db)
    assert result.returncode == 2 and "not a usable agent-bus database" in result.stderr
    assert db.read_bytes() == content


def test_another_applications_sqlite_file_is_refused(tmp_path):
    import sqlite3
    db = tmp_path / "other.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE invoices (n INTEGER)")
    result = serve_once(db)
    assert result.returncode == 2 and "no agent-bus schema" in result.stderr


class SmallDisk:
    """A tmpfs of a few MB, made for the test and removed after it (needs root)."""

    def __init__(self, path, size="2m"):
        self.path = path
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                        str(path)], check=True)

    def remount(self, *options):
        subprocess.run(["mount", "-o", ",".join(["remount", *options]), str(self.path)],
                       check=True)

    def close(self):
        subprocess.run(["umount", "-l", str(self.path)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("this test mounts a small tmpfs and needs root (CI runs as root)")
    disk = SmallDisk(tmp_path / "disk")
    yield disk
    disk.close()


def fill_until_refused(bus, limit=5000):
    """Send until the disk is full; returns (acknowledged ids, the first refusal)."""
    acked = []
    with requests.Session() as session:
        for i in range(limit):
            reply = session.post(f"{bus.url}/send", json={
                "from": "a", "to": "b", "msg": f"{i} " + "y" * 4000}, timeout=10)
            if reply.status_code != 200:
                return acked, reply
            acked.append(reply.json()["id"])
    raise AssertionError("the disk never filled up")


def all_ids(bus):
    ids, since = [], 0.0
    while True:
        batch = bus.get(f"/recv?to=b&since={since!r}&max=1000").json()["messages"]
        if not batch:
            return ids
        ids += [m["id"] for m in batch]
        since = batch[-1]["ts"]


def test_disk_full_answers_503_stores_nothing_unacknowledged_and_recovers(small_disk):
    ballast = small_disk.path / "ballast"
    with BusServer(small_disk.path / "bus.db") as bus:
        acked, refused = fill_until_refused(bus)
        assert refused.status_code == 503, refused.text
        assert refused.json()["code"] == 50301
        assert "disk full or read-only" in refused.json()["error"]
        assert bus.get("/healthz").status_code == 200
        # Space comes back (here: the tmpfs grows), and sends work again by themselves.
        small_disk.remount("size=16m")
        after = bus.send("a", "b", "after the disk had room again")
        assert set(acked) | {after["id"]} == set(all_ids(bus))
        assert bus.stop() == 0
    assert not ballast.exists()


def test_a_read_only_database_answers_503_then_recovers(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("this test marks files immutable (chattr +i) and needs root")
    with BusServer(tmp_path / "bus.db") as bus:
        first = bus.send("a", "b", "before")
        files = [str(tmp_path / name) for name in ("bus.db", "bus.db-wal")]
        # Immutable files refuse writes even through descriptors already open:
        # the database has become read-only under the running server.
        subprocess.run(["chattr", "+i", *files], check=True)
        try:
            refused = requests.post(f"{bus.url}/send", json={"from": "a", "to": "b", "msg": "x"},
                                    timeout=10)
            assert refused.status_code == 503 and refused.json()["code"] == 50301
            # Reading still works.
            assert [m["id"] for m in bus.get("/recv?to=b").json()["messages"]] == [first["id"]]
        finally:
            subprocess.run(["chattr", "-i", *files], check=True)
        second = bus.send("a", "b", "after")
        assert all_ids(bus) == [first["id"], second["id"]]
        assert bus.stop() == 0


def test_kill_9_at_three_random_points_of_a_burst_loses_nothing_acknowledged(tmp_path):
    acked: list[int] = []
    with BusServer(tmp_path / "bus.db") as bus:
        for round_number in range(3):
            burst = SendBurst(lambda sender: bus.url, "b",
                              [f"r{round_number}s{n}" for n in range(4)]).start()
            target = len(acked) + 100 + int.from_bytes(os.urandom(1), "big")
            wait_until(lambda: len(acked) + len(burst.acked) >= target, timeout=30,
                       what=f"{target} acks")
            bus.kill()
            burst.stop()
            acked += [reply["id"] for reply in burst.acked]
            bus.start()
        stored = set(all_ids(bus))
        assert set(acked) <= stored, f"{len(set(acked) - stored)} acknowledged messages lost"
        assert bus.stop() == 0


def test_retention_removes_only_messages_already_read(tmp_path):
    with BusServer(tmp_path / "bus.db", "--retain-per-queue", "3", "--retention-every",
                   "0.2") as bus:
        acks = [bus.send("a", "reader", f"r{i}") for i in range(10)]
        unread = [bus.send("a", "sleeper", f"s{i}") for i in range(10)]
        # reader polls past its first 6 messages; sleeper never polls.
        bus.get(f"/recv?to=reader&since={acks[5]['ts']!r}")

        def reader_ids():
            return [m["id"] for m in bus.get("/recv?to=reader&since=0&max=100").json()["messages"]]

        # The newest 3 are kept regardless; of the older 7, the 6 read ones go.
        wait_until(lambda: len(reader_ids()) == 4, timeout=10, what="retention to run")
        assert reader_ids() == [a["id"] for a in acks[6:]]
        sleeper = [m["id"] for m in bus.get("/recv?to=sleeper&since=0&max=100").json()["messages"]]
        assert sleeper == [a["id"] for a in unread]  # unread: all kept, cap or not
        assert bus.stop() == 0
