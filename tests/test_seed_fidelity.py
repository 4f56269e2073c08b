"""What the older projects' users and clients expect, checked against the real server:
the agent card as A2A v1.0 (validated by the a2a-sdk's own card type) with el-ipc's
fields, el-ipc's `channels` and `agent-card` commands, el-ipc's settings (IPC_*), rapid's
`max` as a soft cap, and el-ipc's per-read bound on GET /messages."""
from __future__ import annotations

import copy
import json
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from a2a.client.card_resolver import parse_agent_card
from a2a.types import AgentCard
from google.api import field_behavior_pb2
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from busd import signing
from busd.agent_card import PROTOCOL_BINDING
from harness.bus import BusServer, agent_bus_cmd, repo_env

# The fields el-ipc's clients read, kept beside A2A's own (A2A allows fields it does not
# define); everything else on the card must be A2A v1.0.
ELIPC_FIELDS = ("url", "authentication", "did")


def _required(field: FieldDescriptor) -> bool:
    return field_behavior_pb2.REQUIRED in field.GetOptions().Extensions[
        field_behavior_pb2.field_behavior]


def missing_required(message, path: str) -> list[str]:
    """Every field the A2A schema marks REQUIRED (google.api.field_behavior) that is
    absent or empty, in `message` and every message inside it."""
    missing = []
    for field in message.DESCRIPTOR.fields:
        where = f"{path}.{field.json_name}"
        value = getattr(message, field.name)
        is_message = field.type == FieldDescriptor.TYPE_MESSAGE
        is_map = is_message and field.message_type.GetOptions().map_entry
        if _required(field):
            if field.is_repeated:
                present = len(value) > 0
            elif is_message:
                present = message.HasField(field.name)
            else:
                present = value not in ("", 0)
            if not present:
                missing.append(where)
        if is_map:
            if field.message_type.fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE:
                for key, item in value.items():
                    missing += missing_required(item, f"{where}[{key}]")
        elif is_message and field.is_repeated:
            for index, item in enumerate(value):
                missing += missing_required(item, f"{where}[{index}]")
        elif is_message and message.HasField(field.name):
            missing += missing_required(value, where)
    return missing


def a2a_card(card: dict) -> AgentCard:
    """The card as the a2a-sdk's AgentCard: parsed strictly (an unknown field or a wrong
    type fails), with every required field present; then as an A2A client reads it."""
    a2a_fields = {name: value for name, value in card.items() if name not in ELIPC_FIELDS}
    strict = json_format.ParseDict(a2a_fields, AgentCard(), ignore_unknown_fields=False)
    assert missing_required(strict, "AgentCard") == []
    read = parse_agent_card(copy.deepcopy(card))
    assert read == strict  # the el-ipc fields beside it change nothing an A2A client sees
    return read


def fetch_card(bus: BusServer) -> dict:
    response = bus.get("/.well-known/agent-card.json")
    assert response.status_code == 200, response.text
    return response.json()


def cli(*args: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(agent_bus_cmd(*args), input=stdin, env=repo_env(**env),
                          capture_output=True, text=True, timeout=60)


def send_many(url: str, bodies: list[dict], clients: int = 8) -> list[dict]:
    """POST every body to /send from `clients` keep-alive connections at once; the acks."""
    chunks = [bodies[i::clients] for i in range(clients)]

    def post_all(chunk: list[dict]) -> list[dict]:
        with requests.Session() as session:
            acks = []
            for body in chunk:
                reply = session.post(url + "/send", json=body, timeout=30)
                assert reply.status_code == 200, reply.text
                acks.append(reply.json())
            return acks

    with ThreadPoolExecutor(clients) as pool:
        return [ack for acks in pool.map(post_all, chunks) for ack in acks]


# -- the agent card --------------------------------------------------------------------

def test_the_card_is_a2a_v1_with_elipc_fields_open_then_with_tokens_then_with_an_operator(
        tmp_path):
    db = tmp_path / "bus.db"
    with BusServer(db) as bus:
        # Open mode.
        card = fetch_card(bus)
        read = a2a_card(card)
        [interface] = read.supported_interfaces
        assert (interface.url, interface.protocol_binding, interface.protocol_version) == (
            bus.url, PROTOCOL_BINDING, "1.0")
        assert "longPolling" not in card["capabilities"]
        assert card["url"] == bus.url
        assert card["authentication"] == {"schemes": ["none"]}  # open: nothing is required
        assert "did" not in card and not read.security_requirements

        # With tokens: bearer, in el-ipc's list and as A2A's security scheme.
        made = cli("token", "create", "boss", "--admin", "--db", str(db))
        assert made.returncode == 0, made.stderr
        card = fetch_card(bus)  # the card needs no token
        read = a2a_card(card)
        assert card["authentication"]["schemes"] == ["bearer"]
        assert read.security_schemes["bearer"].http_auth_security_scheme.scheme == "Bearer"
        assert list(read.security_requirements[0].schemes) == ["bearer"]
        assert "did" not in card

        # With an operator: el-ipc's Ed25519Signature and the operator's did:key.
        seeded = cli("operator", "seed", "root", "--db", str(db))
        assert seeded.returncode == 0, seeded.stderr
        operator = signing.load_private(seeded.stdout)
        card = fetch_card(bus)
        a2a_card(card)
        assert card["authentication"]["schemes"] == ["Ed25519Signature", "bearer"]
        assert card["did"] == signing.did_key(signing.public_pem(operator.public_key()))
        assert card["did"].startswith("did:key:z6Mk")  # an Ed25519 did:key
        # A second operator does not change whose did the bus shows.
        assert cli("operator", "seed", "second", "--db", str(db)).returncode == 0
        assert fetch_card(bus)["did"] == card["did"]

        # `agent-bus agent-card` prints it as el-ipc's command does.
        printed = cli("agent-card", AGENT_BUS_URL=bus.url)
        assert printed.returncode == 0, printed.stderr
        assert printed.stdout == json.dumps(fetch_card(bus), indent=2) + "\n"


def test_serve_takes_the_card_settings_from_elipc_variables_and_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("IPC_AGENT_NAME", "Herald")
    monkeypatch.setenv("IPC_AGENT_DESC", "Persistent bot with long-term memory")
    monkeypatch.setenv("IPC_AGENT_URL", "https://herald.example.org/")
    with BusServer(tmp_path / "env.db") as bus:
        card = fetch_card(bus)
        a2a_card(card)
        assert (card["name"], card["description"], card["url"]) == (
            "Herald", "Persistent bot with long-term memory", "https://herald.example.org")
        assert card["supportedInterfaces"][0]["url"] == "https://herald.example.org"
    with BusServer(tmp_path / "flags.db", "--card-name", "Crier", "--card-description", "d",
                   "--card-url", "http://bus.internal:9876") as bus:
        card = fetch_card(bus)
        assert (card["name"], card["description"], card["url"]) == (
            "Crier", "d", "http://bus.internal:9876")

    monkeypatch.setenv("IPC_AGENT_URL", "javascript:alert(1)")
    refused = cli("serve", "--port", "0", "--db", str(tmp_path / "bad.db"))
    assert refused.returncode == 2
    assert "IPC_AGENT_URL must be an absolute http:// or https:// URL" in refused.stderr


def test_serve_takes_its_port_and_database_from_ipc_port_and_ipc_db_path(tmp_path):
    db = tmp_path / "el-ipc-style.db"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with BusServer(db, command=agent_bus_cmd("serve"),
                   env=repo_env(IPC_PORT=str(port), IPC_DB_PATH=str(db))) as bus:
        assert bus.port == port
        assert bus.get("/healthz").json()["ok"] is True
        assert db.exists()
        # The admin commands find the same database through IPC_DB_PATH.
        made = cli("token", "create", "spark", IPC_DB_PATH=str(db))
        assert made.returncode == 0, made.stderr
        assert bus.get("/recv?to=spark").status_code == 401  # auth is on: same database
        assert bus.stop() == 0

    bad = cli("serve", "--db", str(tmp_path / "x.db"), IPC_PORT="nine")
    assert (bad.returncode, "IPC_PORT must be a port number" in bad.stderr) == (2, True)


def test_serve_refuses_elipc_shared_api_key_rather_than_run_open(tmp_path):
    """el-ipc's IPC_API_KEY closed its server to requests without it; agent-bus has no
    shared key, so it must not start open while its operator believes it is closed."""
    db = tmp_path / "bus.db"
    refused = cli("serve", "--port", "0", "--db", str(db), IPC_API_KEY="s3cret")
    assert refused.returncode == 2
    assert "IPC_API_KEY" in refused.stderr and "agent-bus token create" in refused.stderr
    assert not db.exists()


# -- el-ipc's `channels` command ----------------------------------------------------

def test_channels_command_prints_what_get_channels_answers_as_elipc_does(server, names):
    ch, herald = names("ch", "herald")
    for content in ("one", "two"):
        assert server.post("/send", json={"channel": ch, "sender": herald,
                                          "content": content}).status_code == 200
    printed = cli("channels", AGENT_BUS_URL=server.url)
    assert printed.returncode == 0, printed.stderr
    answered = server.get("/channels").json()
    assert printed.stdout == json.dumps(answered, indent=2) + "\n"
    [mine] = [c for c in json.loads(printed.stdout) if c["channel"] == ch]
    assert mine["count"] == 2

    unreachable = cli("channels", AGENT_BUS_URL="http://127.0.0.1:9")
    assert unreachable.returncode == 3


def test_channels_command_needs_an_admin_token_once_auth_is_on(tmp_path):
    db = tmp_path / "bus.db"
    with BusServer(db) as bus:
        admin = cli("token", "create", "boss", "--admin", "--db", str(db)).stdout.strip()
        agent = cli("token", "create", "spark", "--db", str(db)).stdout.strip()
        assert cli("channels", AGENT_BUS_URL=bus.url).returncode == 1
        assert cli("channels", AGENT_BUS_URL=bus.url, AGENT_BUS_TOKEN=agent).returncode == 1
        allowed = cli("channels", AGENT_BUS_URL=bus.url, AGENT_BUS_TOKEN=admin)
        assert (allowed.returncode, allowed.stdout) == (0, "[]\n")


# -- rapid's max: a soft cap --------------------------------------------------------

def test_max_above_the_limit_is_served_and_a_cursor_follower_gets_every_message_once(
        server, names):
    sender, reader = names("sender", "reader")
    acks = send_many(server.url, [{"from": sender, "to": reader, "msg": f"m{i}"}
                                  for i in range(2500)])
    committed = [ack["id"] for ack in sorted(acks, key=lambda ack: ack["ts"])]

    for asked in ("5000", "10000000"):
        reply = server.get(f"/recv?to={reader}&since=0&max={asked}")
        assert reply.status_code == 200, reply.text
        batch = reply.json()
        assert [m["id"] for m in batch["messages"]] == committed[:1000]
        # Cut short by the bus's limit: `now` stops at the last message returned.
        assert batch["now"] == batch["messages"][-1]["ts"]

    # A generic reader asks for everything and moves its cursor as rapid's clients do.
    since, seen, stamps = 0.0, [], []
    for _ in range(10):
        batch = server.get(f"/recv?to={reader}&since={since!r}&max=10000000").json()
        if not batch["messages"]:
            break
        seen += [m["id"] for m in batch["messages"]]
        stamps += [m["ts"] for m in batch["messages"]]
        since = max([batch["now"]] + [m["ts"] for m in batch["messages"]])
    assert seen == committed  # every message once, in commit order
    assert all(a < b for a, b in zip(stamps, stamps[1:]))

    for refused in ("0", "-1", "abc", "1.5", "1e3"):
        reply = server.get(f"/recv?to={reader}&since=0&max={refused}")
        assert reply.status_code == 400, (refused, reply.text)


# -- el-ipc's GET /messages: at most 1,000 per read -------------------------------------

def test_messages_hands_out_1000_per_read_and_a_reader_that_reads_again_gets_the_rest(
        server, names):
    channel, herald, reader = names("ch", "herald", "reader")
    acks = send_many(server.url, [{"channel": channel, "sender": herald, "content": f"c{i}"}
                                  for i in range(5000)])
    sent = sorted(ack["id"] for ack in acks)
    pending = f"/health?channel={channel}&agent={reader}"
    assert server.get(pending).json()["pending"] == 5000

    reads = []
    for _ in range(7):
        batch = server.get(f"/messages?channel={channel}&agent={reader}").json()
        reads.append([m["id"] for m in batch])
        if not batch:
            break
        assert server.get(pending).json()["pending"] == 5000 - sum(map(len, reads))
    assert [len(ids) for ids in reads] == [1000] * 5 + [0]
    assert [i for ids in reads for i in ids] == sent  # each once, oldest first

