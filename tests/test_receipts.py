"""Delivery receipts and presence, with real servers, daemons and the CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from harness.agents import AgentProcess, inbox_files, inbox_messages
from harness.bus import REPO, BusServer, agent_bus_cmd, repo_env, wait_until


def cli(*args, stdin: bytes = b"", **env):
    return subprocess.run(agent_bus_cmd(*args), input=stdin, capture_output=True,
                          env=repo_env(**env), timeout=60)


def states(bus, *ids):
    return {s["id"]: s for s in bus.get("/status?" + "&".join(f"id={i}" for i in ids))
            .json()["messages"]}


@pytest.fixture
def bus(tmp_path):
    with BusServer(tmp_path / "bus.db", "--hold", "2", "--online-window", "4") as server:
        yield server
        assert server.stop() == 0


def test_a_message_goes_queued_delivered_filed(bus, tmp_path):
    ack = bus.send("spark", "dell", "hello")
    assert states(bus, ack["id"])[ack["id"]]["state"] == "queued"
    # A plain receiver fetches it: delivered, not filed (it said nothing about files).
    bus.get("/recv?to=dell&since=0")
    assert states(bus, ack["id"])[ack["id"]]["recipients"] == {"dell": "delivered"}
    # dell's daemon files it, and its next poll says so.
    with AgentProcess("dell", tmp_path / "spool", bus.url) as dell:
        wait_until(lambda: states(bus, ack["id"])[ack["id"]]["state"] == "filed",
                   what="the message to turn filed")
        assert len(inbox_files(dell.layout)) == 1
        assert dell.stop() == 0


def test_send_wait_filed_succeeds_online_and_times_out_offline(bus, tmp_path):
    env = {"AGENT_BUS_URL": bus.url, "AGENT_NAME": "spark"}
    spool = tmp_path / "spool"
    with AgentProcess("dell", spool, bus.url) as dell:
        online = cli("send", "dell", "--wait", "filed", "--timeout", "20", stdin=b"hi", **env)
        assert online.returncode == 0, online.stderr
        assert dell.stop() == 0

    offline = cli("send", "dell", "--wait", "filed", "--timeout", "2", stdin=b"later", **env)
    assert offline.returncode == 4
    assert b"was not filed within 2 s" in offline.stderr
    late = json.loads(offline.stdout)
    assert states(bus, late["id"])[late["id"]]["state"] == "queued"
    with AgentProcess("dell", spool, bus.url) as dell:
        wait_until(lambda: states(bus, late["id"])[late["id"]]["state"] == "filed",
                   what="the late message to turn filed once dell's daemon runs")
        assert dell.stop() == 0


def test_a_daemon_killed_after_fetching_but_before_filing_files_it_once(bus, tmp_path):
    if os.geteuid() != 0:
        pytest.fail("this test makes the inbox folder immutable (chattr +i) and needs root")
    spool = tmp_path / "spool"
    with AgentProcess("dell", spool, bus.url) as dell:
        inbox = dell.layout.inbox
        # The daemon will fetch the message but cannot file it.
        subprocess.run(["chattr", "+i", inbox], check=True)
        try:
            ack = bus.send("spark", "dell", "fetched, then lost")
            wait_until(lambda: states(bus, ack["id"])[ack["id"]]["state"] == "delivered",
                       what="the fetch")
            dell.wait_for_log(r"cannot file", timeout=15)
            dell.kill()
        finally:
            subprocess.run(["chattr", "-i", inbox], check=True)
        assert states(bus, ack["id"])[ack["id"]]["state"] == "delivered"
        dell.start()
        wait_until(lambda: states(bus, ack["id"])[ack["id"]]["state"] == "filed",
                   what="the message filed after the restart")
        assert [body for _, body in inbox_messages(dell.layout)] == [b"fetched, then lost"]
        assert dell.stop() == 0


def test_a_broadcast_has_a_state_per_recipient(bus, tmp_path):
    spool = tmp_path / "spool"
    with AgentProcess("dell", spool, bus.url) as dell:
        bus.get("/recv?to=cube&since=0")  # cube reads the channel too, without a daemon
        ack = bus.send("spark", "*", "all hands")
        wait_until(lambda: states(bus, ack["id"])[ack["id"]]["recipients"].get("dell") == "filed",
                   what="dell to file the broadcast")
        state = states(bus, ack["id"])[ack["id"]]
        assert state["recipients"] == {"cube": "queued", "dell": "filed"}
        assert state["state"] == "queued"  # the least advanced recipient
        assert dell.stop() == 0


def roster(bus):
    return {a["name"]: a for a in bus.get("/agents").json()}


def test_agents_shows_online_and_offline_as_daemons_start_and_stop(bus, tmp_path):
    spool = tmp_path / "spool"
    dell = AgentProcess("dell", spool, bus.url).start()
    wait_until(lambda: roster(bus).get("dell", {}).get("online"), what="dell online")
    table = cli("agents", AGENT_BUS_URL=bus.url)
    assert table.returncode == 0
    line = [row for row in table.stdout.decode().splitlines() if row.startswith("dell ")][0]
    assert line.split()[1] == "yes"
    assert dell.stop() == 0
    # A clean stop hangs up its parked poll: offline at once, not after the window.
    wait_until(lambda: roster(bus)["dell"]["online"] is False, timeout=3, what="dell offline")
    assert roster(bus)["dell"]["last_seen"] > time.time() - 30


def test_an_agent_that_vanishes_without_hanging_up_turns_offline(bus, tmp_path):
    spool = tmp_path / "spool"
    with AgentProcess("dell", spool, bus.url) as dell:
        wait_until(lambda: roster(bus).get("dell", {}).get("online"), what="dell online")
        os.kill(dell.pid, signal.SIGSTOP)  # frozen: its connection stays open, it never polls
        try:
            frozen = time.monotonic()
            # hold (2 s) + online window (4 s) here; with the defaults, 25 + 60 < 90 s.
            wait_until(lambda: roster(bus)["dell"]["online"] is False, timeout=15,
                       what="the frozen dell to turn offline")
            assert time.monotonic() - frozen < 2 + 4 + 3
        finally:
            os.kill(dell.pid, signal.SIGCONT)
        assert dell.stop() == 0


def test_undelivered_lists_old_queued_messages_and_unknown_names(bus):
    bus.get("/recv?to=sleepy&since=0")  # sleepy has been seen, but will not fetch again
    old = bus.send("spark", "sleepy", "still waiting")
    typo = bus.send("spark", "delll", "to a name nobody has")
    fetched = bus.send("spark", "dell", "fetched")
    bus.get("/recv?to=dell&since=0")
    listed = cli("undelivered", "--older", "0", AGENT_BUS_URL=bus.url)
    assert listed.returncode == 0
    rows = [line.split("\t") for line in listed.stdout.decode().splitlines()]
    by_id = {int(row[0]): row for row in rows}
    assert str(old["id"]) in map(str, by_id) and typo["id"] in by_id
    assert fetched["id"] not in by_id
    assert "nobody named delll has ever talked to this bus" in by_id[typo["id"]][5]
    # Recent messages to known agents are not dead letters yet.
    recent = cli("undelivered", AGENT_BUS_URL=bus.url).stdout.decode()
    assert f"{typo['id']}\t" in recent and f"{old['id']}\t" not in recent


def test_status_lines_match_between_python_and_shell(bus):
    ack = bus.send("spark", "dell", "one")
    bus.get("/recv?to=cube&since=0")
    broadcast = bus.send("spark", "*", "two")
    ids = [str(ack["id"]), str(broadcast["id"]), "999999"]
    python = cli("status", *ids, AGENT_BUS_URL=bus.url)
    shell = subprocess.run([str(REPO / "bin" / "bus-status"), *ids], capture_output=True,
                           env=repo_env(AGENT_BUS_URL=bus.url), timeout=30)
    assert python.returncode == shell.returncode == 0
    assert python.stdout == shell.stdout
    assert python.stdout.decode().splitlines() == [
        f"{ack['id']}\tqueued\tdell", f"{broadcast['id']}\tqueued\tcube", "999999\tunknown\t-"]
