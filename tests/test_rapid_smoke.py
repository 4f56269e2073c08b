"""The rapid project's own smoke test (its test_bus.py), step by step, against agent-bus.

It runs against a fresh reference server, so it uses fixed names (alice, bob, backend,
twin) and expects an empty bus: this module is its only user of the `server` fixture,
which gives it a fresh server on SQLite and one on PostgreSQL. The requests are what the
smoke test sends: JSON bodies, names and the float cursor pasted raw into the query.
"""
from __future__ import annotations

import requests


def test_the_rapid_smoke_test_passes_step_by_step(server):
    def send(body: dict) -> requests.Response:
        return server.post("/send", json=body, headers={"User-Agent": "test_bus.py"})

    def recv(query: str) -> dict:
        reply = server.get(f"/recv?{query}", headers={"User-Agent": "test_bus.py"})
        assert reply.status_code == 200, reply.text
        return reply.json()

    # 1. alice sends bob a message.
    first = send({"from": "alice", "to": "bob", "msg": "hello bob"}).json()
    assert first["ok"] is True and first["ts"] > 0

    # 2. bob receives it.
    got = recv("to=bob&since=0")
    assert [(m["from"], m["msg"]) for m in got["messages"]] == [("alice", "hello bob")]

    # 3. From the reply's `now` on, there is nothing more.
    assert recv(f"to=bob&since={got['now']}")["messages"] == []

    # 4. Five more arrive as one batch past that cursor.
    for i in range(5):
        assert send({"from": "alice", "to": "bob", "msg": f"msg {i}"}).status_code == 200
    batch = recv(f"to=bob&since={got['now']}")
    assert [m["msg"] for m in batch["messages"]] == [f"msg {i}" for i in range(5)]

    # 5. /inbox lists bob under default, with his queue: all six, read or not.
    inbox = server.get("/inbox").json()
    assert inbox["recipients"]["default"] == {"bob": 6}

    # 6. A malformed body (no to, no msg) is refused with 400.
    assert send({"from": "alice"}).status_code == 400

    # 7. Channel isolation: nothing of default shows on channel servers.
    assert recv("to=bob&since=0&channel=servers")["messages"] == []

    # 8. A channel-scoped round trip; a channel-less recv is default, which has none of it.
    assert send({"channel": "servers", "from": "frontend", "to": "backend",
                 "msg": "ping"}).status_code == 200
    assert [m["msg"] for m in recv("to=backend&since=0&channel=servers")["messages"]] == ["ping"]
    assert recv("to=backend&since=0")["messages"] == []

    # 9. /inbox counts both channels apart.
    recipients = server.get("/inbox").json()["recipients"]
    assert recipients == {"default": {"bob": 6}, "servers": {"backend": 1}}

    # 10. One name on two channels: two separate queues.
    send({"from": "x", "to": "twin", "msg": "default-side"})
    send({"channel": "servers", "from": "x", "to": "twin", "msg": "servers-side"})
    assert [m["msg"] for m in recv("to=twin&since=0")["messages"]] == ["default-side"]
    assert [m["msg"] for m in recv("to=twin&since=0&channel=servers")["messages"]] == \
        ["servers-side"]
