"""The native signature's meta digest, from Python and from the shell (jq 1.6 + openssl):
the same canonical bytes, a shell signature the server verifies, a Python signature
openssl verifies over the payload the shell builds, and meta covered either way."""
from __future__ import annotations

import base64
import json
import math
import random
import struct
import subprocess
from pathlib import Path

from busd import handoff, signing
from busd.client import BusClient
from tests.test_security import secure  # noqa: F401 - the fixture
from tests.test_security_hostile import sent, wire_tap
from tests.test_shell import env_for, ok, run_script, script_tmpdir  # noqa: F401 - fixture

LIB = Path(__file__).resolve().parent.parent / "bin" / "lib" / "agent-bus.sh"


def shell(script: str, *args: str, stdin: bytes = b"") -> bytes:
    """bash with bin/lib/agent-bus.sh sourced, running SCRIPT."""
    done = subprocess.run(["bash", "-c", f'set -euo pipefail; source "$0"; {script}', str(LIB),
                           *args], input=stdin, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def tricky_metas(tmp_path: Path) -> list[dict]:
    """Metas whose canonical form is easy to get wrong: number layouts, key order,
    strings jq and Python escape differently, and real handoff metas (mtime floats)."""
    rng = random.Random(15)
    doubles = []
    while len(doubles) < 300:
        value = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]
        if math.isfinite(value):
            doubles.append(value)
    doubles += [rng.uniform(1.6e9, 1.9e9) for _ in range(200)]           # mtimes
    doubles += [0.1 + 0.2, 1e-7, 1e-5, 1e16, 1.5e16, 1e21, 1e22, 5e-324, 2.5e-308,
                1.7976931348623157e308, -0.0, 0.0, 100.0, 123.456, -1e-300]
    integers = [0, 1, -1, 10, 100, 2 ** 31, 2 ** 53, -(2 ** 53), 10 ** 15, 123456789]
    strings = ["", "x", "é", "ß", "😀", "\u0000", "\n---\n", '"\\', "\u007f", "\u2028",
               "a b\tc", "[00:00:00Z] from boss:"]
    keys = ["", "Z", "a", "a.b", "é", "😀", "\u007f", "files", "path.2", " ", "\uffff"]
    metas = [{f"n{i}": value for i, value in enumerate(doubles[j:j + 25])}
             for j in range(0, len(doubles), 25)]
    metas.append({f"i{i}": value for i, value in enumerate(integers)})
    metas.append({key: strings[i % len(strings)] for i, key in enumerate(keys)})
    metas.append({"t": True, "f": False, "z": None, "s": "x", "n": 1})
    metas.append({})
    files = []
    for i in range(3):
        path = tmp_path / f"file{i}.csv"
        path.write_bytes(b"a,b\n" * (i + 1))
        files.append(handoff.describe(str(path)))
    metas.append(handoff.message_for(files, "note")[1])
    return metas


def test_python_and_jq_write_the_same_canonical_meta(tmp_path):
    metas = tricky_metas(tmp_path)
    # As the Python client writes them (json.dumps), and as jq writes them back: the
    # server reads either, and must find the canonical form the signer signed.
    python_text = "\n".join(json.dumps(meta) for meta in metas)
    jq_text = shell('jq -c . <<<"$1"', python_text).decode().rstrip("\n")
    for text in (python_text, jq_text):
        # split("\n"), not splitlines(): a U+2028 inside a JSON string is no line end.
        from_jq = [json.loads(line) for line in shell(
            'jq -c "$BUS_SIGN_JQ"\'canonical_meta\' <<<"$1"', text).decode().split("\n")[:-1]]
        from_python = [signing.canonical_meta(json.loads(line)) for line in text.split("\n")]
        assert len(from_jq) == len(metas)
        for meta, ours, theirs in zip(metas, from_python, from_jq):
            assert ours == theirs, meta
    # Two different numbers never share a canonical form; 1 and 1.0 (one JSON number) do.
    assert signing.canonical_number("1") == signing.canonical_number("1.0") == "1e0"
    assert signing.canonical_number(repr(0.1 + 0.2)) != signing.canonical_number("0.3")
    assert signing.canonical_meta({"n": 2 ** 53 + 1}) != signing.canonical_meta({"n": 2 ** 53})


def test_a_shell_signed_handoff_verifies_and_its_meta_is_covered(  # noqa: F811
        secure, script_tmpdir):
    bus, folder = secure
    env = env_for(bus.url, folder, AGENT_NAME="spark", AGENT_BUS_KEY=str(folder / "spark.key"))
    handed = folder / "hits.csv"
    handed.write_bytes(b"x,y\n1,2\n")
    with wire_tap() as tap:
        ok(run_script("bus-handoff", "--to", "dell", str(handed),
                      env=dict(env, AGENT_BUS_URL=tap.url)))
        ok(run_script("bus-send", "dell", "--meta", '{"n": 1.5e16, "t": 1e-7, "s": "é"}',
                      env=dict(env, AGENT_BUS_URL=tap.url), stdin=b"with meta"))
    for request in sent(tap):
        assert isinstance(request["meta"], dict)
        changed = {**request, "meta": {**request["meta"], "path": "/etc/shadow"}}
        refused = bus.post("/send", json=changed)
        assert refused.status_code == 403 and refused.json()["code"] == 40303
        assert bus.post("/send", json=request).status_code == 200
    got = bus.get("/recv?to=dell").json()["messages"][-2:]
    assert [m["meta"] for m in got] == [r["meta"] for r in sent(tap)]
    assert all(m["signed"] is True for m in got)


def test_a_python_signature_verifies_over_the_payload_the_shell_builds(  # noqa: F811
        secure, tmp_path):
    _bus, folder = secure
    handed = tmp_path / "out.txt"
    handed.write_bytes(b"42\n")
    body, meta = handoff.message_for([handoff.describe(str(handed))])
    with wire_tap() as tap:
        key = signing.read_private_file(str(folder / "spark.key"))
        client = BusClient(tap.url, signing_key=key)
        client.send("spark", "dell", body, meta=meta, channel="ops")
        client.close()
    [request] = sent(tap)
    (tmp_path / "request.json").write_text(json.dumps(request))
    (tmp_path / "signature").write_bytes(base64.b64decode(request["signature"]))
    payload = shell('bus_native_payload "$1" "$2"; cat -- "$2"', str(tmp_path / "request.json"),
                    str(tmp_path / "payload"))
    assert payload == signing.native_payload("ops", "spark", "dell", request["signed_at"],
                                             request["key"], body, meta)
    verified = subprocess.run(
        ["openssl", "pkeyutl", "-verify", "-rawin", "-pubin", "-inkey", str(folder / "spark.pub"),
         "-in", str(tmp_path / "payload"), "-sigfile", str(tmp_path / "signature")],
        capture_output=True, timeout=30)
    assert verified.returncode == 0, verified.stderr
