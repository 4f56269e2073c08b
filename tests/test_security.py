"""Identity and security against a real server: tokens, signatures, exposure, TLS, limits."""
from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import socket
import subprocess
import threading
import time

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from busd import signing
from busd.client import BusClient
from harness.bus import BusServer, agent_bus_cmd, repo_env


def cli(*args, stdin: bytes = b"", **env):
    return subprocess.run(agent_bus_cmd(*args), input=stdin, capture_output=True,
                          env=repo_env(**env), timeout=30)


def make_token(db, name, *flags) -> str:
    result = cli("token", "create", name, "--db", str(db), *flags)
    assert result.returncode == 0, result.stderr
    return result.stdout.decode().strip()


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def authed(tmp_path):
    """A server with tokens for spark, dell, ops-only, and an admin."""
    bus = BusServer(tmp_path / "bus.db", "--hold", "1").start()
    tokens = {name: make_token(bus.db, name) for name in ("spark", "dell")}
    tokens["admin"] = make_token(bus.db, "boss", "--admin")
    tokens["ops"] = make_token(bus.db, "opsbot", "--channels", "ops")
    yield bus, tokens
    bus.stop()


def test_tokens_decide_who_sends_and_who_reads(authed):
    bus, tokens = authed
    spark, dell = bearer(tokens["spark"]), bearer(tokens["dell"])
    mail = {"from": "spark", "to": "dell", "msg": "hi"}

    no_token = bus.post("/send", json=mail)
    assert no_token.status_code == 401 and no_token.json()["code"] == 40101
    bad = bus.post("/send", json=mail, headers=bearer("abt_not-a-real-token"))
    assert bad.status_code == 401 and bad.json()["code"] == 40102
    assert bus.get("/recv?to=dell").status_code == 401

    assert bus.post("/send", json=mail, headers=spark).status_code == 200
    as_other = bus.post("/send", json={**mail, "from": "dell"}, headers=spark)
    assert as_other.status_code == 403 and "cannot send as dell" in as_other.json()["error"]
    elipc_as_other = bus.post("/send", json={"channel": "default", "sender": "dell",
                                             "content": "x"}, headers=spark)
    assert elipc_as_other.status_code == 403

    # Nobody reads another agent's mail, or moves its el-ipc watermark.
    assert bus.get("/recv?to=dell", headers=spark).status_code == 403
    assert bus.get("/messages?channel=default&agent=dell", headers=spark).status_code == 403
    got = bus.get("/messages?channel=default&agent=dell", headers=dell).json()
    assert [m["content"] for m in got] == ["hi"]
    assert [m["msg"] for m in bus.get("/recv?to=dell", headers=dell).json()["messages"]] == ["hi"]

    # Admin routes refuse agent tokens and answer admin tokens.
    for route in ("/inbox", "/channels"):
        assert bus.get(route, headers=spark).status_code == 403
        assert bus.get(route).status_code == 401
        assert bus.get(route, headers=bearer(tokens["admin"])).status_code == 200
    names_only = bus.get("/agents", headers=spark).json()
    assert names_only and all(set(a) == {"name", "role", "online", "last_seen"}
                              for a in names_only)

    # Channel-limited token.
    ops = bearer(tokens["ops"])
    assert bus.post("/send", json={"from": "opsbot", "to": "dell", "msg": "x"},
                    headers=ops).status_code == 403
    assert bus.post("/send", json={"from": "opsbot", "to": "dell", "msg": "x", "channel": "ops"},
                    headers=ops).status_code == 200
    assert bus.get("/recv?to=opsbot&channel=*", headers=ops).status_code == 403

    # Health and discovery stay public.
    assert bus.get("/healthz").status_code == 200
    assert bus.get("/.well-known/agent-card.json").json()["authentication"]["schemes"] == ["bearer"]


def test_a_revoked_token_stops_working_at_once(authed):
    bus, tokens = authed
    spark = bearer(tokens["spark"])
    assert bus.get("/recv?to=spark", headers=spark).status_code == 200
    revoked = cli("token", "revoke", "spark", "--db", bus.db)
    assert revoked.returncode == 0 and b"revoked 1 token" in revoked.stdout
    after = bus.get("/recv?to=spark", headers=spark)
    assert after.status_code == 401 and after.json()["code"] == 40102
    listing = [json.loads(line) for line in cli("token", "list", "--db", bus.db).stdout.splitlines()]
    assert any(t["agent"] == "spark" and t["revoked_at"] for t in listing)
    assert all("hash" not in t and "token" not in t for t in listing)


def test_the_database_keeps_only_token_hashes(authed):
    bus, tokens = authed
    raw = open(bus.db, "rb").read() + open(bus.db + "-wal", "rb").read()
    for token in tokens.values():
        assert token.encode() not in raw


@pytest.fixture
def secure(tmp_path):
    """A bus with an operator, and spark registered with a key made by keygen."""
    bus = BusServer(tmp_path / "bus.db", "--hold", "1").start()
    seeded = cli("operator", "seed", "root", "--out", str(tmp_path / "root"), "--db", bus.db)
    assert seeded.returncode == 0, seeded.stderr
    made = cli("keygen", "--out", str(tmp_path / "spark"))
    assert made.returncode == 0, made.stderr
    registered = cli("register", "spark", "--pubkey", str(tmp_path / "spark.pub"), "--as", "root",
                     "--key", str(tmp_path / "root.key"), "--identity", "uuid-1",
                     AGENT_BUS_URL=bus.url)
    assert registered.returncode == 0, registered.stderr
    yield bus, tmp_path
    bus.stop()


def legacy_send(bus, key_path, channel, sender, content):
    key = signing.read_private_file(str(key_path))
    signature = signing.sign(key, signing.elipc_payload(channel, sender, content))
    return bus.post("/send", json={"channel": channel, "sender": sender, "content": content,
                                   "signature": signature})


def test_keygen_keys_drive_the_elipc_secure_flow_and_the_card_has_the_did(secure):
    bus, folder = secure
    assert (folder / "spark.key").read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert (folder / "spark.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert oct((folder / "spark.key").stat().st_mode & 0o777) == "0o600"
    assert bus.get("/health").json()["secure_mode"] is True

    unsigned = bus.post("/send", json={"channel": "c", "sender": "spark", "content": "x"})
    assert unsigned.status_code == 403 and unsigned.json()["code"] == 40302
    accepted = legacy_send(bus, folder / "spark.key", "c", "spark", "signed hello")
    assert accepted.status_code == 200, accepted.text
    got = bus.get("/messages?channel=c&agent=dell").json()
    assert [(m["content"], m.get("signed")) for m in got] == [("signed hello", True)]
    wrong_key = legacy_send(bus, folder / "root.key", "c", "spark", "forged")
    assert wrong_key.status_code == 403 and wrong_key.json()["code"] == 40303
    unknown = legacy_send(bus, folder / "spark.key", "c", "mallory", "who?")
    assert unknown.status_code == 403 and unknown.json()["code"] == 40304

    card = bus.get("/.well-known/agent-card.json").json()
    assert card["did"] == signing.did_key((folder / "root.pub").read_text())
    assert card["did"].startswith("did:key:z6Mk")  # every Ed25519 did:key starts so
    listing = bus.get("/agents").json()
    assert {(a["name"], a["role"], a["registered_by"]) for a in listing} >= {
        ("root", "operator", None), ("spark", "agent", "root")}
    assert all("public_key" not in a for a in listing)


def test_native_signatures_refuse_replays_and_stale_times(secure):
    bus, folder = secure
    env = {"AGENT_BUS_URL": bus.url, "AGENT_NAME": "spark", "AGENT_BUS_KEY": str(folder / "spark.key")}
    sent = cli("send", "dell", "--key", "k1", stdin=b"native hello", **env)
    assert sent.returncode == 0, sent.stderr
    ack = json.loads(sent.stdout)

    # Capture-and-replay: the very same signed request again stores nothing.
    key = signing.read_private_file(str(folder / "spark.key"))
    signed_at = int(time.time() * 1000)
    body = {"from": "spark", "to": "dell", "msg": "pay 5", "channel": "default", "key": "k2",
            "signed_at": signed_at,
            "signature": signing.sign(key, signing.native_payload(
                "default", "spark", "dell", signed_at, "k2", "pay 5", None))}
    first = bus.post("/send", json=body)
    assert first.status_code == 200
    replay = bus.post("/send", json=body)
    assert replay.status_code == 409 and replay.json()["code"] == 40902
    assert replay.json()["id"] == first.json()["id"]
    bodies = [m["msg"] for m in bus.get("/recv?to=dell").json()["messages"]]
    assert bodies == ["native hello", "pay 5"]
    assert ack["id"] < first.json()["id"]

    # Tampering with any covered field breaks the signature.
    tampered = bus.post("/send", json={**body, "key": "k3", "to": "cube"})
    assert tampered.status_code == 403 and tampered.json()["code"] == 40303

    stale_at = int((time.time() - 600) * 1000)
    stale = bus.post("/send", json={**body, "key": "k4", "signed_at": stale_at, "signature":
                                    signing.sign(key, signing.native_payload(
                                        "default", "spark", "dell", stale_at, "k4", "pay 5",
                                        None))})
    assert stale.status_code == 403 and stale.json()["code"] == 40305


def test_legacy_signatures_are_refused_once_native_signing_is_in_use(secure):
    bus, folder = secure
    assert legacy_send(bus, folder / "spark.key", "c", "spark", "old style").status_code == 200
    env = {"AGENT_BUS_URL": bus.url, "AGENT_NAME": "spark", "AGENT_BUS_KEY": str(folder / "spark.key")}
    assert cli("send", "dell", stdin=b"new style", **env).returncode == 0
    refused = legacy_send(bus, folder / "spark.key", "c", "spark", "old style again")
    assert refused.status_code == 403 and refused.json()["code"] == 40306


@pytest.mark.parametrize("setting, accepted", [("on", True), ("off", False)])
def test_the_legacy_signature_setting(tmp_path, setting, accepted):
    with BusServer(tmp_path / "bus.db", "--legacy-signatures", setting) as bus:
        assert cli("operator", "seed", "root", "--out", str(tmp_path / "root"),
                   "--db", bus.db).returncode == 0
        assert cli("keygen", "--out", str(tmp_path / "a")).returncode == 0
        assert cli("register", "a", "--pubkey", str(tmp_path / "a.pub"), "--as", "root",
                   "--key", str(tmp_path / "root.key"), AGENT_BUS_URL=bus.url).returncode == 0
        env = {"AGENT_BUS_URL": bus.url, "AGENT_NAME": "a", "AGENT_BUS_KEY": str(tmp_path / "a.key")}
        assert cli("send", "b", stdin=b"native first", **env).returncode == 0
        reply = legacy_send(bus, tmp_path / "a.key", "c", "a", "legacy after native")
        assert (reply.status_code == 200) is accepted
        assert bus.stop() == 0


def test_a_registration_carrying_a_private_key_is_refused(secure):
    bus, folder = secure
    old_style = bus.post("/register", json={
        "name": "eve", "public_key": (folder / "spark.pub").read_text(), "operator": "root",
        "operator_key": (folder / "root.key").read_text()})
    assert old_style.status_code == 400 and old_style.json()["code"] == 40013
    assert "sign the registration on the operator's machine" in old_style.json()["error"]
    hidden = bus.post("/register", json={
        "name": "eve", "public_key": (folder / "root.key").read_text(), "operator": "root",
        "signature": "AAAA", "signed_at": int(time.time() * 1000)})
    assert hidden.status_code == 400 and hidden.json()["code"] == 40013
    assert all(a["name"] != "eve" for a in bus.get("/agents").json())


def test_a_registration_signed_by_a_non_operator_is_refused(secure):
    bus, folder = secure
    forged = cli("register", "eve", "--pubkey", str(folder / "spark.pub"), "--as", "spark",
                 "--key", str(folder / "spark.key"), AGENT_BUS_URL=bus.url)
    assert forged.returncode == 1
    assert b"the registration is not signed by an operator of this bus" in forged.stderr


def test_non_loopback_needs_auth_and_starts_with_a_token_store(tmp_path):
    db = tmp_path / "bus.db"
    refused = subprocess.run(agent_bus_cmd("serve", "--host", "0.0.0.0", "--port", "0",
                                           "--db", str(db)),
                             env=repo_env(), capture_output=True, text=True, timeout=20)
    assert refused.returncode == 2 and "without authentication" in refused.stderr
    make_token(db, "spark")
    # Bound to every address but only ever spoken to over loopback here.
    with BusServer(db, "--host", "0.0.0.0") as bus:
        local = BusClient(f"http://127.0.0.1:{bus.port}")
        assert local.healthz()["ok"] is True
        local.close()
        assert bus.stop() == 0


def test_foreign_host_and_cross_site_origin_are_refused(server):
    spoofed = server.get("/recv?to=x", headers={"Host": "evil.example:9876"})
    assert spoofed.status_code == 403 and spoofed.json()["code"] == 40307
    cross = server.post("/send", json={"from": "a", "to": "b", "msg": "csrf"},
                        headers={"Origin": "http://evil.example"})
    assert cross.status_code == 403 and cross.json()["code"] == 40308
    same = server.post("/send", json={"from": "a", "to": "b", "msg": "ok"},
                       headers={"Origin": server.url})
    assert same.status_code == 200
    assert server.get("/healthz", headers={"Host": "localhost"}).status_code == 200


def _certificate(folder):
    """A private CA and a server certificate for 127.0.0.1/localhost signed by it."""
    def name(common):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test CA")).issuer_name(name("test CA"))
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {n: folder / f"{n}.pem" for n in ("ca", "cert", "key")}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


def test_tls_with_a_private_ca(tmp_path):
    pem = _certificate(tmp_path)
    with BusServer(tmp_path / "bus.db", "--tls-cert", str(pem["cert"]),
                   "--tls-key", str(pem["key"])) as bus:
        assert bus.url.startswith("https://")
        client = BusClient(bus.url, ca=str(pem["ca"]))
        assert client.send("spark", "dell", "over tls")["ok"] is True
        client.close()
        sent = cli("send", "dell", stdin=b"cli over tls", AGENT_BUS_URL=bus.url,
                   AGENT_NAME="spark", AGENT_BUS_CA=str(pem["ca"]))
        assert sent.returncode == 0, sent.stderr
        untrusted = cli("send", "dell", stdin=b"x", AGENT_BUS_URL=bus.url, AGENT_NAME="spark")
        assert untrusted.returncode == 3 and b"AGENT_BUS_CA" in untrusted.stderr
        got = requests.get(bus.url + "/recv?to=dell", verify=str(pem["ca"]), timeout=10).json()
        assert [m["msg"] for m in got["messages"]] == ["over tls", "cli over tls"]
        assert bus.stop() == 0


def test_a_flood_from_one_agent_is_limited_and_others_are_not(tmp_path):
    with BusServer(tmp_path / "bus.db", "--rate", "20", "--burst", "20", "--hold", "2") as bus:
        flood, calm = make_token(bus.db, "flood"), make_token(bus.db, "calm")
        statuses = []
        parked = {}

        def park():
            parked["reply"] = requests.get(f"{bus.url}/recv?to=calm&block=true&since=0",
                                           headers=bearer(calm), timeout=30)

        waiter = threading.Thread(target=park)
        waiter.start()
        with requests.Session() as session:
            session.headers.update(bearer(flood))
            for i in range(200):
                statuses.append(session.post(f"{bus.url}/send", json={
                    "from": "flood", "to": "x", "msg": str(i)}, timeout=10))
        limited = [r for r in statuses if r.status_code == 429]
        assert len(limited) > 100
        assert limited[0].headers["Retry-After"].isdigit()
        assert limited[0].json()["code"] == 42901
        # The calm agent is untouched: its send succeeds and its parked poll gets it.
        assert requests.post(f"{bus.url}/send", json={"from": "calm", "to": "calm", "msg": "fine"},
                             headers=bearer(calm), timeout=10).status_code == 200
        waiter.join(30)
        assert [m["msg"] for m in parked["reply"].json()["messages"]] == ["fine"]
        assert bus.stop() == 0


def test_an_idle_connection_is_cut_off_without_blocking_others(tmp_path):
    with BusServer(tmp_path / "bus.db", "--idle-timeout", "1") as bus:
        silent = socket.create_connection(("127.0.0.1", bus.port), timeout=10)
        assert bus.get("/healthz").status_code == 200  # others are served meanwhile
        started = time.monotonic()
        assert silent.recv(1) == b""  # the server closed it
        assert time.monotonic() - started < 5
        silent.close()
        assert bus.stop() == 0


def test_did_key_matches_a_known_vector():
    # The W3C did:key test vector for the all-zero... is not Ed25519-specific; check the
    # encoding against a key made from a fixed seed instead.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    key = Ed25519PrivateKey.from_private_bytes(bytes(32))
    did = signing.did_key(signing.public_pem(key.public_key()))
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert did.startswith("did:key:z6Mk")
    assert base64.b16encode(raw).lower() == \
        b"3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29"
    assert did == "did:key:z6MkiTBz1ymuepAQ4HEHYSF1H8quG5GLVVQR3djdX3mDooWp"


def test_the_daemon_works_over_tls_with_a_private_ca(tmp_path):
    from harness.agents import AgentProcess, inbox_messages
    from harness.bus import wait_until
    pem = _certificate(tmp_path)
    with BusServer(tmp_path / "bus.db", "--tls-cert", str(pem["cert"]),
                   "--tls-key", str(pem["key"])) as bus:
        with AgentProcess("dell", tmp_path / "spool", bus.url,
                          AGENT_BUS_CA=str(pem["ca"])) as dell:
            client = BusClient(bus.url, ca=str(pem["ca"]))
            client.send("spark", "dell", "to a daemon over https")
            client.close()
            wait_until(lambda: inbox_messages(dell.layout), what="the message in dell's inbox")
            assert [body for _, body in inbox_messages(dell.layout)] == [b"to a daemon over https"]
            assert dell.stop() == 0
        assert bus.stop() == 0
