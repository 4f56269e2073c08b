"""Exactly once through crashes: agent daemons killed with -9 mid-stream, the server restarted."""
from __future__ import annotations

import os
import random
import threading
import time

from busd.client import BusClient
from busd.framing import monitor_block
from harness.agents import (AgentProcess, count_blocks, drop_atomically, drop_in_place,
                                 files_under, inbox_files, inbox_messages)
from harness.bus import BusServer, wait_until

DROPS = 500


def seeded_random(request) -> random.Random:
    seed = int(os.environ.get("AGENT_BUS_TEST_SEED") or time.time_ns() % 1_000_000)
    print(f"{request.node.name}: AGENT_BUS_TEST_SEED={seed}")
    return random.Random(seed)


def body_of(i: int) -> bytes:
    return f"drop {i:03d}\nline two ✓\n".encode()


def test_sender_killed_at_random_and_server_restarted_sends_each_of_500_drops_once(
        tmp_path, request):
    rng = seeded_random(request)
    bus = BusServer(tmp_path / "bus.db", "--hold", "2").start()
    spool = tmp_path / "spool"
    dell = AgentProcess("dell", spool, bus.url)
    spark = AgentProcess("spark", spool, bus.url)
    dropping = threading.Event()
    dropping.set()

    def drop_all() -> None:
        # Half written in place (close-write), half moved in; in bursts with pauses.
        for i in range(DROPS):
            dropper = drop_in_place if i % 2 else drop_atomically
            dropper(spark.layout, "dell", f"m{i:03d}", body_of(i))
            if i % 25 == 24:
                time.sleep(rng.uniform(0.05, 0.3))
        dropping.clear()

    kills = 0
    try:
        dell.start()
        spark.start()
        dropper = threading.Thread(target=drop_all, name="dropper")
        dropper.start()
        while dropping.is_set() or kills < 6:
            # Random moments, not waits for something: the subject is a kill landing
            # anywhere in the daemon's work (so too the pauses between bursts).
            time.sleep(rng.uniform(0.05, 0.4))
            spark.kill()
            kills += 1
            if rng.random() < 0.3:
                time.sleep(rng.uniform(0.0, 0.3))  # drops pile up while it is down
            spark.start()
            if kills == 3:
                # While spark sends: the same port, so the daemons keep their URL.
                bus.restart()
        dropper.join(60)

        wait_until(lambda: len(inbox_files(dell.layout)) >= DROPS, timeout=120,
                   what=f"{DROPS} files in dell's inbox")
        wait_until(lambda: len(files_under(spark.layout.sent)) >= DROPS, timeout=30,
                   what=f"{DROPS} files in spark's sent/")
        bodies = [body for _, body in inbox_messages(dell.layout)]
        assert len(bodies) == DROPS
        assert sorted(bodies) == sorted(body_of(i) for i in range(DROPS)), "lost or duplicated"
        assert files_under(spark.layout.outbox) == []
        assert files_under(spark.layout.claimed) == []
        assert files_under(spark.layout.failed) == []
        assert len(files_under(spark.layout.sent)) == DROPS
        assert kills >= 6
        assert spark.stop() == 0
        assert dell.stop() == 0
    finally:
        spark.kill()
        dell.kill()
        bus.kill()


def test_receiver_killed_repeatedly_during_a_burst_files_500_messages_once(tmp_path, request):
    rng = seeded_random(request)
    bus = BusServer(tmp_path / "bus.db", "--hold", "2").start()
    dell = AgentProcess("dell", tmp_path / "spool", bus.url)
    acks: list[dict] = []
    sending = threading.Event()
    sending.set()

    def send_all() -> None:
        client = BusClient(bus.url)
        try:
            for i in range(DROPS):
                acks.append(client.send("spark", "dell", body_of(i).decode()))
                if i % 10 == 9:
                    time.sleep(rng.uniform(0.0, 0.06))
        finally:
            client.close()
            sending.clear()

    kills = 0
    try:
        dell.start()
        sender = threading.Thread(target=send_all, name="sender")
        sender.start()
        while sending.is_set() or kills < 8:
            time.sleep(rng.uniform(0.02, 0.3))  # a random moment to kill at, as above
            dell.kill()
            kills += 1
            dell.start()
        sender.join(60)
        assert len(acks) == DROPS

        wait_until(lambda: len(inbox_files(dell.layout)) >= DROPS, timeout=60,
                   what=f"{DROPS} files in dell's inbox")
        messages = inbox_messages(dell.layout)
        assert len(messages) == DROPS
        assert sorted(int(h["id"]) for h, _ in messages) == sorted(a["id"] for a in acks)
        assert sorted(body for _, body in messages) == sorted(body_of(i) for i in range(DROPS))

        # inbox.log: every message's block once, in ts order, nothing torn.
        expected_log = "".join(monitor_block({"ts": a["ts"], "from": "spark",
                                              "msg": body_of(i).decode()})
                               for i, a in enumerate(acks))
        wait_until(lambda: os.path.getsize(dell.layout.inbox_log) >= len(expected_log.encode()),
                   what="the whole inbox.log")
        with open(dell.layout.inbox_log, encoding="utf-8") as handle:
            log_text = handle.read()
        assert count_blocks(log_text) == DROPS
        assert log_text == expected_log
        assert kills >= 8
        assert dell.stop() == 0
    finally:
        dell.kill()
        bus.kill()
