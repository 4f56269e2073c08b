"""The operator console's routes over HTTP: who gets the page and its feed, and what the
feed says. (tests/test_console_browser.py drives the page in a real Chromium.)"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from harness.bus import BusServer
from tests.test_security import bearer, cli, make_token

HANDOFF_META = {"kind": "handoff", "files": 1, "sha256": "ab" * 32, "path": "/shared/x",
                "host": "spark", "bytes": 1, "lines": 1, "mtime": 1.0}


def feed(bus, **params):
    response = bus.get("/ui/feed", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_page_and_its_assets_are_served_with_a_strict_policy(server):
    page = server.get("/ui")
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert '<script src="/ui/console.js"' in page.text and "<script>" not in page.text
    policy = page.headers["Content-Security-Policy"]
    for directive in ("default-src 'self'", "script-src 'self'", "frame-ancestors 'none'",
                      "object-src 'none'"):
        assert directive in policy
    assert "unsafe-inline" not in policy and "http" not in policy
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Referrer-Policy"] == "same-origin"
    script, style = server.get("/ui/console.js"), server.get("/ui/console.css")
    assert script.headers["Content-Type"].startswith("text/javascript")
    assert style.headers["Content-Type"].startswith("text/css")
    # The script never parses bus data as HTML: everything goes in as text.
    assert "innerHTML" not in script.text and "insertAdjacentHTML" not in script.text
    assert "textContent" in script.text
    # Errors under /ui carry the policy too.
    assert "Content-Security-Policy" in server.get("/ui/nothing-here").headers


def test_the_feed_has_every_recipients_messages_with_states_and_checks(server, names):
    spark, dell, ch = names("spark", "dell", "ch")
    first = server.send(spark, dell, "one\ntwo", channel=ch)
    handoff = server.send(dell, spark, "x: lines=1", channel=ch, meta=HANDOFF_META)
    got = feed(server, channel=ch)
    assert [(m["id"], m["from"], m["to"], m["first_line"], m["more"]) for m in got["messages"]] \
        == [(first["id"], spark, dell, "one", True), (handoff["id"], dell, spark, "x: lines=1",
                                                      False)]
    assert got["messages"][0]["state"] == "queued" and "handoff" not in got["messages"][0]
    assert got["messages"][1]["handoff"] == {}
    assert {c["channel"]: (c["count"], c["pending"]) for c in got["channels"]}[ch] == (2, 2)
    assert {spark, dell} <= {a["name"] for a in got["agents"]}

    # What changed for followed messages comes back in `states`.
    server.get(f"/recv?to={dell}&channel={ch}")
    server.post("/handoff-checks", json={"id": handoff["id"], "agent": spark,
                                         "result": "mismatch"})
    later = feed(server, channel=ch, after=handoff["id"],
                 watch=f"{first['id']},{handoff['id']},{2 ** 40}")
    assert later["messages"] == []
    assert later["states"][str(first["id"])]["state"] == "delivered"
    assert later["states"][str(handoff["id"])]["handoff"] == {spark: "mismatch"}
    assert later["gone"] == [2 ** 40]

    # Filters: one agent's messages (from or to it), the newest `max`.
    third = server.send(spark, names("nobody")[0], "three", channel=ch)
    assert [m["id"] for m in feed(server, agent=dell)["messages"]] == [first["id"], handoff["id"]]
    assert [m["id"] for m in feed(server, channel=ch, max=1)["messages"]] == [third["id"]]
    assert server.get("/ui/feed", params={"watch": "1,x"}).status_code == 400
    assert server.get("/ui/feed", params={"max": "501"}).status_code == 400


def test_a_parked_feed_answers_on_a_commit_and_on_a_receipt(server, names):
    spark, dell, ch = names("spark", "dell", "ch")
    start = feed(server, channel=ch)
    with ThreadPoolExecutor(1) as pool:
        parked = pool.submit(feed, server, channel=ch, after=0, version=start["version"],
                             block="true")
        server.wait_parked()
        sent = time.monotonic()
        ack = server.send(spark, dell, "wake up", channel=ch)
        got = parked.result(timeout=10)
        assert time.monotonic() - sent < 1.5
        assert [m["id"] for m in got["messages"]] == [ack["id"]]

        # Parked again with nothing new: a receipt moving wakes it too. (A poll moves
        # receipts as it starts and as it answers: the page follows the version, as here.)
        parked = pool.submit(feed, server, channel=ch, after=ack["id"], version=got["version"],
                             block="true", watch=str(ack["id"]))
        server.wait_parked()
        server.get(f"/recv?to={dell}&channel={ch}")
        moved = parked.result(timeout=10)
        deadline = time.monotonic() + 5
        while moved["states"][str(ack["id"])]["state"] != "delivered":
            assert time.monotonic() < deadline, moved
            moved = feed(server, channel=ch, after=ack["id"], version=moved["version"],
                         block="true", watch=str(ack["id"]))


@pytest.fixture
def authed(tmp_path):
    bus = BusServer(tmp_path / "bus.db", "--hold", "1").start()
    tokens = {"admin": make_token(bus.db, "boss", "--admin"), "spark": make_token(bus.db, "spark")}
    yield bus, tokens
    assert bus.stop() == 0


def test_without_the_admin_token_the_page_and_its_data_answer_401(authed):
    bus, tokens = authed
    for path in ("/ui", "/ui/feed"):
        assert bus.get(path).status_code == 401
        assert bus.get(path, headers=bearer("abt_not-a-token")).status_code == 401
        assert bus.get(path, headers=bearer(tokens["spark"])).status_code == 403
        assert bus.get(path, headers=bearer(tokens["admin"])).status_code == 200
    page = bus.get("/ui")
    assert page.headers["Content-Type"].startswith("text/html")
    assert '<form method="post" action="/ui/login">' in page.text
    assert "Content-Security-Policy" in page.headers
    assert bus.get("/ui/feed").json()["code"] == 40101
    # The assets are the same for everyone: the login form needs its style sheet.
    assert bus.get("/ui/console.css").status_code == 200


def test_a_browser_logs_in_with_a_form_and_keeps_the_token_in_a_strict_cookie(authed):
    bus, tokens = authed
    browser = requests.Session()
    wrong = browser.post(bus.url + "/ui/login", data={"token": "abt_wrong"},
                         allow_redirects=False, timeout=10)
    assert wrong.status_code == 401 and "not valid" in wrong.text
    agent = browser.post(bus.url + "/ui/login", data={"token": tokens["spark"]},
                         allow_redirects=False, timeout=10)
    assert agent.status_code == 403 and "admin token" in agent.text
    assert not browser.cookies

    good = browser.post(bus.url + "/ui/login", data={"token": tokens["admin"]},
                        allow_redirects=False, timeout=10)
    assert good.status_code == 303 and good.headers["Location"] == "/ui"
    cookie = good.headers["Set-Cookie"]
    for attribute in ("HttpOnly", "SameSite=Strict", "Path=/ui"):
        assert attribute in cookie
    assert "Max-Age" not in cookie and "expires" not in cookie.lower()  # gone with the browser
    assert browser.get(bus.url + "/ui", timeout=10).status_code == 200
    assert browser.get(bus.url + "/ui/feed", timeout=10).json()["auth"] is True
    # The cookie counts only for the console: other routes still want the header.
    assert requests.get(bus.url + "/inbox", timeout=10,
                        cookies={"agent_bus_console": tokens["admin"]}).status_code == 401

    # A page elsewhere cannot log a browser in (or out): its Origin is refused.
    foreign = requests.post(bus.url + "/ui/login", data={"token": tokens["admin"]},
                            headers={"Origin": "http://evil.example"}, allow_redirects=False,
                            timeout=10)
    assert foreign.status_code == 403 and "Set-Cookie" not in foreign.headers

    # Revoking the token ends the session at once; the page asks again and drops the cookie.
    assert cli("token", "revoke", "boss", "--db", bus.db).returncode == 0
    again = browser.get(bus.url + "/ui", timeout=10)
    assert again.status_code == 401 and "not valid" in again.text
    assert not browser.cookies
    assert browser.get(bus.url + "/ui/feed", timeout=10).status_code == 401


def test_logging_out_forgets_the_cookie(authed):
    bus, tokens = authed
    browser = requests.Session()
    browser.post(bus.url + "/ui/login", data={"token": tokens["admin"]}, timeout=10)
    assert browser.get(bus.url + "/ui/feed", timeout=10).status_code == 200
    out = browser.post(bus.url + "/ui/logout", allow_redirects=False, timeout=10)
    assert out.status_code == 303 and not browser.cookies
    assert browser.get(bus.url + "/ui/feed", timeout=10).status_code == 401
