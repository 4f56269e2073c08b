"""The store as a part: what needs only a store does not load the HTTP server, and reads
that walk the whole table do not hold up parked long-polls (SQLite)."""
from __future__ import annotations

import asyncio
import sqlite3
import statistics
import subprocess
import sys
import time

from busd.store_sqlite import SQLiteStore
from harness.bus import BusServer, park, repo_env


def test_token_and_migrate_commands_do_not_load_the_http_server(tmp_path):
    db = str(tmp_path / "bus.db")
    probe = (
        "import sys\n"
        "from busd.cli import main\n"
        f"for argv in (['migrate', '--db', {db!r}], ['token', 'create', 'probe', '--db', {db!r}],"
        f" ['token', 'list', '--db', {db!r}]):\n"
        "    assert main(argv) == 0, argv\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'aiohttp' "
        "or m == 'busd.server'))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=repo_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def fill(db: str, count: int) -> float:
    """A bus database holding `count` messages nobody has read; returns how long one
    retention pass over it takes (the scan the server runs on its own)."""
    async def create() -> None:
        store = SQLiteStore(db)
        await store.open()
        await store.close()

    asyncio.run(create())
    conn = sqlite3.connect(db)
    start = time.time() - 3600
    with conn:
        conn.executemany(
            "INSERT INTO messages (id, ts, channel, from_name, to_name, body) "
            "VALUES (?, ?, 'default', 'filler', ?, 'x')",
            ((i, start + i * 1e-3, f"idle{i % 50}") for i in range(1, count + 1)))
    conn.close()

    async def one_pass() -> float:
        store = SQLiteStore(db)
        await store.open()
        began = time.monotonic()
        removed = await store.enforce_retention(None, 1)
        took = time.monotonic() - began
        await store.close()
        assert removed == 0  # nothing was read: the pass only scans
        return took

    return asyncio.run(one_pass())


def test_a_parked_long_poll_is_answered_while_retention_scans_a_large_table(tmp_path, names):
    db = str(tmp_path / "bus.db")
    scan = fill(db, 300_000)
    sender, receiver = names("sender", "receiver")
    # Retention over and over, with only a turn of the event loop between passes.
    with BusServer(db, "--retain-per-queue", "1", "--retention-every", "0.000001") as bus:
        delays = []
        for i in range(5):
            since = bus.get("/healthz").json()["now"]
            poll = park(bus, f"/recv?to={receiver}&since={since!r}&block=true")
            sent_at = time.monotonic()
            ack = bus.send(sender, receiver, f"during a scan {i}")
            poll.join(30)
            assert [m["id"] for m in poll.body["messages"]] == [ack["id"]]
            delays.append(poll.answered_at - sent_at)
        assert bus.stop() == 0
    # Waiting behind scans on the event loop, the median wait would be about half a scan.
    assert statistics.median(delays) < scan / 4, (delays, scan)
