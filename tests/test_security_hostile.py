"""Issue 15, the server's side: what a token holder or a web page tries against other
agents' mail, against a real server (tokens on; open mode for the browser attacks).

Each test is named after the numbered attack of the issue that it shows refused or
harmless (test_attack_NN_...). The recipient's side (handoff checks on arrival,
malformed meta, the log) is tested with the daemon's code.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from busd import __version__, model, signing
from busd.api import openapi
from busd.client import BusClient, BusClientError
from harness.agents import AgentProcess, inbox_messages
from harness.browser import Browser
from harness.bus import BusServer, wait_until
from tests.test_console_browser import chromium  # noqa: F401 - the fixture
from tests.test_security import bearer, cli, make_token
from tests.test_shell import BrokenProxy

README = Path(__file__).resolve().parent.parent / "README.md"
NOT_A_SIGNATURE = "bm90IGEgc2lnbmF0dXJl"     # base64 of "not a signature"


TAP_ACK = {"ok": True, "ts": 1.5, "channel": "default", "id": 1, "message": "recorded"}


def wire_tap() -> BrokenProxy:
    """What a wire tap between a client and its bus captures: a real HTTP server that
    answers as a bus would and keeps every request (`sent(tap)`)."""
    return BrokenProxy(200, json.dumps(TAP_ACK).encode(), "application/json")


def sent(tap: BrokenProxy) -> list[dict]:
    return [json.loads(body) for body in tap.bodies]


@dataclass
class Hostile:
    bus: BusServer
    tokens: dict[str, str]
    folder: Path

    def client(self, name: str, key: str | None = None, url: str | None = None) -> BusClient:
        """`name`'s client with its token, signing with the key file KEY.key if given."""
        signing_key = signing.read_private_file(str(self.folder / f"{key}.key")) if key else None
        return BusClient(url or self.bus.url, token=self.tokens[name], signing_key=signing_key)

    def send(self, name: str, to: str, msg: str, **fields) -> dict:
        """A send signed by `name`'s registered key (secure mode is on here)."""
        client = self.client(name, key=name)
        try:
            return client.send(name, to, msg, **fields)
        finally:
            client.close()

    def as_(self, name: str) -> dict:
        return bearer(self.tokens[name])


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def hostile(request, tmp_path_factory):
    """A bus with tokens on and an operator (root): alice is registered and signs; bob,
    mallory and dave have agent tokens, opsbot one limited to channel ops; boss is an
    admin, opsadmin an admin limited to ops. el-ipc signatures are on (the setting
    attack 9 needs)."""
    folder = tmp_path_factory.mktemp("hostile")
    postgres = None
    if request.param == "sqlite":
        db = str(folder / "bus.db")
    else:
        postgres = request.getfixturevalue("postgres")
        db = postgres.create_database()
    bus = BusServer(db, "--hold", "1", "--legacy-signatures", "on", "--rate", "1000",
                    "--burst", "1000")
    try:
        bus.start()
        tokens = {name: make_token(db, name) for name in ("alice", "bob", "mallory", "dave")}
        tokens["opsbot"] = make_token(db, "opsbot", "--channels", "ops")
        tokens["boss"] = make_token(db, "boss", "--admin")
        tokens["opsadmin"] = make_token(db, "opsadmin", "--admin", "--channels", "ops")
        seeded = cli("operator", "seed", "root", "--out", str(folder / "root"), "--db", db)
        assert seeded.returncode == 0, seeded.stderr
        assert cli("keygen", "--out", str(folder / "alice")).returncode == 0
        registered = cli("register", "alice", "--pubkey", str(folder / "alice.pub"), "--as",
                         "root", "--key", str(folder / "root.key"), AGENT_BUS_URL=bus.url,
                         AGENT_BUS_TOKEN=tokens["boss"])
        assert registered.returncode == 0, registered.stderr
        yield Hostile(bus, tokens, folder)
        assert bus.stop() == 0
        assert not [line for line in bus.log if "Traceback" in line], "".join(bus.log)
    finally:
        bus.kill()
        if postgres is not None:
            postgres.drop_database(db)


def recv_all(hostile: Hostile, name: str, channel: str = "*") -> list[dict]:
    reply = hostile.bus.get(f"/recv?to={name}&channel={channel}&max=1000",
                            headers=hostile.as_(name))
    assert reply.status_code == 200, reply.text
    return reply.json()["messages"]


# -- signatures mean what they say ---------------------------------------------------


def test_attack_06_a_signed_handoffs_meta_cannot_be_changed(hostile, tmp_path):
    report = tmp_path / "report.csv"
    report.write_bytes(b"a,b\n1,2\n")
    with wire_tap() as tap:
        handed = cli("handoff", "--to", "bob", str(report), AGENT_BUS_URL=tap.url,
                     AGENT_NAME="alice", AGENT_BUS_KEY=str(hostile.folder / "alice.key"),
                     AGENT_BUS_TOKEN=hostile.tokens["alice"])
        assert handed.returncode == 0, handed.stderr
    [captured] = sent(tap)
    meta = captured["meta"]
    assert meta["kind"] == "handoff" and meta["path"] == str(report)
    assert isinstance(meta["mtime"], float)
    alice = hostile.as_("alice")
    # The sender's own token replays the captured request with what the daemon acts on
    # changed: the signature no longer holds.
    for change in ({"path": "/etc/shadow"}, {"sha256": "0" * 64}, {"bytes": 10 ** 10},
                   {"host": "elsewhere"}, {"mtime": meta["mtime"] + 1e-6}, {"more": "x"}):
        forged = {**captured, "meta": {**meta, **change}}
        refused = hostile.bus.post("/send", json=forged, headers=alice)
        assert refused.status_code == 403 and refused.json()["code"] == 40303, change
    unmeta = hostile.bus.post("/send", json={k: v for k, v in captured.items() if k != "meta"},
                              headers=alice)
    assert unmeta.status_code == 403 and unmeta.json()["code"] == 40303
    assert all(m.get("meta", {}).get("path") != "/etc/shadow" for m in recv_all(hostile, "bob"))
    # The request as signed goes through, signed, with its meta as it was.
    accepted = hostile.bus.post("/send", json=captured, headers=alice)
    assert accepted.status_code == 200, accepted.text
    [got] = [m for m in recv_all(hostile, "bob") if m["id"] == accepted.json()["id"]]
    assert got["signed"] is True and got["meta"] == meta


def test_attack_07_an_unverifiable_signature_is_never_shown_as_signed(server, names, tmp_path):
    """On a bus with no operator nothing can be verified: a signature is kept by nobody."""
    ch, alice, bob = names("ch", "alice", "bob")
    with AgentProcess(bob, tmp_path / "spool", server.url, "--channel", ch) as daemon:
        sends = [
            {"from": alice, "to": bob, "channel": ch, "msg": "rapid", "signature": NOT_A_SIGNATURE},
            {"from": alice, "to": bob, "channel": ch, "msg": "native", "key": "k-1",
             "signed_at": int(time.time() * 1000), "signature": NOT_A_SIGNATURE},
            {"channel": ch, "sender": alice, "content": "el-ipc", "signature": NOT_A_SIGNATURE},
        ]
        for body in sends:
            assert server.post("/send", json=body).status_code == 200
        wait_until(lambda: len(inbox_messages(daemon.layout)) == 3, what="three inbox files")
        assert [(h.get("signed"), body) for h, body in inbox_messages(daemon.layout)] == [
            (None, b"rapid"), (None, b"native"), (None, b"el-ipc")]
        assert "signed" not in "".join(daemon.stdout)
        assert daemon.stop() == 0
    rapid = server.get(f"/recv?to={bob}&channel={ch}").json()["messages"]
    assert len(rapid) == 3 and not any("signed" in m for m in rapid)
    elipc = server.get(f"/messages?channel={ch}&agent={names('reader')[0]}").json()
    assert [m["content"] for m in elipc] == ["el-ipc"] and "signed" not in elipc[0]
    feed = server.get(f"/ui/feed?channel={ch}").json()["messages"]
    assert len(feed) == 3 and not any(m["signed"] for m in feed)


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_attack_07_signatures_kept_unverified_before_the_upgrade_are_dropped(store, request,
                                                                             tmp_path):
    """A bus upgraded from schema 4 keeps `signed` only on messages the bus verified."""
    if store == "sqlite":
        db = str(tmp_path / "bus.db")

        def run_sql(*statements: str) -> None:
            import sqlite3
            with sqlite3.connect(db) as conn:
                for statement in statements:
                    conn.execute(statement)
            conn.close()
    else:
        postgres = request.getfixturevalue("postgres")
        db = request.getfixturevalue("postgres_db")

        def run_sql(*statements: str) -> None:
            for statement in statements:
                postgres.run_sql(db, statement)
    with BusServer(db) as bus:
        # Open mode: mallory's signature could not be verified (stored unsigned now; it
        # was stored as signed before this change).
        assert bus.post("/send", json={"from": "mallory", "to": "bob", "msg": "unverified",
                                       "signature": NOT_A_SIGNATURE}).status_code == 200
        assert cli("operator", "seed", "root", "--out", str(tmp_path / "root"),
                   "--db", db).returncode == 0
        assert cli("keygen", "--out", str(tmp_path / "alice")).returncode == 0
        assert cli("register", "alice", "--pubkey", str(tmp_path / "alice.pub"), "--as", "root",
                   "--key", str(tmp_path / "root.key"), AGENT_BUS_URL=bus.url).returncode == 0
        client = BusClient(bus.url, signing_key=signing.read_private_file(
            str(tmp_path / "alice.key")))
        client.send("alice", "bob", "verified")
        client.close()
        assert bus.stop() == 0
    # Back to schema 4, with the signature as the old code kept it (migrations 5 and 6
    # undone).
    run_sql(f"UPDATE messages SET signature = '{NOT_A_SIGNATURE}' WHERE from_name = 'mallory'",
            "ALTER TABLE agents DROP COLUMN registration_signed_at",
            "DROP TABLE read_receipts",
            "UPDATE schema_version SET version = 4")
    with BusServer(db) as bus:
        got = bus.get("/recv?to=bob").json()["messages"]
        assert [(m["msg"], m.get("signed")) for m in got] == [("unverified", None),
                                                              ("verified", True)]
        assert bus.stop() == 0


def _signed_send_status(hostile: Hostile, name: str, key: str) -> int:
    client = hostile.client(name, key=key)
    try:
        client.send(name, "bob", f"signed with {key}")
        return 200
    except BusClientError as exc:
        return exc.status
    finally:
        client.close()


def test_attack_08_a_captured_registration_cannot_be_replayed(hostile):
    folder = hostile.folder
    for key in ("dave-key1", "dave-key2"):
        assert cli("keygen", "--out", str(folder / key)).returncode == 0

    def register(key: str, url: str):
        done = cli("register", "dave", "--pubkey", str(folder / f"{key}.pub"), "--as", "root",
                   "--key", str(folder / "root.key"), AGENT_BUS_URL=url,
                   AGENT_BUS_TOKEN=hostile.tokens["boss"])
        assert done.returncode == 0, done.stderr

    # The operator registers dave with key1, and later rotates to key2; both requests
    # are captured on the way.
    with wire_tap() as tap:
        register("dave-key1", tap.url)
        register("dave-key2", tap.url)
    key1_request, key2_request = sent(tap)
    boss = hostile.as_("boss")
    assert hostile.bus.post("/register", json=key1_request, headers=boss).status_code == 200
    assert _signed_send_status(hostile, "dave", "dave-key1") == 200
    assert hostile.bus.post("/register", json=key2_request, headers=boss).status_code == 200
    assert _signed_send_status(hostile, "dave", "dave-key2") == 200

    # Replayed: without a token it is not even looked at; with one (anyone's) the older
    # registration and the current one's replay change nothing.
    bare = hostile.bus.post("/register", json=key1_request)
    assert bare.status_code == 401 and bare.json()["code"] == 40101
    for replayed in (key1_request, key2_request):
        for who in ("mallory", "boss"):
            again = hostile.bus.post("/register", json=replayed, headers=hostile.as_(who))
            assert again.status_code == 409 and again.json()["code"] == 40903, who
    assert _signed_send_status(hostile, "dave", "dave-key1") == 403
    assert _signed_send_status(hostile, "dave", "dave-key2") == 200
    # Nor does /register replace an operator's key.
    card = hostile.bus.get("/.well-known/agent-card.json").json()["did"]
    over_root = cli("register", "root", "--pubkey", str(folder / "dave-key1.pub"), "--as", "root",
                    "--key", str(folder / "root.key"), AGENT_BUS_URL=hostile.bus.url,
                    AGENT_BUS_TOKEN=hostile.tokens["boss"])
    assert over_root.returncode == 1 and b"is an operator of this bus" in over_root.stderr
    assert hostile.bus.get("/.well-known/agent-card.json").json()["did"] == card


def test_attack_09_a_native_signature_never_verifies_as_an_elipc_message(hostile):
    # alice signs natively on a channel named like herself: the one arrangement in which
    # the lines of her payload read as an el-ipc message from alice.
    with wire_tap() as tap:
        client = hostile.client("alice", key="alice", url=tap.url)
        client.send("alice", "bob", "pay 5", channel="alice", key="k-9")
        client.close()
    [native] = sent(tap)
    digest = hashlib.sha256(b"pay 5").hexdigest()
    tail = ["alice", "bob", str(native["signed_at"]), "k-9", digest]
    alice = signing.read_private_file(str(hostile.folder / "alice.key"))
    v1_signature = signing.sign(alice, "\n".join(["agent-bus-send-v1", "alice", *tail]).encode())
    attempts = [
        # the captured signature, re-posted as el-ipc in every shape its payload could take
        *({"channel": tag, "content": "\n".join(tail + extra), "signature": native["signature"]}
          for tag in ("agent-bus-send-v1", signing.NATIVE_TAG) for extra in ([], ["-"])),
        # one an older client made in the v1 form, captured before the upgrade
        {"channel": "agent-bus-send-v1", "content": "\n".join(tail), "signature": v1_signature},
    ]
    for attempt in attempts:
        reply = hostile.bus.post("/send", json={"sender": "alice", **attempt},
                                 headers=hostile.as_("alice"))
        assert reply.status_code in (400, 403), (attempt["channel"], reply.text)
    read = hostile.bus.get("/messages?channel=agent-bus-send-v1&agent=bob",
                           headers=hostile.as_("bob"))
    assert read.status_code == 200 and read.json() == []
    # No tag can be a channel name, so no native or registration payload is ever an
    # el-ipc payload (channel \n sender \n content).
    for tag in (signing.NATIVE_TAG, signing.REGISTER_TAG):
        assert not model.is_valid_name(tag)


def test_attack_10_register_needs_a_token_and_does_not_tell_operators_apart(hostile):
    _private, public = signing.generate()
    alice_key = signing.read_private_file(str(hostile.folder / "alice.key"))

    def registration(operator: str) -> dict:
        signed_at = int(time.time() * 1000)
        return {"name": "eve", "public_key": public, "operator": operator, "signed_at": signed_at,
                "signature": signing.sign(alice_key, signing.register_payload(
                    "eve", "", public, signed_at))}

    # alice is not an operator; root is, but alice's signature is not root's; nobody is
    # no one at all.
    attempts = [registration(op) for op in ("alice", "root", "nobody")]
    for attempt in attempts:
        bare = hostile.bus.post("/register", json=attempt)
        assert bare.status_code == 401 and bare.json()["code"] == 40101
    answers = [hostile.bus.post("/register", json=attempt, headers=hostile.as_("mallory"))
               for attempt in attempts]
    assert {a.status_code for a in answers} == {403}
    assert len({a.text for a in answers}) == 1, [a.text for a in answers]
    assert all(name not in answers[0].text for name in ("alice", "root", "nobody"))
    assert "eve" not in {a["name"] for a in hostile.bus.get("/agents",
                                                             headers=hostile.as_("boss")).json()}


# -- browsers, open mode ----------------------------------------------------------------

# What a browser adds to a request an <img> on another site makes: no Origin at all.
CROSS_SITE_IMAGE = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0",
                    "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors",
                    "Sec-Fetch-Dest": "image"}
# A page on another port of localhost is the same site, but another origin.
SAME_SITE_FETCH = {"User-Agent": "Mozilla/5.0", "Sec-Fetch-Site": "same-site",
                   "Sec-Fetch-Mode": "cors", "Origin": "http://localhost:3000"}


def test_attack_11_a_cross_site_get_cannot_read_elipc_mail(server, names):
    ch, alice, bob = names("ch", "alice", "bob")
    assert server.post("/send", json={"channel": ch, "sender": alice,
                                      "content": "for bob"}).status_code == 200
    for headers in (CROSS_SITE_IMAGE, SAME_SITE_FETCH):
        stolen = server.get(f"/messages?channel={ch}&agent={bob}", headers=headers)
        assert stolen.status_code == 403 and stolen.json()["code"] == 40310, headers
        # Every route, GETs included, whatever it would answer.
        for path in ("/healthz", f"/recv?to={bob}&channel={ch}", "/agents", "/ui/feed",
                     "/openapi.json", "/ui"):
            assert server.get(path, headers=headers).status_code == 403, (path, headers)
        assert server.post("/send", json={"from": "x", "to": bob, "msg": "csrf"},
                           headers=headers).status_code == 403
    # bob's own read still gets it; a client that is no browser (el-ipc's and rapid's
    # send Mozilla/5.0 and no Sec-Fetch headers) is not affected, nor is a typed address.
    own = server.get(f"/messages?channel={ch}&agent={bob}", headers={"User-Agent": "Mozilla/5.0"})
    assert [m["content"] for m in own.json()] == ["for bob"]
    typed = server.get("/healthz", headers={"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate"})
    assert typed.status_code == 200


def test_attack_12_a_cross_site_get_cannot_mark_mail_filed(server, names):
    alice, bob = names("alice", "bob")
    message = server.send(alice, bob, "did you file this?")
    for headers in (CROSS_SITE_IMAGE, SAME_SITE_FETCH):
        marked = server.get(f"/recv?to={bob}&since=1e11&filed=true", headers=headers)
        assert marked.status_code == 403 and marked.json()["code"] == 40310
    [state] = server.get(f"/status?id={message['id']}").json()["messages"]
    assert state["state"] == "queued"
    assert [m["msg"] for m in server.get(f"/recv?to={bob}").json()["messages"]] == [
        "did you file this?"]


def _refused_cross_site(bus: BusServer) -> float:
    """How many requests the bus has refused as cross-site (its metrics; open mode)."""
    return bus.metric("agent_bus_errors_total", code="40310")


def test_attacks_11_and_12_from_a_page_in_a_real_browser(chromium, server, names):
    """A page on another site (localhost, while the bus is 127.0.0.1) embeds an image and
    fetches: Chromium marks both cross-site, and the bus obeys neither."""
    ch, alice, bob = names("ch", "alice", "bob")
    assert server.post("/send", json={"channel": ch, "sender": alice,
                                      "content": "broadcast"}).status_code == 200
    addressed = server.send(alice, bob, "addressed", channel=ch)
    page = (f'<img src="{server.url}/messages?channel={ch}&agent={bob}">'
            f'<script>fetch("{server.url}/recv?to={bob}&channel={ch}&since=1e11&filed=true",'
            f' {{mode: "no-cors"}});</script>').encode()

    # The foreign site: a real HTTP server that answers every request with the page.
    with BrokenProxy(200, page, "text/html") as site:
        browser = Browser().start()
        try:
            before = _refused_cross_site(server)
            browser.navigate(f"http://localhost:{site.httpd.server_address[1]}/")
            wait_until(lambda: _refused_cross_site(server) >= before + 2, timeout=15,
                       what="the bus refusing the page's two requests")
        finally:
            browser.close()
    [state] = server.get(f"/status?id={addressed['id']}").json()["messages"]
    assert state["state"] == "queued"
    got = server.get(f"/messages?channel={ch}&agent={bob}").json()
    assert [m["content"] for m in got] == ["broadcast", "addressed"]


# -- other ------------------------------------------------------------------------------


def test_attack_13_a_channel_limited_admin_token_sees_only_its_channels(hostile):
    on_default = hostile.send("alice", "bob", "default-secret first line")
    on_ops = hostile.send("alice", "bob", "ops line", channel="ops")
    hostile.send("alice", "never-seen-x", "dead letter on default")
    hostile.send("alice", "never-seen-y", "dead letter on ops", channel="ops")
    ops = hostile.as_("opsadmin")
    get = lambda path: hostile.bus.get(path, headers=ops)  # noqa: E731

    refused = get("/ui/feed?channel=default")
    assert refused.status_code == 403 and refused.json()["code"] == 40301
    feed = get(f"/ui/feed?watch={on_default['id']},{on_ops['id']}").json()
    assert {m["channel"] for m in feed["messages"]} == {"ops"}
    assert on_default["id"] in feed["gone"] and str(on_default["id"]) not in feed["states"]
    assert [c["channel"] for c in feed["channels"]] == ["ops"]
    assert all(set(a.get("pending", {})) <= {"ops"} for a in feed["agents"])
    assert "default-secret" not in json.dumps(feed)

    metrics = get("/metrics").text
    assert 'channel="ops"' in metrics and 'channel="default"' not in metrics
    states = {s["id"]: s["state"] for s in get(
        f"/status?id={on_default['id']}&id={on_ops['id']}").json()["messages"]}
    assert states[on_default["id"]] == "unknown" and states[on_ops["id"]] != "unknown"
    assert {m["channel"] for m in get("/undelivered?older=0").json()["messages"]} == {"ops"}
    assert set(get("/inbox").json()["recipients"]) == {"ops"}
    assert [c["channel"] for c in get("/channels").json()] == ["ops"]
    assert all(set(a["pending"]) <= {"ops"} for a in get("/agents").json())
    # An admin token without the limit sees both.
    boss = hostile.bus.get("/channels", headers=hostile.as_("boss")).json()
    assert {"default", "ops"} <= {c["channel"] for c in boss}


def test_attack_14_what_answers_without_a_token_is_what_readme_says(hostile):
    from busd.server import PUBLIC_ROUTES

    text = README.read_text(encoding="utf-8")
    paragraph = text[text.index("Without a token, only these answer"):]
    paragraph = paragraph[:paragraph.index("\n\n")]
    public = set(re.findall(r"`(GET|POST) (/[^`\s]*)`", paragraph))
    assert public == set(PUBLIC_ROUTES)
    # /openapi.json is public: it describes the software, nothing of this bus.
    document = hostile.bus.get("/openapi.json")
    assert document.status_code == 200 and document.json() == openapi.document(__version__)
    for path, operations in document.json()["paths"].items():
        for method in operations:
            answer = requests.request(method.upper(), hostile.bus.url + path, timeout=10,
                                      allow_redirects=False)
            if (method.upper(), path) in public:
                # (The login form may answer 401 to an empty form: that is its own word.)
                assert "40101" not in answer.text, (method, path)
            else:
                # JSON 40101, or for /ui the login form in its place.
                assert answer.status_code == 401, (method, path, answer.text[:200])


def test_attack_15_handoff_checks_tell_nothing_about_others_messages(hostile):
    handoff_meta = {"kind": "handoff", "files": 1, "sha256": "0" * 64, "path": "/srv/x",
                    "host": "h", "bytes": 1, "lines": 1}
    to_bob = hostile.send("alice", "bob", "x: handoff", channel="ops", meta=handoff_meta)
    broadcast = hostile.send("alice", "*", "x: handoff for all", meta=handoff_meta)
    missing = 10 ** 12

    def report(who: str, message_id: int, agent: str | None = None) -> requests.Response:
        return hostile.bus.post("/handoff-checks", headers=hostile.as_(who), json={
            "id": message_id, "agent": agent or who, "result": "verified"})

    # Someone else's message, one that does not exist, and a broadcast on a channel the
    # token may not use: the same answer, saying nothing about any of them.
    answers = {"missing": report("mallory", missing),
               "not a recipient": report("mallory", to_bob["id"]),
               "other channel": report("opsbot", broadcast["id"])}
    shapes = set()
    for case, answer in answers.items():
        assert answer.status_code == 404, (case, answer.text)
        body = answer.json()
        assert body["code"] == 40402
        assert not re.search(r"\b(ops|default|channel)\b", body["error"]), body
        shapes.add(re.sub(r"\d+", "N", body["error"].replace("opsbot", "mallory")))
    assert len(shapes) == 1, shapes
    # Reporting for another agent is refused before any message is looked at.
    assert report("mallory", to_bob["id"], agent="bob").status_code == 403
    assert report("mallory", missing, agent="bob").text == report(
        "mallory", to_bob["id"], agent="bob").text
    # The recipient itself still reports.
    assert report("bob", to_bob["id"]).status_code == 200
