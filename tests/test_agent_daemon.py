"""`agent-bus agent NAME` end to end: real daemons, a real server, real files and inotify."""
from __future__ import annotations

import os
import socket
import stat
import subprocess
import time

import pytest

from busd.agent.spool import claimed_name, idempotency_key, new_token
from busd.framing import monitor_block
from harness.agents import (AgentProcess, drop_atomically, drop_in_place, files_under,
                                 inbox_files, inbox_messages)
from harness.bus import BusServer, agent_bus_cmd, repo_env, wait_until

BODY = "line one\n\n  indented — ünïcödé ✓ 🚀\n\nno trailing newline"


@pytest.fixture
def pair(server, names, tmp_path):
    """spark and dell, each with a running daemon, on the module's server."""
    spark_name, dell_name = names("spark", "dell")
    spark = AgentProcess(spark_name, tmp_path / "spool", server.url)
    dell = AgentProcess(dell_name, tmp_path / "spool", server.url)
    with spark, dell:
        yield spark, dell
        assert spark.stop() == 0
        assert dell.stop() == 0


def wait_inbox(agent: AgentProcess, count: int, timeout: float = 15.0) -> list[str]:
    return wait_until(lambda: len(inbox_files(agent.layout)) >= count and inbox_files(agent.layout),
                      timeout, what=f"{count} files in {agent.name}'s inbox")


def test_a_dropped_file_arrives_byte_exact_as_a_0600_inbox_file_and_one_log_block(pair):
    spark, dell = pair
    drop_in_place(spark.layout, dell.name, "note", BODY.encode())

    [name] = wait_inbox(dell, 1)
    path = os.path.join(dell.layout.inbox, name)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    [(headers, body)] = inbox_messages(dell.layout)
    assert body == BODY.encode()
    assert headers["from"] == spark.name and headers["to"] == dell.name
    assert headers["channel"] == "default"
    assert name == f"{float(headers['ts']):.6f}-{headers['id']}-{spark.name}.msg"
    assert headers["time"].endswith("Z")

    message = {"ts": float(headers["ts"]), "from": spark.name, "msg": BODY}
    wait_until(lambda: os.path.getsize(dell.layout.inbox_log) > 0, what="inbox.log")
    with open(dell.layout.inbox_log, encoding="utf-8") as handle:
        assert handle.read() == monitor_block(message)
    assert stat.S_IMODE(os.stat(dell.layout.inbox_log).st_mode) == 0o600
    wait_until(lambda: "".join(dell.stdout) == monitor_block(message), what="the block on stdout")

    # The sender's side: the file went from outbox/ to sent/, named by the bus's ts and id.
    [sent] = wait_until(lambda: files_under(spark.layout.sent), what="spark's sent/")
    assert sent == f"{float(headers['ts']):.6f}-{headers['id']}-{dell.name}-note"
    with open(os.path.join(spark.layout.sent, sent), "rb") as handle:
        assert handle.read() == BODY.encode()
    assert files_under(spark.layout.outbox) == [] and files_under(spark.layout.claimed) == []
    for folder in (spark.layout.root, spark.layout.outbox, spark.layout.sent,
                   spark.layout.failed, spark.layout.inbox, dell.layout.inbox):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700, folder


def test_header_block_sets_recipient_channel_and_meta(pair, server, names):
    spark, dell = pair
    channel, = names("ops")
    text = (f"---bus\nto: {dell.name}\nchannel: {channel}\nmeta.kind: verify\n"
            f"meta.count: 3\n---\n---bus\nnot a header any more\n")
    drop_atomically(spark.layout, None, "report", text.encode())
    # dell's daemon reads only the default channel; the message waits for a reader of `ops`.
    [sent] = wait_until(lambda: files_under(spark.layout.sent), what="spark's sent/")
    [message] = server.get(f"/recv?to={dell.name}&channel={channel}").json()["messages"]
    assert sent.split("-")[1] == str(message["id"])
    assert message["msg"] == "---bus\nnot a header any more\n"
    assert message["meta"] == {"kind": "verify", "count": "3"}
    assert inbox_files(dell.layout) == []


def test_bad_drops_go_to_failed_with_a_reason_and_later_drops_still_go(pair):
    spark, dell = pair
    layout = spark.layout
    drop_atomically(layout, dell.name, "binary", bytes(range(256)))
    drop_atomically(layout, dell.name, "huge", b"x" * (64 * 1024 + 1))
    drop_atomically(layout, dell.name, "malformed", b"---bus\nto: dell\nno closing line\n")
    drop_atomically(layout, "bad name", "to-nobody", b"hello")
    drop_atomically(layout, None, "no-recipient", b"hello")
    os.makedirs(os.path.join(layout.outbox, dell.name, "deeper"), exist_ok=True)
    drop_in_place(layout, os.path.join(dell.name, "deeper"), "nested", b"hello")

    expected = {"binary": "binary: ", "huge": "too large: ",
                "malformed": "malformed header block: ", "to-nobody": "invalid recipient name",
                "no-recipient": "no recipient: ", "nested": "dropped in a nested folder"}

    def failed_reasons() -> dict[str, str]:
        reasons = {}
        for name in os.listdir(layout.failed):
            if name.endswith(".error"):
                with open(os.path.join(layout.failed, name), encoding="utf-8") as handle:
                    reasons[name[:-len(".error")].split("-", 2)[2]] = handle.readline()
        return reasons

    reasons = wait_until(lambda: len(failed_reasons()) == len(expected) and failed_reasons(),
                         what="six .error files")
    for original, reason in expected.items():
        assert reasons[original].startswith(reason), (original, reasons[original])
        moved = [n for n in os.listdir(layout.failed) if n.endswith("-" + original)]
        assert len(moved) == 1, original
    assert "'bad name'" in reasons["to-nobody"]
    assert spark.running()

    drop_in_place(layout, dell.name, "good", b"still sending")
    wait_inbox(dell, 1)
    assert [body for _, body in inbox_messages(dell.layout)] == [b"still sending"]
    assert files_under(layout.outbox) == [] and files_under(layout.claimed) == []


def test_ignored_names_are_left_alone(pair):
    spark, dell = pair
    for name in (".hidden", "draft.swp", "draft~", "#draft#", "part.tmp"):
        drop_in_place(spark.layout, dell.name, name, b"not yet")
    drop_in_place(spark.layout, dell.name, "marker", b"marker")
    wait_inbox(dell, 1)
    assert [body for _, body in inbox_messages(dell.layout)] == [b"marker"]
    left = files_under(os.path.join(spark.layout.outbox, dell.name))
    assert left == sorted(["draft.swp", "draft~", "#draft#", "part.tmp"])


def test_a_writer_that_pauses_mid_file_is_sent_once_and_complete(pair):
    spark, dell = pair
    # The file is open for writing before its folder moves into the outbox, so the
    # daemon's scan of the new folder surely finds it open (a file written into a
    # folder the daemon already knows gives no event before its close).
    folder = os.path.join(spark.layout.root, "slow-folder")
    os.makedirs(folder)
    path = os.path.join(spark.layout.outbox, dell.name, "slow")
    with open(os.path.join(folder, "slow"), "wb") as handle:
        handle.write(b"first half, ")
        handle.flush()
        os.fsync(handle.fileno())
        os.rename(folder, os.path.dirname(path))
        # The subject is time: a writer quiet for longer than the daemon's settle time
        # (1 s) still holds the file, and only its close may trigger the send.
        time.sleep(1.5)
        assert os.path.exists(path), "the daemon took a file that was still open"
        assert inbox_files(dell.layout) == []
        handle.write(b"second half")
    drop_in_place(spark.layout, dell.name, "after", b"after")
    wait_inbox(dell, 2)
    bodies = [body for _, body in inbox_messages(dell.layout)]
    # Sent once and whole; the two may go in either order (8 senders run at once).
    assert sorted(bodies) == [b"after", b"first half, second half"]


def test_files_dropped_while_down_and_with_the_bus_down_are_sent_when_both_are_up(tmp_path, names):
    spark_name, dell_name = names("spark", "dell")
    bus = BusServer(tmp_path / "bus.db", "--hold", "2").start()
    port = bus.port
    url = bus.url
    bus.stop()
    spool = tmp_path / "spool"
    spark = AgentProcess(spark_name, spool, url)
    before = drop_atomically(spark.layout, dell_name, "before", b"dropped before the daemon ran")
    assert os.path.exists(before)
    with spark:  # ready although the bus is down
        spark.wait_for_log(r"cannot send outbox/|cannot send claimed/|cannot receive")
        drop_in_place(spark.layout, dell_name, "during", b"dropped while the bus was down")
        bus = BusServer(tmp_path / "bus.db", "--hold", "2", port=port).start()
        try:
            with AgentProcess(dell_name, spool, url) as dell:
                wait_inbox(dell, 2, timeout=30)
                bodies = sorted(body for _, body in inbox_messages(dell.layout))
                assert bodies == [b"dropped before the daemon ran", b"dropped while the bus was down"]
                assert dell.stop() == 0
            assert spark.stop() == 0
        finally:
            bus.stop()
    assert len(files_under(spark.layout.sent)) == 2


def test_a_claim_that_was_sent_but_not_filed_is_not_sent_twice(server, names, tmp_path):
    """The crash window between the bus's ack and the move to sent/: resend with the same key."""
    spark_name, dell_name = names("spark", "dell")
    spark = AgentProcess(spark_name, tmp_path / "spool", server.url)
    spark.layout.create()
    token = new_token()
    claimed_dir = os.path.join(spark.layout.claimed, dell_name)
    os.makedirs(claimed_dir)
    with open(os.path.join(claimed_dir, claimed_name(token, "note")), "wb") as handle:
        handle.write(b"sent once")
    first = server.send(spark_name, dell_name, "sent once", key=idempotency_key(token))

    # And the window between the claim's link and its unlink: the same file twice.
    token2 = new_token()
    drop_atomically(spark.layout, dell_name, "linked", b"linked once")
    os.link(os.path.join(spark.layout.outbox, dell_name, "linked"),
            os.path.join(claimed_dir, claimed_name(token2, "linked")))

    with spark, AgentProcess(dell_name, tmp_path / "spool", server.url) as dell:
        wait_inbox(dell, 2)
        wait_until(lambda: len(files_under(spark.layout.sent)) == 2, what="two files in sent/")
        bodies = [body for _, body in inbox_messages(dell.layout)]
        assert bodies == [b"sent once", b"linked once"]
        assert f"-{first['id']}-{dell_name}-note" in "".join(files_under(spark.layout.sent))
        assert files_under(spark.layout.outbox) == []
        assert spark.stop() == 0 and dell.stop() == 0


def test_sd_notify_ready_watchdog_and_sigterm_exits_0(server, names, tmp_path):
    name, = names("spark")
    for address in (f"@agent-bus-test-{os.getpid()}-{name}", str(tmp_path / "notify.sock")):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        listener.settimeout(10)
        try:
            agent = AgentProcess(name, tmp_path / "spool", server.url,
                                 NOTIFY_SOCKET=address, WATCHDOG_USEC="200000")
            with agent:
                got = listener.recv(4096).decode()
                assert got.startswith("READY=1\nSTATUS=serving ")
                assert [listener.recv(4096) for _ in range(3)] == [b"WATCHDOG=1"] * 3
                assert agent.stop() == 0
            while True:  # pings sent before the stop, then STOPPING=1
                got = listener.recv(4096)
                if got != b"WATCHDOG=1":
                    break
            assert got.startswith(b"STOPPING=1")
        finally:
            listener.close()


def test_one_daemon_per_agent_folder(server, names, tmp_path):
    name, = names("spark")
    with AgentProcess(name, tmp_path / "spool", server.url) as first:
        second = subprocess.run(agent_bus_cmd("agent", name), capture_output=True, timeout=30,
                                env=repo_env(AGENT_BUS_URL=server.url,
                                             AGENT_BUS_SPOOL=str(tmp_path / "spool")))
        assert second.returncode == 2
        assert b"another daemon" in second.stderr and str(first.pid).encode() in second.stderr
        assert first.stop() == 0


def test_a_new_recipient_folder_made_just_before_the_file_is_seen(pair):
    spark, dell = pair
    # mkdir and write at once: the file can land before the new folder's watch exists.
    for i in range(5):
        drop_in_place(spark.layout, f"{dell.name}-{i}", "note", f"note {i}".encode())
    sent = wait_until(lambda: len(files_under(spark.layout.sent)) == 5
                      and files_under(spark.layout.sent), what="five files in sent/")
    assert sorted(name.split("-", 2)[2] for name in sent) == \
        sorted(f"{dell.name}-{i}-note" for i in range(5))


def test_a_file_held_open_when_the_daemon_starts_waits_for_its_close(server, names, tmp_path):
    spark_name, dell_name = names("spark", "dell")
    spark = AgentProcess(spark_name, tmp_path / "spool", server.url)
    path = drop_in_place(spark.layout, dell_name, "open", b"")
    with open(path, "wb") as handle:
        handle.write(b"written before the daemon started, ")
        handle.flush()
        with spark:
            drop_in_place(spark.layout, f"{dell_name}-other", "marker", b"marker")
            wait_until(lambda: files_under(spark.layout.sent), what="the marker in sent/")
            assert os.path.exists(path), "the daemon took a file that was still open"
            handle.write(b"and after")
    with spark, AgentProcess(dell_name, tmp_path / "spool", server.url) as dell:
        wait_inbox(dell, 1)
        assert [body for _, body in inbox_messages(dell.layout)] == \
            [b"written before the daemon started, and after"]
        assert spark.stop() == 0 and dell.stop() == 0


def test_one_sender_keeps_the_drop_order_of_a_burst(server, names, tmp_path):
    spark_name, dell_name = names("spark", "dell")
    spool = tmp_path / "spool"
    with AgentProcess(spark_name, spool, server.url, "--senders", "1") as spark, \
            AgentProcess(dell_name, spool, server.url) as dell:
        for i in range(30):
            drop_in_place(spark.layout, dell_name, f"n{i:02d}", f"{i}".encode())
        wait_inbox(dell, 30)
        assert [body for _, body in inbox_messages(dell.layout)] == \
            [f"{i}".encode() for i in range(30)]
        assert spark.stop() == 0 and dell.stop() == 0


def test_sigterm_while_the_bus_is_down_exits_0_and_keeps_the_claim(tmp_path, names):
    name, = names("spark")
    bus = BusServer(tmp_path / "bus.db", "--hold", "2").start()
    url = bus.url
    bus.stop()
    with AgentProcess(name, tmp_path / "spool", url) as spark:
        drop_in_place(spark.layout, "dell", "note", b"waits for the bus")
        spark.wait_for_log(r"cannot send claimed/dell/.*-note yet")
        started = time.monotonic()
        assert spark.stop() == 0
        assert time.monotonic() - started < 5
    assert files_under(spark.layout.outbox) == []
    [claimed] = files_under(spark.layout.claimed)
    assert claimed.startswith("dell/") and claimed.endswith("-note")


def test_the_daemon_exits_1_when_its_outbox_is_removed(server, names, tmp_path):
    name, = names("spark")
    with AgentProcess(name, tmp_path / "spool", server.url) as spark:
        os.rmdir(spark.layout.outbox)
        spark.wait_for_log(r"outbox was removed, and its watch with it; exiting")
        assert spark.proc.wait(15) == 1
        spark.kill()
