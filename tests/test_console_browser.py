"""The operator console in a real headless Chromium, against a real bus with auth on and
two real agent daemons: log in, watch agents and messages arrive, receipts turn filed then
read, a handoff verify; a hostile body stays text; the page keeps a bounded number of rows."""
from __future__ import annotations

import json
import os
import subprocess
import uuid

import pytest
import requests

from harness.agents import AgentProcess
from harness.browser import Browser, find_chromium, session_processes, wait_in_page
from harness.bus import BusServer, agent_bus_cmd, repo_env
from tests.test_security import make_token

XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def chromium():
    program = find_chromium()
    if program is None:
        message = "Chromium is not installed (./install.sh --dev installs Debian's chromium)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI is set: the console's browser tests must run",
                        pytrace=False)
        pytest.skip(message)
    return program


@pytest.fixture
def fleet(tmp_path):
    """A bus with auth on (and room for a burst of sends), an admin token, and two
    agents' daemons online: spark and dell."""
    bus = BusServer(tmp_path / "bus.db", "--hold", "5", "--rate", "2000", "--burst", "2000")
    bus.start()
    tokens = {name: make_token(bus.db, name) for name in ("spark", "dell", "ops")}
    tokens["admin"] = make_token(bus.db, "boss", "--admin")
    spool = tmp_path / "spool"
    # tmp_path is their shared folder: the handoff below lies there, so dell checks it.
    daemons = [AgentProcess(name, spool, bus.url, AGENT_BUS_TOKEN=tokens[name],
                            AGENT_BUS_SHARED=str(tmp_path))
               for name in ("spark", "dell")]
    try:
        for daemon in daemons:
            daemon.start()
        yield bus, tokens, spool
        for daemon in daemons:
            assert daemon.stop() == 0
        assert bus.stop() == 0
    finally:
        for daemon in daemons:
            daemon.kill()
        bus.kill()


def script(*args: str, token: str, url: str, stdin: bytes = b"") -> dict:
    """An operator's script: `agent-bus ARGS` as ops, its JSON acknowledgement."""
    done = subprocess.run(agent_bus_cmd(*args), input=stdin, capture_output=True, timeout=60,
                          env=repo_env(AGENT_BUS_URL=url, AGENT_NAME="ops",
                                       AGENT_BUS_TOKEN=token))
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


def row_of(message_id: int) -> str:
    """JavaScript: the feed's row for a message."""
    return f"document.querySelector('#feed tr[data-id=\"{int(message_id)}\"]')"


def test_the_console_follows_a_live_bus_in_a_real_browser(chromium, fleet, tmp_path):
    bus, tokens, spool = fleet
    browser = Browser(width=1280, height=800).start()
    browser_pid = browser.proc.pid
    try:
        # Auth is on: the page is the login form until an admin token is given.
        browser.navigate(bus.url + "/ui")
        assert browser.evaluate("document.querySelector('form').action").endswith("/ui/login")
        browser.evaluate(f"document.getElementById('token').value = {json.dumps(tokens['admin'])};"
                         "document.querySelector('form').submit(); true")
        browser.wait_for_event("Page.loadEventFired")
        # Nothing in the URL, and the page's scripts cannot read the token.
        assert browser.evaluate("location.href") == bus.url + "/ui", browser.evaluate("document.body.innerText")
        assert browser.evaluate("document.cookie") == ""

        # The roster: both daemons online.
        online = ("[...document.querySelectorAll('#agents li')]"
                  ".filter((li) => li.querySelector('.dot.online')).map((li) => li.dataset.name)")
        assert browser.evaluate(wait_in_page(
            f"{online}.includes('spark') && {online}.includes('dell')", 10000)), \
            browser.evaluate("document.getElementById('agents').innerText")
        assert browser.evaluate("document.getElementById('connection').textContent") == "live"

        # A message from a script: in the feed within 2 s of its commit, then filed.
        text = f"T1 verify done {uuid.uuid4().hex[:8]}"
        appeared = browser.evaluate_later(
            "new Promise((resolve) => {"
            f"  const seen = () => [...document.querySelectorAll('#feed td.body')]"
            f"      .some((td) => td.textContent === {json.dumps(text)});"
            "  const observer = new MutationObserver(() => {"
            "    if (seen()) { observer.disconnect(); resolve(Date.now()); } });"
            "  observer.observe(document.getElementById('feed'), {childList: true, subtree: true});"
            "  setTimeout(() => { observer.disconnect(); resolve(null); }, 10000); })")
        ack = script("send", "dell", stdin=text.encode(), token=tokens["ops"], url=bus.url)
        shown_at = browser.value_of(appeared)
        assert shown_at is not None, "the message never showed in the feed"
        assert shown_at / 1000 - ack["ts"] < 2.0
        row = row_of(ack["id"])
        assert browser.evaluate(f"{row}.querySelector('td.name').textContent") == "ops"
        assert browser.evaluate(wait_in_page(
            f"{row}.querySelector('td.receipt .badge').textContent === 'filed'", 10000)), \
            browser.evaluate(f"{row}.innerText")
        # dell's person reads it: the fourth badge.
        read = subprocess.run(agent_bus_cmd("inbox", "dell", "--read", str(ack["id"])),
                              capture_output=True, timeout=60,
                              env=repo_env(AGENT_BUS_URL=bus.url, AGENT_BUS_SPOOL=str(spool),
                                           AGENT_BUS_TOKEN=tokens["dell"]))
        assert read.returncode == 0 and read.stderr == b"", read.stderr
        assert browser.evaluate(wait_in_page(
            f"{row}.querySelector('td.receipt .badge').textContent === 'read'", 10000)), \
            browser.evaluate(f"{row}.innerText")

        # A handoff: dell's daemon checks it on arrival, and the console shows the result.
        shared = tmp_path / "hits.csv"
        shared.write_text("a,1\nb,2\n")
        handed = script("handoff", "--to", "dell", str(shared), token=tokens["ops"],
                        url=bus.url)
        handoff_row = row_of(handed["id"])
        assert browser.evaluate(wait_in_page(
            f"{handoff_row}.querySelector('td.handoff .badge').textContent === 'verified'",
            10000)), browser.evaluate(f"{handoff_row} && {handoff_row}.innerText")

        # A body that is HTML stays text: no element made of it, no dialog, the literal text.
        hostile = _send(bus, tokens["ops"], "dell", XSS)
        hostile_row = row_of(hostile["id"])
        assert browser.evaluate(wait_in_page(hostile_row, 5000))
        assert browser.evaluate(f"{hostile_row}.querySelector('td.body').textContent") == XSS
        assert browser.evaluate("document.querySelectorAll('#feed img').length") == 0
        assert XSS in browser.evaluate("document.getElementById('feed').innerText")
        assert browser.dialogs() == []

        # The filter: one channel's messages only.
        on_ops = _send(bus, tokens["ops"], "spark", "on the ops channel", channel="ops")
        assert browser.evaluate(wait_in_page(
            f"{row_of(on_ops['id'])} && [...document.getElementById('filter-channel').options]"
            ".some((o) => o.value === 'ops')", 5000))
        browser.evaluate("const s = document.getElementById('filter-channel');"
                         "s.value = 'ops'; s.dispatchEvent(new Event('change')); true")
        channels = "[...document.querySelectorAll('#feed tr td:nth-child(5)')].map((td) => td.textContent)"
        assert browser.evaluate(wait_in_page(
            f"{row_of(on_ops['id'])} && {channels}.every((c) => c === 'ops')", 5000))
        browser.evaluate("document.getElementById('filter-clear').click(); true")
        assert browser.evaluate(wait_in_page(f"{row_of(ack['id'])} !== null", 5000))

        # It stays light: after 600 more messages the page holds the newest 500.
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {tokens['ops']}"
        last = None
        for number in range(600):
            last = session.post(bus.url + "/send", timeout=10, json={
                "from": "ops", "to": "nobody", "msg": f"burst {number}"}).json()
        session.close()
        assert browser.evaluate(wait_in_page(
            f"{row_of(last['id'])} !== null && "
            "document.querySelectorAll('#feed tr').length === 500", 10000)), \
            browser.evaluate("document.querySelectorAll('#feed tr').length")
        assert browser.dialogs() == []
    finally:
        browser.close()
    # Chromium's whole process tree is gone, not only the process we started.
    assert session_processes(browser_pid) == []


def _send(bus, token: str, to: str, text: str, channel: str = "default") -> dict:
    response = requests.post(bus.url + "/send", timeout=10,
                             headers={"Authorization": f"Bearer {token}"},
                             json={"from": "ops", "to": to, "msg": text, "channel": channel})
    assert response.status_code == 200, response.text
    return response.json()
