"""bin/bus-handoff, bin/bus-verify, the secret guard and signing in the shell mirrors,
run for real (bash, curl, jq, openssl, sha256sum) against a real bus and compared with
the `agent-bus` commands they mirror."""
from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import json
import os
import random
import re
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from busd import handoff, signing
from busd.agent.inbox import format_inbox_file
from busd.agent.spool import SpoolLayout
from busd.secretguard import bip39_words, find_secret
from harness.agents import AgentProcess
from harness.bus import REPO, agent_bus_cmd
from tests.test_secretguard import LOOK_ALIKES, SECRETS
from tests.test_security import secure  # noqa: F401  (the secure-mode bus fixture)
from tests.test_shell import (BIN, LIB, BrokenProxy, _assert_failure, env_for, ok,  # noqa: F401
                              jq_compact_format, run_cli, run_script, script_tmpdir)
from tests.test_systemd import install, make_venv

WORDS = REPO / "busd" / "data" / "bip39-english.txt"
SHAPES = REPO / "busd" / "data" / "secret-shapes.json"
SQLITE_ONLY = pytest.mark.parametrize("server", ["sqlite"], indirect=True)


def as_shell(python_stderr: bytes, command: str) -> bytes:
    """Python's message as the shell mirror words it: its own name, and bus-handoff."""
    return (python_stderr.replace(f"agent-bus {command}:".encode(), f"bus-{command}:".encode())
            .replace(b"agent-bus handoff --to", b"bus-handoff --to"))


def last_messages(server, to: str, count: int, channel: str = "*") -> list[dict]:
    got = server.get(f"/recv?to={to}&channel={channel}&max=1000").json()["messages"]
    assert len(got) >= count
    return got[-count:]


# -- bus-handoff ----------------------------------------------------------------------


def make_files(folder: Path) -> list[Path]:
    """Files whose line counts and names are easy to get wrong, with odd mtimes."""
    folder.mkdir()
    contents = {
        "hits.csv": b"a,1\nb,2\nc,3\n",
        "no newline at the end.txt": b"one\ntwo",
        "-starts-with-a-dash": b"dash\n",
        "empty": b"",
        "only newlines": b"\n\n\n",
        "one byte": b"x",
        "binary.bin": bytes(range(256)) * 5000,           # past a 1 MiB read, ends in \xff
        "crossing a chunk": b"y" * ((1 << 20) - 1) + b"\n",  # the newline is the chunk's last byte
        "é 日本 $(x) 'q' \"d\" \\ .csv": "ünïcode\n".encode(),
    }
    rng = random.Random(7)
    paths = []
    for index, (name, data) in enumerate(contents.items()):
        path = folder / name
        path.write_bytes(data)
        path.chmod(0o644)
        # A whole second, a time before 1970 and arbitrary nanoseconds: st_mtime is the
        # float seconds + nanoseconds * 1e-9, which the shell must reproduce exactly.
        ns = [1_700_000_000 * 10**9, -1_750_000_000, rng.randrange(10**18, 2 * 10**18)][index % 3]
        os.utime(path, ns=(ns, ns))
        paths.append(path)
    return paths


@SQLITE_ONLY
def test_handoff_sends_the_same_message_as_python(server, names, tmp_path):
    spark, dell = names("spark", "dell")
    files = make_files(tmp_path / "files")
    env = env_for(server.url, tmp_path, AGENT_NAME=spark)
    # Relative paths with . and .., a leading // (made one /), a name that starts with a
    # dash after `--`.
    args = ["--to", dell, "--note", "T1 done: 4/4 verified", "--channel", "ops",
            "../files/./hits.csv", f"/{files[1]}", "--", files[2].name,
            *[str(p) for p in files[3:]]]
    shell = subprocess.run([str(BIN / "bus-handoff"), *args], cwd=files[0].parent, env=env,
                           capture_output=True, timeout=60)
    python = subprocess.run(agent_bus_cmd("handoff", *args), cwd=files[0].parent, env=env,
                            capture_output=True, timeout=60)
    assert shell.returncode == python.returncode == 0, (shell.stderr, python.stderr)
    assert jq_compact_format(shell.stdout) and shell.stderr == b""
    by_shell, by_python = last_messages(server, dell, 2, "ops")
    assert by_shell["msg"] == by_python["msg"]
    assert list(by_shell["meta"].items()) == list(by_python["meta"].items())  # order too
    meta = by_shell["meta"]
    assert (meta["kind"], meta["files"], meta["path.2"]) == ("handoff", len(files), str(files[1]))
    host = socket.gethostname()
    for index, path in enumerate(files, start=1):
        suffix = "" if index == 1 else f".{index}"
        data = path.read_bytes()
        lines = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
        assert meta["sha256" + suffix] == hashlib.sha256(data).hexdigest()
        assert (meta["bytes" + suffix], meta["lines" + suffix], meta["host" + suffix]) == \
            (len(data), lines, host)
        assert meta["mtime" + suffix] == path.stat().st_mtime   # exactly, not approximately
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert by_shell["msg"].split("\n")[0] == \
        f"hits.csv: lines=3 sha256={meta['sha256']} at {host}:{files[0]}"
    assert by_shell["msg"].endswith("\nT1 done: 4/4 verified")


def test_handoff_paths_are_made_absolute_alike(tmp_path):
    """bus-handoff's absolute path (realpath -m -s) is busd/handoff.py absolute()'s."""
    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    paths = ["a", "./a", "a/", "a//b", "a/./b/../c", "../x", "../../../../../..", ".", "..",
             "/", "//", "///", "//a//b/", "///a/../b", "/a/b/../../..", "-n", "a b/ c",
             "new\nline", "trailing newline\n", "é/日本", "..a/.b/...", "a/../../b"]
    # In a folder reached through a link: both take the physical working folder.
    script = f'. "{LIB}"; while IFS= read -r -d "" p; do bus_absolute "$p"; printf "\\0"; done'
    for cwd in (real / "sub", tmp_path / "link" / "sub"):
        result = subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, check=True,
                                input="".join(p + "\0" for p in paths).encode())
        shell = result.stdout.decode().split("\0")[:-1]
        here = os.getcwd()
        try:
            os.chdir(cwd)
            expected = [handoff.absolute(p) for p in paths]
        finally:
            os.chdir(here)
        assert shell == expected


def test_handoff_refuses_what_python_refuses(server, names, tmp_path):
    spark, dell = names("spark", "dell")
    good = tmp_path / "good.txt"
    good.write_text("data\n")
    folder = tmp_path / "a folder"
    folder.mkdir()
    env = env_for(server.url, tmp_path, AGENT_NAME=spark)
    cases = [
        (("--to", dell, str(tmp_path / "missing")), env, 2, "missing: not a regular file"),
        (("--to", dell, str(folder)), env, 2, "a folder: not a regular file"),
        (("--to", dell, str(good), "--note", "api_key: live-9f8e7d6c5b4a"), env, 1,
         "--note: the message looks like it holds a password or secret in an assignment; "
         "send it as a file instead: bus-handoff --to NAME FILE"),
        (("--to", "bad name", str(good)), env, 1, "the bus answered 400: invalid name"),
        (("--to", dell, str(good)), dict(env, AGENT_NAME=""), 2, "no agent name"),
        (("--to", dell, str(good)), dict(env, AGENT_BUS_URL=""), 2, "AGENT_BUS_URL is not set"),
        (("--to", dell, str(good)), dict(env, AGENT_BUS_URL="http://127.0.0.1:9"), 3,
         "cannot reach the bus at http://127.0.0.1:9"),
    ]
    for args, case_env, code, text in cases:
        shell = run_script("bus-handoff", *args, env=case_env)
        python = run_cli("handoff", *args, env=case_env)
        _assert_failure(shell, code, text)
        assert python.returncode == code, python.stderr
        if code != 3:  # the reason for a failed connection is worded by curl or by requests
            assert shell.stderr == as_shell(python.stderr, "handoff"), (shell.stderr, python.stderr)
    for args in ((), ("--to", dell), (str(good),), ("--to", dell, str(good), "--bogus")):
        _assert_failure(run_script("bus-handoff", *args, env=env), 2, "see bus-handoff -h")
        assert run_cli("handoff", *args, env=env).returncode == 2
    assert stat.S_IMODE(good.stat().st_mode) == 0o600


# -- bus-verify -----------------------------------------------------------------------


def wait_for_blocks(agent: AgentProcess, count: int, timeout: float = 30.0) -> None:
    """Until the daemon has printed `count` Monitor blocks (each filed in its inbox)."""
    deadline = time.monotonic() + timeout
    with agent.changed:
        while sum(line == "---\n" for line in agent.stdout) < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{count} messages not filed in {timeout}s: {agent.stdout}"
            agent.changed.wait(remaining)


@SQLITE_ONLY
def test_verify_prints_and_exits_as_python(server, names, tmp_path):
    spark, dell = names("spark", "dell")
    shared = tmp_path / "shared"
    shared.mkdir()
    # Names that come back from the inbox headers as JSON (a newline, blanks at the
    # end) and as plain text; one file in two handoffs.
    kept, changed, gone = shared / "kept.csv", shared / "changed\nname.txt", shared / "gone  "
    for path in (kept, changed, gone):
        path.write_text(f"{path.name}\n")
    spool = tmp_path / "spool"
    env = env_for(server.url, tmp_path, AGENT_NAME=spark)
    dell_env = env_for(server.url, tmp_path, AGENT_NAME=dell, AGENT_BUS_SPOOL=str(spool))
    with AgentProcess(dell, spool, server.url) as agent:
        sends = [("bus-handoff", "--to", dell, str(kept)),
                 ("bus-handoff", "--to", dell, str(kept), str(changed), "--note", "two files"),
                 ("bus-handoff", "--to", dell, str(gone)),
                 ("bus-send", dell)]
        for script, *args in sends:
            ok(run_script(script, *args, env=env, stdin=b"not a handoff"))
        wait_for_blocks(agent, len(sends))
        assert agent.stop() == 0
    ids = [int(line.split(b"\t", 1)[0])
           for line in ok(run_script("bus-inbox", env=dell_env)).splitlines()]
    changed.write_text("tampered\n")
    gone.unlink()

    def both(*args, env=dell_env):
        shell, python = run_script("bus-verify", *args, env=env), run_cli("verify", *args, env=env)
        assert shell.stdout == python.stdout, (args, shell, python)
        assert shell.returncode == python.returncode, (args, shell, python)
        return shell

    assert both(str(ids[0])).stdout == f"verified\t{kept}\n".encode()
    assert both(str(ids[1]), "--name", dell, env=dict(dell_env, AGENT_NAME=spark)).returncode == 1
    assert both(str(ids[1])).stdout == f"verified\t{kept}\nmismatch\t{changed}\n".encode()
    assert both(f"00{ids[2]}").stdout == f"unreachable\t{gone}\n".encode()
    assert both(f"00{ids[2]}").returncode == 3
    for args, text in (((str(ids[3]),), f"message {ids[3]} is not a handoff"),
                       (("999999",), f"no message 999999 in {spool / dell / 'inbox'}"),
                       (("x",), "give an inbox message id, or a FILE and its SHA256")):
        _assert_failure(both(*args), 2, text)
    _assert_failure(run_script("bus-verify", "1", env=dict(dell_env, AGENT_NAME="")), 2,
                    "no agent name")
    _assert_failure(run_script("bus-verify", "1", "--name", "a b", env=dell_env), 2,
                    "invalid agent name 'a b'")
    # A file and the hash it should have.
    digest = hashlib.sha256(kept.read_bytes()).hexdigest()
    for args, code in (((str(kept), digest), 0), ((str(kept), digest.upper()), 0),
                       ((str(changed), digest), 1), ((str(gone), digest), 3),
                       ((str(shared), digest), 3)):
        assert both(*args).returncode == code, args


def test_verify_reads_a_handoff_as_python_does_and_never_hangs(tmp_path):
    """Malformed meta gets Python's error; a FIFO, a device or a file of another size
    than announced is never read (each would hang or take minutes)."""
    fifo, big = tmp_path / "pipe", tmp_path / "big.bin"
    os.mkfifo(fifo)
    with open(big, "wb") as handle:
        handle.truncate(10 * 1024 ** 3)
    good = {"kind": "handoff", "files": 1, "sha256": "ab" * 32, "bytes": 8}
    metas = [dict(good, path=str(fifo)), dict(good, path="/dev/zero", bytes=10 ** 12),
             dict(good, path=str(big)), dict(good, path="/x", files="x"),
             dict(good, path="/x", files=10 ** 12), dict(good, path="/x", bytes="abc"),
             dict(good, path="/x", bytes=8.0), dict(good, path="/a\x00b"),
             dict(good, path="x"), dict(good, path="/x", sha256="z" * 64),
             dict(good, path="/x", files=2), {"kind": "handoff", "files": "01"}]
    spool = tmp_path / "spool"
    layout = SpoolLayout.for_agent(str(spool), "dell")
    layout.create()
    for message_id, meta in enumerate(metas, start=1):
        message = {"id": message_id, "ts": 1795000000.0 + message_id, "from": "spark",
                   "to": "dell", "msg": "x", "meta": meta}
        (Path(layout.inbox) / f"{message['ts']:.6f}-{message_id}-spark.msg").write_bytes(
            format_inbox_file(message))
    env = env_for("http://127.0.0.1:9", tmp_path, AGENT_BUS_SPOOL=str(spool), AGENT_NAME="dell")
    for message_id in range(1, len(metas) + 1):
        shell = run_script("bus-verify", str(message_id), env=env, timeout=30)
        python = run_cli("verify", str(message_id), env=env, timeout=30)
        assert (shell.returncode, shell.stdout) == (python.returncode, python.stdout), message_id
        assert shell.stderr == as_shell(python.stderr, "verify"), message_id
    assert run_cli("verify", "3", env=env).stdout == f"mismatch\t{big}\n".encode()
    assert b"meta.files is not a number" in run_cli("verify", "4", env=env).stderr
    for path in (fifo, "/dev/zero"):
        shell = run_script("bus-verify", str(path), "ab" * 32, env=env, timeout=30)
        assert (shell.returncode, shell.stdout) == (3, f"unreachable\t{path}\n".encode())


# -- the secret guard ---------------------------------------------------------------


@SQLITE_ONLY
def test_bus_send_refuses_the_corpus_as_agent_bus_send_does(server, names, tmp_path):
    spark, dell = names("spark", "dell")
    env = env_for(server.url, tmp_path, AGENT_NAME=spark)
    corpus = list(SECRETS.values()) + list(LOOK_ALIKES.values())

    def both(body: str):
        return (run_script("bus-send", dell, env=env, stdin=body.encode()),
                run_cli("send", dell, env=env, stdin=body.encode()))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(both, corpus))
    for body, (shell, python) in zip(corpus, results):
        if find_secret(body) is None:
            assert shell.returncode == python.returncode == 0, (body, shell.stderr)
        else:
            assert shell.returncode == python.returncode == 1, (body, shell.stderr)
            assert shell.stdout == b"" and shell.stderr == as_shell(python.stderr, "send")
    accepted = sorted(m["msg"] for m in last_messages(server, dell, 2 * len(LOOK_ALIKES)))
    assert accepted == sorted(list(LOOK_ALIKES.values()) * 2)
    # --allow-secret sends one anyway, byte for byte.
    anyway = [SECRETS[name] for name in ("ed25519 PEM", "unlabelled 64 hex", "seed phrase (12 words)")]
    for body in anyway:
        ok(run_script("bus-send", dell, "--allow-secret", env=env, stdin=body.encode()))
    assert [m["msg"] for m in last_messages(server, dell, len(anyway))] == anyway


def guard(texts: list[str]) -> list[str | None]:
    """find_secret of each text by the shell library's jq definitions, in one jq run."""
    script = (f'. "{LIB}" && jq -nc --rawfile words "{WORDS}" --slurpfile shapes "{SHAPES}" '
              '"$BUS_GUARD_JQ (\\$words | bip39_set) as \\$set | inputs '
              '| find_secret(\\$shapes[0]; \\$set)"')
    result = subprocess.run(["bash", "-c", script], capture_output=True, check=True,
                            input="".join(json.dumps(t) + "\n" for t in texts).encode())
    return [json.loads(line) for line in result.stdout.splitlines()]


def generated_texts(count: int, seed: int) -> list[str]:
    """Texts built from the pieces each rule looks at: labels and separators before hex,
    0x, word boundaries, Unicode blanks, base58 runs, seed words with punctuation."""
    rng = random.Random(seed)
    hexdigest = hashlib.sha256(b"x").hexdigest()
    words = sorted(bip39_words())
    b58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
    pieces = ["sha256", "SHA-256", "sha256sum", "Sha", "digest", "hash", "checksum", "txid", "tx",
              "block", "commit", ":", "=", " ", "  ", "\n", "\t", "\u3000", "\u2028", "\x1c",
              "\xa0", "(", '"', "'", "0x", "0X", "a", "é", "x", "²", "_", "-", "\x00", "\r",
              hexdigest, hexdigest.upper(), hexdigest[:63], hexdigest + "a",
              "AKIAIOSFODNN7EXAMPLE", "ghp_" + "a1B2" * 9, "Bearer ", "bearer\n", "abcdefghij" * 3,
              "password", "passwd", "pwd", " = ", ": ", "hunter2hunter2", "api-key", "Api_Key",
              "postgres://", "u:pw@", "user:secret@", "https://", "xprv", "abt_", "Q" * 31, "sk-",
              "proj-", "eyJabcdefgh.eyJabcdefgh.abcdefghij", "AccountKey=", "A" * 40, "aws",
              "_secret", " private ", '"private_key"', "glpat-", "xoxb-", "sk_live_", "AIza",
              "github_pat_", "\u0301"]
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 12)):
            roll = rng.random()
            if roll < 0.25:
                run = [rng.choice(words) if rng.random() > 0.03 else rng.choice(["Able", "x."])
                       for _ in range(rng.choice([11, 12, 13, 24]))]
                separator = rng.choice([" ", "\n", "  ", " \t", ", ", ". ", " \u3000 "])
                parts.append(separator.join(w + rng.choice(["", "", ",", ".", ";", ".,"])
                                            for w in run))
            elif roll < 0.35:
                parts.append("".join(rng.choice(b58) for _ in range(
                    rng.choice([49, 50, 51, 52, 79, 80, 90, 91, 101, 110]))))
            else:
                parts.append(rng.choice(pieces))
        text = "".join(parts)
        if rng.random() < 0.2:
            text = rng.choice([" ", "\u3000", "\n"]) + text + rng.choice(["", " ", "\n", "\u3000"])
        texts.append(text)
    return texts


def test_the_shell_guard_names_what_python_names():
    texts = list(SECRETS.values()) + list(LOOK_ALIKES.values()) + generated_texts(1500, seed=11)
    expected = [find_secret(t) for t in texts]
    assert guard(texts) == expected
    assert 0.2 < expected.count(None) / len(texts) < 0.8, "the generated texts test both ways"
    # Where the regex engines differ: Oniguruma's (?i) folds "ß" to "ss", and a
    # look-behind cannot be case-insensitive, so the digest labels match ASCII case only
    # ("ſ" is an s to Python). Either way the shell refuses more, never less.
    hexdigest = hashlib.sha256(b"x").hexdigest()
    odd = ["paßword = hunter2hunter2", f"ſha256 {hexdigest}"]
    assert [find_secret(t) for t in odd] == [None, None]
    assert guard(odd) == ["a password or secret in an assignment", "an unlabelled 64-hex-digit key"]


def test_the_guard_data_is_installed_beside_the_library_and_needed(tmp_path, script_tmpdir):
    """One copy of the shapes and the word list, in busd/data/, read by Python and shell."""
    for data in (WORDS, SHAPES):
        assert not (BIN / "lib" / data.name).exists(), "one copy, in busd/data/"
    home = tmp_path / "home"
    install(home, make_venv(tmp_path))
    installed = home / ".local" / "share" / "agent-bus" / "bin"
    for data in (WORDS, SHAPES):
        assert (installed / "lib" / data.name).read_bytes() == data.read_bytes()
    seed = " ".join(sorted(bip39_words())[i * 97 % 2048] for i in range(12))
    env = env_for("http://127.0.0.1:9", tmp_path, AGENT_NAME="spark")
    refused = subprocess.run([str(home / ".local" / "bin" / "bus-send"), "dell"], env=env,
                             input=seed.encode(), capture_output=True, timeout=30)
    _assert_failure(refused, 1, "looks like it holds a seed phrase")
    # bin/ copied without the data: the guard cannot run, and says what to do.
    bare = tmp_path / "bare"
    shutil.copytree(BIN, bare)
    lost = subprocess.run([str(bare / "bus-send"), "dell"], env=env, input=b"hello",
                          capture_output=True, timeout=30)
    _assert_failure(lost, 2, "the secret guard's data is missing: copy busd/data/secret-shapes.json")


# -- signing ----------------------------------------------------------------------------


def test_bus_send_signs_as_the_python_client_does(secure, script_tmpdir):  # noqa: F811
    bus, folder = secure
    env = env_for(bus.url, folder, AGENT_NAME="spark", AGENT_BUS_KEY=str(folder / "spark.key"))
    # What bus-send posts, seen by a real HTTP server that records the request.
    with BrokenProxy(200, b'{"ok": true, "ts": 1.5, "channel": "default", "id": 1}',
                     "application/json") as recorder:
        for args in ((), ("--key", "k-1", "--channel", "ops")):
            ok(run_script("bus-send", "dell", *args, env=dict(env, AGENT_BUS_URL=recorder.url),
                          stdin="pay 5 ✓\n".encode()))
    bodies = recorder.bodies
    first, second = (json.loads(b) for b in bodies)
    assert re.fullmatch("[0-9a-f]{32}", first["key"])   # a fresh nonce when none is given
    assert second["key"] == "k-1" and second["channel"] == "ops"
    public = (folder / "spark.pub").read_text()
    for body in (first, second):
        assert isinstance(body["signed_at"], int) and abs(body["signed_at"] / 1000 - time.time()) < 60
        assert "\n" not in body["signature"] and len(base64.b64decode(body["signature"])) == 64
        assert signing.verify(public, signing.native_payload(
            body["channel"], body["from"], body["to"], body["signed_at"], body["key"], body["msg"],
            body.get("meta")), body["signature"])
    # The real bus in secure mode takes the recorded request, and refuses it tampered.
    assert bus.post("/send", json=first).status_code == 200
    for change in ({"to": "cube"}, {"msg": "pay 500"}, {"channel": "x"}, {"key": "other"},
                   {"signed_at": first["signed_at"] + 1}, {"meta": {"path": "/etc/shadow"}}):
        refused = bus.post("/send", json={**first, **change})
        assert refused.status_code == 403 and refused.json()["code"] == 40303, change
    # bus-send itself: accepted; the same key again is a replay of our own send (409
    # 40902), success for both tools, with the same acknowledgement.
    sent = json.loads(ok(run_script("bus-send", "dell", "--key", "k-2", env=env, stdin=b"hello")))
    again = ok(run_script("bus-send", "dell", "--key", "k-2", env=env, stdin=b"hello"))
    assert again == ok(run_cli("send", "dell", "--key", "k-2", env=env, stdin=b"hello"))
    assert json.loads(again) == {**sent, "duplicate": True}
    handed = tmp_file(folder, "result.txt")
    ok(run_script("bus-handoff", "--to", "dell", str(handed), env=env))
    got = bus.get("/recv?to=dell&channel=*").json()["messages"]
    assert [m["msg"] for m in got][-2:] == ["hello", f"result.txt: lines=1 sha256="
                                            f"{hashlib.sha256(b'42').hexdigest()} at "
                                            f"{socket.gethostname()}:{handed}"]
    assert all(m.get("signed") for m in got[-2:])
    # Unsigned, or signed with another key: refused by the bus, exit 1.
    _assert_failure(run_script("bus-send", "dell", env=dict(env, AGENT_BUS_KEY=""), stdin=b"x"),
                    1, "the bus answered 403")
    _assert_failure(run_script("bus-send", "dell", env=dict(env, AGENT_BUS_KEY=str(folder / "root.key")),
                               stdin=b"x"), 1, "the bus answered 403")


def tmp_file(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_bytes(b"42")
    return path


def test_a_key_that_cannot_sign_is_refused_as_python_refuses_it(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    key = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "a folder").mkdir()
    files = {
        "missing": None,
        "a folder": None,
        "public.pem": signing.public_pem(key.public_key()).encode(),
        "rsa.pem": rsa.generate_private_key(65537, 1024).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()),
        "encrypted.pem": key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pass")),
        "der.key": key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()),
    }
    for name, data in files.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        env = env_for("http://127.0.0.1:9", tmp_path, AGENT_NAME="spark",
                      AGENT_BUS_KEY=str(tmp_path / name))
        shell, python = (run_script("bus-send", "dell", env=env, stdin=b"x"),
                         run_cli("send", "dell", env=env, stdin=b"x"))
        _assert_failure(shell, 2, "AGENT_BUS_KEY: ")
        assert python.returncode == 2
        # Python adds the cryptography library's own words after a colon.
        assert as_shell(python.stderr, "send").startswith(shell.stderr.rstrip(b"\n")), name
