"""Hash-and-path handoffs and the secret guard, end to end with real processes."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess
import uuid

import pytest

from busd import handoff
from busd.agent.inbox import format_inbox_file
from busd.agent.spool import SpoolLayout
from harness.agents import AgentProcess, inbox_messages
from harness.bus import BusServer, agent_bus_cmd, repo_env, wait_until


def cli(*args, stdin: bytes = b"", **env):
    return subprocess.run(agent_bus_cmd(*args), input=stdin, capture_output=True,
                          env=repo_env(**env), timeout=60)


@pytest.fixture
def bus(tmp_path):
    with BusServer(tmp_path / "bus.db") as server:
        yield server
        assert server.stop() == 0


def test_handoff_sends_the_fingerprint_and_never_the_content(bus, tmp_path):
    marker = f"MARKER-{uuid.uuid4()}"
    hits = tmp_path / "hits.csv"
    hits.write_text("".join(f"{marker},{i}\n" for i in range(8)))
    hits.chmod(0o644)
    sent = cli("handoff", "--to", "dell", str(hits), "--note", "T1 done",
               AGENT_BUS_URL=bus.url, AGENT_NAME="spark")
    assert sent.returncode == 0, sent.stderr
    assert stat.S_IMODE(hits.stat().st_mode) == 0o600

    [message] = bus.get("/recv?to=dell").json()["messages"]
    digest = hashlib.sha256(hits.read_bytes()).hexdigest()
    host = socket.gethostname()
    assert message["msg"] == f"hits.csv: lines=8 sha256={digest} at {host}:{hits}\nT1 done"
    meta = message["meta"]
    assert meta["kind"] == "handoff" and meta["files"] == 1
    assert (meta["sha256"], meta["path"], meta["host"], meta["bytes"], meta["lines"]) == \
        (digest, str(hits), host, hits.stat().st_size, 8)
    assert meta["mtime"] == pytest.approx(hits.stat().st_mtime)

    # The marker is nowhere on the bus: not in the database, not in any message.
    stored = b"".join(open(path, "rb").read() for path in
                      (bus.db, bus.db + "-wal") if os.path.exists(path))
    assert marker.encode() not in stored
    assert marker not in json.dumps(bus.get("/recv?to=dell&channel=*").json())


def test_several_files_in_one_handoff(bus, tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.bin"
    first.write_text("one\ntwo")
    second.write_bytes(os.urandom(3000))
    assert cli("handoff", "--to", "dell", str(first), str(second),
               AGENT_BUS_URL=bus.url, AGENT_NAME="spark").returncode == 0
    [message] = bus.get("/recv?to=dell").json()["messages"]
    files = handoff.files_in(message["meta"])
    assert [(f.path, f.lines) for f in files] == [(str(first), 2), (str(second), files[1].lines)]
    assert handoff.verify_meta(message["meta"]) == "verified"
    assert len(message["msg"].splitlines()) == 2


def test_verify_a_file_against_a_hash(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"payload")
    good = hashlib.sha256(b"payload").hexdigest()
    assert cli("verify", str(path), good).returncode == 0
    changed = cli("verify", str(path), hashlib.sha256(b"other").hexdigest())
    assert changed.returncode == 1 and changed.stdout.startswith(b"mismatch")
    gone = cli("verify", str(tmp_path / "missing"), good)
    assert gone.returncode == 3 and gone.stdout.startswith(b"unreachable")


def test_fetch_keeps_a_good_file_and_nothing_of_a_tampered_one(bus, tmp_path):
    spool = tmp_path / "spool"
    shared = tmp_path / "shared"
    shared.mkdir()
    results = shared / "results.txt"
    results.write_text("42\n")
    with AgentProcess("dell", spool, bus.url) as dell:
        env = {"AGENT_BUS_URL": bus.url, "AGENT_NAME": "spark"}
        assert cli("handoff", "--to", "dell", str(results), **env).returncode == 0
        wait_until(lambda: inbox_messages(dell.layout), what="the handoff in dell's inbox")
        [(headers, _)] = inbox_messages(dell.layout)
        message_id = headers["id"]
        dell_env = {"AGENT_BUS_SPOOL": str(spool), "AGENT_NAME": "dell"}

        into = tmp_path / "into"
        into.mkdir()
        fetched = cli("fetch", str(message_id), "--to", str(into), **dell_env)
        assert fetched.returncode == 0, fetched.stderr
        assert (into / "results.txt").read_text() == "42\n"

        results.write_text("43\n")  # tampered after the handoff
        other = tmp_path / "other"
        other.mkdir()
        refused = cli("fetch", str(message_id), "--to", str(other), **dell_env)
        assert refused.returncode != 0
        assert b"nothing was kept" in refused.stderr
        assert os.listdir(other) == []

        results.unlink()
        missing = cli("fetch", str(message_id), "--to", str(other), **dell_env)
        assert missing.returncode == 3
        assert f"scp {socket.gethostname()}:{results} {other}/".encode() in missing.stdout
        assert dell.stop() == 0


def test_send_refuses_a_private_key_and_points_to_handoff(bus):
    pem = b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJ+...\n-----END PRIVATE KEY-----\n"
    env = {"AGENT_BUS_URL": bus.url, "AGENT_NAME": "spark"}
    refused = cli("send", "dell", stdin=pem, **env)
    assert refused.returncode == 1
    assert b"PEM private key" in refused.stderr and b"agent-bus handoff" in refused.stderr
    assert bus.get("/recv?to=dell").json()["messages"] == []
    allowed = cli("send", "dell", "--allow-secret", stdin=pem, **env)
    assert allowed.returncode == 0
    # A handoff's own sha256 line passes the guard.
    line = f"hits.csv: lines=8 sha256={'ab' * 32} at spark:/x/hits.csv".encode()
    assert cli("send", "dell", stdin=line, **env).returncode == 0


def test_hashing_a_2gb_sparse_file_stays_under_64mb(tmp_path):
    sparse = tmp_path / "sparse.bin"
    with open(sparse, "wb") as handle:
        handle.truncate(2 * 1024 ** 3)
    not_its_hash = "ab" * 32
    # A fresh parent whose only child is the verify command: its peak RSS is that child's.
    measure = ("import resource, subprocess, sys; "
               "code = subprocess.run(sys.argv[1:]).returncode; "
               "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    result = subprocess.run([agent_bus_cmd()[0], "-c", measure,
                             *agent_bus_cmd("verify", str(sparse), not_its_hash)],
                            capture_output=True, text=True, env=repo_env(), timeout=120)
    code, peak_kb = map(int, result.stdout.split()[-2:])
    assert code == 1  # the whole file was hashed: a mismatch, not unreachable
    assert peak_kb < 64 * 1024, f"peak RSS {peak_kb / 1024:.0f} MB"
    print(f"hashing a 2 GB sparse file: peak RSS {peak_kb / 1024:.1f} MB")


def _handoff_arrival(bus, tmp_path, change, *daemon_args):
    """spark hands off a file to dell while dell's daemon is down; `change` touches the
    file before dell's daemon starts (with `daemon_args`); returns dell's inbox headers,
    its log and the check its daemon reported to the bus."""
    spool, shared = tmp_path / "spool", tmp_path / "shared"
    shared.mkdir()
    hits = shared / "hits.csv"
    hits.write_text("a,1\nb,2\n")
    with AgentProcess("dell", spool, bus.url, *daemon_args) as dell:
        assert dell.stop() == 0
        sent = cli("handoff", "--to", "dell", str(hits), AGENT_BUS_URL=bus.url, AGENT_NAME="spark")
        assert sent.returncode == 0, sent.stderr
        change(hits)
        dell.start()
        # The daemon tells the bus, which shows it to the sender and the console.
        [(headers, _)] = wait_until(lambda: inbox_messages(dell.layout), what="the handoff filed")
        status = wait_until(lambda: bus.get(f"/status?id={headers['id']}").json()
                            ["messages"][0].get("handoff"),
                            what="dell's daemon to report its check to the bus")
        [(headers, _)] = inbox_messages(dell.layout)
        log_text = open(dell.layout.inbox_log, encoding="utf-8").read()
        assert dell.stop() == 0
    return headers, log_text, status


@pytest.mark.parametrize("change, expected, reason", [
    (lambda path: None, "verified", ""),
    (lambda path: path.write_text("a,1\nb,3\n"), "mismatch", " (its sha256 differs)"),
    (lambda path: path.write_text("a,1\n"), "mismatch",
     " (its size is 4 bytes, not the 8 handed off)"),
    (lambda path: path.unlink(), "not checked", " (it cannot be read here)"),
])
def test_the_receiving_daemon_checks_a_handoff_under_its_shared_roots(bus, tmp_path, change,
                                                                      expected, reason):
    headers, log_text, reported = _handoff_arrival(bus, tmp_path, change,
                                                   "--shared", str(tmp_path / "shared"))
    assert headers["handoff"] == expected
    assert headers.get("handoff-reason", "") == reason.strip(" ()")
    assert headers["checked"].endswith("Z")
    assert reported == {"dell": expected}
    # Filed at once with the check running; its result follows as an entry of its own.
    message_id = headers["id"]
    assert f"\nhandoff: checking (message {message_id})\n---\n" in log_text
    assert log_text.endswith(f"] handoff check of message {message_id} from spark:\n"
                             f"handoff: {expected}{reason}\n---\n")
    assert log_text.count("handoff: ") == 2


def test_without_shared_roots_no_handoff_is_checked(bus, tmp_path):
    headers, log_text, reported = _handoff_arrival(bus, tmp_path, lambda path: None)
    assert headers["handoff"] == "not checked"
    assert headers["handoff-reason"] == "no folder is shared: see agent-bus init --shared"
    assert "checked" not in headers
    assert reported == {"dell": "not checked"}
    assert log_text.endswith("\nhandoff: not checked (no folder is shared: see agent-bus "
                             "init --shared)\n---\n")


def test_a_dropped_secret_goes_to_failed_unless_allowed(bus, tmp_path):
    from harness.agents import drop_atomically, files_under
    spool = tmp_path / "spool"
    pem = b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJ+...\n-----END PRIVATE KEY-----\n"
    with AgentProcess("spark", spool, bus.url) as spark:
        drop_atomically(spark.layout, "dell", "key.pem", pem)
        wait_until(lambda: any(n.endswith(".error") for n in files_under(spark.layout.failed)),
                   what="the refused drop in failed/")
        [error] = [n for n in files_under(spark.layout.failed) if n.endswith(".error")]
        reason = open(os.path.join(spark.layout.failed, error), encoding="utf-8").read()
        assert "PEM private key" in reason and "agent-bus handoff" in reason
        assert "allow-secret: yes" in reason
        drop_atomically(spark.layout, None, "key-ok", b"---bus\nto: dell\nallow-secret: yes\n---\n"
                        + pem)
        wait_until(lambda: bus.get("/recv?to=dell").json()["messages"], what="the allowed drop")
        [message] = bus.get("/recv?to=dell").json()["messages"]
        assert message["msg"].encode() == pem
        assert spark.stop() == 0


def test_the_server_can_enforce_the_guard(tmp_path):
    with BusServer(tmp_path / "bus.db", "--secret-guard") as guarded:
        key = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn...\n"
        refused = guarded.post("/send", json={"from": "a", "to": "b", "msg": key})
        assert refused.status_code == 400 and refused.json()["code"] == 40015
        assert '"allow_secret": true' in refused.json()["error"]
        elipc = guarded.post("/send", json={"channel": "c", "sender": "a", "content": key})
        assert elipc.status_code == 400
        allowed = guarded.post("/send", json={"from": "a", "to": "b", "msg": key,
                                              "allow_secret": True})
        assert allowed.status_code == 200
        assert guarded.post("/send", json={"from": "a", "to": "b",
                                           "msg": "plain words"}).status_code == 200
        assert guarded.stop() == 0


def test_verify_and_fetch_never_open_a_fifo_or_a_device_and_never_read_past_the_size(tmp_path):
    """A person asking explicitly may name any path, but only a regular file is read,
    without blocking, and never beyond the size the handoff announced."""
    fifo, big = tmp_path / "pipe", tmp_path / "big.bin"
    os.mkfifo(fifo)
    with open(big, "wb") as handle:
        handle.truncate(10 * 1024 ** 3)   # reading it would take a long while
    digest = "ab" * 32
    for path in (fifo, "/dev/zero", tmp_path):
        done = cli("verify", str(path), digest)   # cli() gives up after 60 s
        assert (done.returncode, done.stdout) == (3, f"unreachable\t{path}\n".encode())

    spool = tmp_path / "spool"
    layout = SpoolLayout.for_agent(str(spool), "dell")
    layout.create()
    cases = {1: (str(fifo), 8), 2: ("/dev/zero", 10 ** 12), 3: (str(big), 8)}
    for message_id, (path, size) in cases.items():
        meta = {"kind": "handoff", "files": 1, "sha256": digest, "path": path, "host": "h",
                "bytes": size}
        message = {"id": message_id, "ts": 1795000000.0 + message_id, "from": "spark",
                   "to": "dell", "msg": "x", "meta": meta}
        with open(os.path.join(layout.inbox, f"{message['ts']:.6f}-{message_id}-spark.msg"),
                  "wb") as handle:
            handle.write(format_inbox_file(message))
    env = {"AGENT_BUS_SPOOL": str(spool), "AGENT_NAME": "dell"}
    assert cli("verify", "1", **env).stdout == f"unreachable\t{fifo}\n".encode()
    assert cli("verify", "2", **env).stdout == b"unreachable\t/dev/zero\n"
    mismatch = cli("verify", "3", **env)   # 10 GB where 8 bytes were announced: not read
    assert (mismatch.returncode, mismatch.stdout) == (1, f"mismatch\t{big}\n".encode())
    into = tmp_path / "into"
    into.mkdir()
    for message_id, text in ((1, b"it is not a regular file"), (2, b"it is not a regular file"),
                             (3, b"its size is 10737418240 bytes, not the 8 handed off")):
        refused = cli("fetch", str(message_id), "--to", str(into), **env)
        assert refused.returncode == 1 and text in refused.stderr, refused.stderr
    assert os.listdir(into) == []
