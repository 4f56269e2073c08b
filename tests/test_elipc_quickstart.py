"""el-ipc's README, followed step by step with agent-bus's commands (README, "From el-ipc"):
its quick start (serve, send, read, read --wait) and its secure-mode set-up (seed,
keygen, register, signed sends from the CLI and over HTTP, agents, agent-card), against a
real `agent-bus serve` that finds its settings where el-ipc's server did (IPC_DB_PATH,
IPC_PORT, IPC_AGENT_*), and with the CLI working on the database as el-ipc's did (--db).
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import time

import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from busd import signing
from harness.bus import BusServer, agent_bus_cmd, park, repo_env, wait_until
from harness.processes import finish

ELIPC_FIELDS = {"id", "sender", "content", "timestamp"}


class Shell:
    """A user's terminal: a folder to work in and el-ipc's settings exported."""

    def __init__(self, folder, **environ: str):
        self.folder = folder
        self.environ = environ

    def run(self, *args: str, stdin: bytes = b"", **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(agent_bus_cmd(*args), input=stdin, capture_output=True,
                              cwd=self.folder, env=repo_env(**self.environ, **extra),
                              timeout=60)

    def ok(self, *args: str, stdin: bytes = b"", **extra: str) -> bytes:
        done = self.run(*args, stdin=stdin, **extra)
        assert done.returncode == 0, (args, done.stderr.decode())
        return done.stdout

    def serve(self) -> BusServer:
        """`agent-bus serve` with no options: el-ipc's settings say where and what."""
        return BusServer(self.environ["IPC_DB_PATH"], command=agent_bus_cmd("serve"),
                         env=repo_env(**self.environ))

    def waiting_read(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(agent_bus_cmd("read", *args, "--wait"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=self.folder,
                                env=repo_env(**self.environ))


def printed(process: subprocess.Popen) -> list[dict]:
    """What a waiting `agent-bus read` printed, once it exits."""
    out, err = finish(process, 20)
    assert process.returncode == 0, err.decode()
    return json.loads(out)


def last_seen(bus: BusServer, agent: str) -> float | None:
    return {a["name"]: a["last_seen"] for a in bus.get("/agents").json()}.get(agent)


def started_reading(bus: BusServer, shell: Shell, agent: str, *args: str) -> subprocess.Popen:
    """`agent-bus read my-channel AGENT --wait ARGS...`, returned once it has begun its read:
    its contact with the bus is recorded in the database just before it looks."""
    before = last_seen(bus, agent)
    reader = shell.waiting_read("my-channel", agent, *args)
    try:
        wait_until(lambda: last_seen(bus, agent) != before, 20, what=f"{agent}'s read")
    except AssertionError:
        reader.kill()
        reader.wait()
        raise
    return reader


def test_quick_start_open_mode(tmp_path):
    db = str(tmp_path / "el-ipc.db")
    shell = Shell(tmp_path, IPC_DB_PATH=db, IPC_PORT="0")

    # python3 ipc-server.py serve
    with shell.serve() as bus:
        shell.environ["AGENT_BUS_URL"] = bus.url
        # python3 ipc-server.py send my-channel agent-a "Hello from Agent A"
        # (CLI -- no server needed for local agents): straight into the database.
        ack = json.loads(shell.ok("send", "*", "--db", db, "--channel", "my-channel",
                                  "--from", "agent-a", stdin=b"Hello from Agent A"))
        assert ack["ok"] is True and ack["channel"] == "my-channel"

        # python3 ipc-server.py read my-channel agent-b: el-ipc's JSON list, indented by two
        shown = shell.ok("read", "my-channel", "agent-b")
        [message] = json.loads(shown)
        assert shown.startswith(b'[\n  {\n    "id": ')
        assert set(message) == ELIPC_FIELDS
        assert (message["id"], message["sender"], message["content"]) == \
            (ack["id"], "agent-a", "Hello from Agent A")
        # agent-b's watermark moved past it (over HTTP and on the database alike) ...
        assert shell.ok("read", "my-channel", "agent-b") == b"[]\n"
        assert shell.ok("read", "my-channel", "agent-b", "--db", db) == b"[]\n"
        # ... and only agent-b's: another reader on the database gets it too.
        assert json.loads(shell.ok("read", "my-channel", "agent-c", "--db", db)) == [message]
        # Receipts are the same both ways: each read made the message delivered to its reader.
        status = shell.ok("status", str(ack["id"]))
        assert status == shell.ok("status", str(ack["id"]), "--db", db)
        assert f"{ack['id']}\tdelivered\tagent-b\n".encode() in status
        assert f"{ack['id']}\tdelivered\tagent-c\n".encode() in status

        # python3 ipc-server.py read my-channel agent-b --wait, over HTTP and on the
        # database: each woken by the next send, from the CLI or over HTTP (a read that
        # is not woken would wait out its hold, 25 s, and print []).
        over_http = shell.waiting_read("my-channel", "agent-b")
        bus.wait_parked()
        on_the_db = started_reading(bus, shell, "agent-c", "--db", db)
        sent_at = time.monotonic()
        shell.ok("send", "*", "--db", db, "--channel", "my-channel", "--from", "agent-a",
                 stdin=b"second")
        assert [m["content"] for m in printed(over_http)] == ["second"]
        assert [m["content"] for m in printed(on_the_db)] == ["second"]
        assert time.monotonic() - sent_at < 10

        on_the_db = started_reading(bus, shell, "agent-b", "--db", db)
        sent_at = time.monotonic()
        bus.post("/send", json={"channel": "my-channel", "sender": "agent-d",
                                "content": "over http"})
        assert [(m["sender"], m["content"]) for m in printed(on_the_db)] == \
            [("agent-d", "over http")]
        assert time.monotonic() - sent_at < 10

        # python3 ipc-server.py channels
        channels = json.loads(shell.ok("channels"))
        assert json.loads(shell.ok("channels", "--db", db)) == channels
        assert [(c["channel"], c["count"]) for c in channels] == [("my-channel", 3)]
        assert bus.stop() == 0


def test_secure_mode_setup(tmp_path):
    db = str(tmp_path / "el-ipc.db")
    shell = Shell(tmp_path, IPC_DB_PATH=db, IPC_PORT="0", IPC_AGENT_NAME="Herald",
                  IPC_AGENT_DESC="Persistent bot with long-term memory",
                  IPC_AGENT_URL="https://my-agent.example.org")
    with shell.serve() as bus:
        shell.environ["AGENT_BUS_URL"] = bus.url

        # 1. python3 ipc-server.py seed my-operator > operator.key; chmod 600 operator.key
        private_pem = shell.ok("seed", "my-operator")
        (tmp_path / "operator.key").write_bytes(private_pem)
        os.chmod(tmp_path / "operator.key", 0o600)
        operator_key = serialization.load_pem_private_key(private_pem, password=None)
        assert isinstance(operator_key, Ed25519PrivateKey)
        assert bus.get("/health").json()["secure_mode"] is True

        # 2. python3 ipc-server.py keygen --out herald
        shell.ok("keygen", "--out", "herald")
        assert os.stat(tmp_path / "herald.key").st_mode & 0o777 == 0o600
        herald_key = serialization.load_pem_private_key(
            (tmp_path / "herald.key").read_bytes(), password=None)

        # 3. python3 ipc-server.py register herald --pubkey herald.pub --as my-operator
        #    --key operator.key --identity "a9e6db87-..."
        identity = "a9e6db87-b090-47e0-a509-2bc624896d0f"
        registered = json.loads(shell.ok("register", "herald", "--pubkey", "herald.pub",
                                         "--as", "my-operator", "--key", "operator.key",
                                         "--identity", identity))
        assert registered["ok"] is True

        # 4. Signed sends. Over HTTP, as el-ipc's README shows: base64(Ed25519 over
        #    "channel\nsender\ncontent"), made here with el-ipc's own recipe. (Before the
        #    CLI's: agent-bus signs natively, and once it has seen a native signature a
        #    bus refuses el-ipc's replayable format unless `serve --legacy-signatures on`.)
        reader = park(bus, "/messages?channel=my-channel&agent=watcher&wait=true")
        signature = base64.b64encode(herald_key.sign(b"my-channel\nherald\nHello")).decode()
        sent = bus.post("/send", json={"channel": "my-channel", "sender": "herald",
                                       "content": "Hello", "signature": signature})
        assert sent.status_code == 200, sent.text
        reader.join(10)
        assert [(m["content"], m.get("signed")) for m in reader.body] == [("Hello", True)]
        # ... and from the CLI straight into the database (el-ipc: send ... --key
        # herald.key), which must be signed now: unsigned it is refused.
        message = ("send", "*", "--db", db, "--channel", "my-channel", "--from", "herald")
        refused = shell.run(*message, stdin=b"Hello again")
        assert refused.returncode == 1 and b"signature required" in refused.stderr
        shell.ok(*message, stdin=b"Hello again", AGENT_BUS_KEY="herald.key")
        read = json.loads(shell.ok("read", "my-channel", "someone"))
        assert [(m["content"], m.get("signed")) for m in read] == \
            [("Hello", True), ("Hello again", True)]

        # 5. python3 ipc-server.py agents (the same roster on the database; who is
        # online and since when may move between the two)
        table = shell.ok("agents").decode()
        rows = {line.split()[0]: line for line in table.splitlines()[1:]}
        on_the_db = {line.split()[0]: line
                     for line in shell.ok("agents", "--db", db).decode().splitlines()[1:]}
        assert {name: line.split()[-2:] for name, line in rows.items()} == \
            {name: line.split()[-2:] for name, line in on_the_db.items()}
        assert "operator" in rows["my-operator"]
        assert identity in rows["herald"] and "agent" in rows["herald"]
        roster = {a["name"]: a for a in bus.get("/agents").json()}
        assert roster["herald"]["registered_by"] == "my-operator"

        # Agent discovery: python3 ipc-server.py agent-card (and the HTTP card), with the
        # IPC_AGENT_* settings and, an operator being seeded, its did:key.
        card = json.loads(shell.ok("agent-card"))
        assert card == bus.get("/.well-known/agent-card.json").json()
        assert json.loads(shell.ok("agent-card", "--db", db)) == card
        assert (card["name"], card["description"], card["url"]) == \
            ("Herald", "Persistent bot with long-term memory", "https://my-agent.example.org")
        assert "Ed25519Signature" in card["authentication"]["schemes"]
        operator_public = operator_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        assert card["did"] == signing.did_key(operator_public.decode())
        assert requests.get(bus.url + "/health").json()["secure_mode"] is True
        assert bus.stop() == 0
