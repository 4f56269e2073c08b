"""The `agent-bus` command line, run as a user runs it."""
from __future__ import annotations

import json
import re
import subprocess

from busd.cli import build_parser
from harness.bus import REPO, agent_bus_cmd, repo_env


def run_cli(*args, stdin: bytes = b"", env: dict | None = None, timeout: float = 40):
    return subprocess.run(agent_bus_cmd(*args), input=stdin, capture_output=True,
                          env=repo_env(**(env or {})), timeout=timeout)


def _commands(parser, prefix="agent-bus"):
    """Every leaf command with its parser: ("agent-bus token create", parser), ..."""
    for action in parser._actions:  # noqa: SLF001
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield from _commands(sub, f"{prefix} {name}")
            return
    yield prefix, parser


def test_every_command_is_documented_in_the_readme():
    readme = (REPO / "README.md").read_text()
    for command, parser in _commands(build_parser()):
        if command == "agent-bus":
            continue
        assert f"`{command}" in readme, f"{command} is not in README.md"
        for action in parser._actions:  # noqa: SLF001
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    assert re.search(rf"`{re.escape(command)}\b[^\n]*{re.escape(flag)}", readme), \
                        f"{command} {flag} is not in README.md"


def test_send_prints_the_ack_and_recv_prints_monitor_blocks(server, names, tmp_path):
    a, b = names("a", "b")
    env = {"AGENT_BUS_URL": server.url, "AGENT_NAME": a, "AGENT_BUS_STATE_DIR": str(tmp_path)}
    body = "multi\nline ✓ $(x) % \\ \"q\"\n\nno trailing newline"
    sent = run_cli("send", b, stdin=body.encode(), env=env)
    assert sent.returncode == 0, sent.stderr
    ack = json.loads(sent.stdout)
    assert ack["ok"] is True and ack["channel"] == "default"

    got = run_cli("recv", b, "--once", env=env)
    assert got.returncode == 0, got.stderr
    text = got.stdout.decode()
    assert re.fullmatch(r"\[\d\d:\d\d:\d\dZ\] from " + re.escape(a) + ":\n"
                        + re.escape(body) + "\n---\n", text)
    # The cursor was saved: a second run shows nothing old.
    again = run_cli("recv", b, "--once", env=env)
    assert again.returncode == 0 and again.stdout == b""


def test_send_without_url_is_a_usage_error():
    result = run_cli("send", "dell", stdin=b"x", env={"AGENT_BUS_URL": "", "AGENT_NAME": "a"})
    assert result.returncode == 2
    assert b"AGENT_BUS_URL" in result.stderr


def test_send_refused_exits_1_and_unreachable_exits_3(server):
    refused = run_cli("send", "bad name", stdin=b"x",
                      env={"AGENT_BUS_URL": server.url, "AGENT_NAME": "a"})
    assert refused.returncode == 1
    assert b"invalid name" in refused.stderr
    unreachable = run_cli("send", "dell", stdin=b"x",
                          env={"AGENT_BUS_URL": "http://127.0.0.1:9", "AGENT_NAME": "a"})
    assert unreachable.returncode == 3
    assert b"cannot reach the bus" in unreachable.stderr


def test_send_refuses_non_utf8_stdin(server):
    result = run_cli("send", "dell", stdin=b"\xff\xfe",
                     env={"AGENT_BUS_URL": server.url, "AGENT_NAME": "a"})
    assert result.returncode == 2
    assert b"not UTF-8" in result.stderr


def test_key_and_meta_flags(server, names):
    a, b = names("a", "b")
    env = {"AGENT_BUS_URL": server.url, "AGENT_NAME": a}
    first = json.loads(run_cli("send", b, "--key", "k1", "--meta", '{"n": 1}',
                               stdin=b"x", env=env).stdout)
    second = json.loads(run_cli("send", b, "--key", "k1", stdin=b"x", env=env).stdout)
    assert second["id"] == first["id"] and second["duplicate"] is True
    [message] = server.get(f"/recv?to={b}").json()["messages"]
    assert message["meta"] == {"n": 1}
