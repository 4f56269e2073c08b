"""The el-ipc protocol (PROTOCOLS.md §2), open mode, against a real server."""
from __future__ import annotations

import threading
import time


def elipc_send(server, channel, sender, content, **extra):
    reply = server.post("/send", json={"channel": channel, "sender": sender,
                                       "content": content, **extra})
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_send_reply_shape(server, names):
    ch, a = names("ch", "a")
    body = elipc_send(server, ch, a, "hello")
    assert set(body) == {"ok", "id"}
    assert body["ok"] is True and isinstance(body["id"], int)


def test_missing_fields_are_400(server, names):
    ch, a = names("ch", "a")
    for body in ({"sender": a, "content": "x"}, {"channel": ch, "content": "x"},
                 {"channel": ch, "sender": a}, {"channel": ch, "sender": a, "content": ""}):
        reply = server.post("/send", json=body)
        assert reply.status_code == 400, body
        assert "error" in reply.json()


def test_messages_shape_and_watermark(server, names):
    ch, a, b = names("ch", "a", "b")
    first = elipc_send(server, ch, a, "one")
    second = elipc_send(server, ch, a, "two", signature="c2lnbmF0dXJl")
    got = server.get(f"/messages?channel={ch}&agent={b}").json()
    assert isinstance(got, list)
    assert [m["id"] for m in got] == [first["id"], second["id"]]
    assert set(got[0]) == {"id", "sender", "content", "timestamp"}
    assert got[0]["sender"] == a and got[0]["content"] == "one"
    assert isinstance(got[0]["timestamp"], float)
    # Nothing verified the signature (no operator, no registered key): not shown as signed.
    assert "signed" not in got[1]
    # The watermark moved: nothing twice.
    assert server.get(f"/messages?channel={ch}&agent={b}").json() == []
    third = elipc_send(server, ch, a, "three")
    assert [m["id"] for m in server.get(f"/messages?channel={ch}&agent={b}").json()] == [third["id"]]


def test_watermarks_are_per_agent_and_per_channel(server, names):
    ch, other, a, b, c = names("ch", "other", "a", "b", "c")
    elipc_send(server, ch, a, "m1")
    elipc_send(server, other, a, "m2")
    assert [m["content"] for m in server.get(f"/messages?channel={ch}&agent={b}").json()] == ["m1"]
    assert [m["content"] for m in server.get(f"/messages?channel={ch}&agent={c}").json()] == ["m1"]
    assert [m["content"] for m in server.get(f"/messages?channel={other}&agent={b}").json()] == ["m2"]


def test_wait_true_wakes_on_send(server, names):
    ch, a, b = names("ch", "a", "b")
    server.get(f"/messages?channel={ch}&agent={b}")
    result = {}

    def read():
        started = time.monotonic()
        result["got"] = server.get(f"/messages?channel={ch}&agent={b}&wait=true").json()
        result["elapsed"] = time.monotonic() - started

    reader = threading.Thread(target=read)
    reader.start()
    server.wait_parked()
    elipc_send(server, ch, a, "ping")
    reader.join(10)
    assert [m["content"] for m in result["got"]] == ["ping"]
    assert result["elapsed"] < 1.5


def test_messages_requires_channel_and_agent(server):
    assert server.get("/messages?channel=x").status_code == 400
    assert server.get("/messages?agent=x").status_code == 400


def test_channels_newest_first(server, names):
    older, newer, a = names("older", "newer", "a")
    elipc_send(server, older, a, "1")
    elipc_send(server, older, a, "2")
    elipc_send(server, newer, a, "3")
    listing = server.get("/channels").json()
    assert isinstance(listing, list)
    mine = [c for c in listing if c["channel"] in (older, newer)]
    assert [c["channel"] for c in mine] == [newer, older]
    assert mine[1]["count"] == 2
    assert set(mine[0]) == {"channel", "count", "last_message"}
    stamps = [c["last_message"] for c in listing]
    assert stamps == sorted(stamps, reverse=True)


def test_agents_is_a_list_without_private_material(server):
    listing = server.get("/agents").json()
    assert isinstance(listing, list)
    for agent in listing:
        # el-ipc's fields, plus presence; never a key.
        assert {"name", "identity", "role", "registered_by", "created_at"} <= set(agent)
        assert not {"public_key", "private_key", "key"} & set(agent)


def test_health_shape_and_pending(server, names):
    ch, a, b = names("ch", "a", "b")
    assert server.get("/health").json() == {"status": "ok", "pending": 0, "secure_mode": False}
    elipc_send(server, ch, a, "1")
    elipc_send(server, ch, a, "2")
    assert server.get(f"/health?channel={ch}&agent={b}").json()["pending"] == 2
    server.get(f"/messages?channel={ch}&agent={b}")
    assert server.get(f"/health?channel={ch}&agent={b}").json()["pending"] == 0


def test_agent_card(server):
    card = server.get("/.well-known/agent-card.json").json()
    for field in ("name", "description", "url", "version", "capabilities",
                  "authentication", "skills"):
        assert field in card
    assert isinstance(card["authentication"]["schemes"], list)
    assert card["skills"] and all("id" in skill for skill in card["skills"])
    assert "did" not in card  # no operator in open mode


def test_elipc_channel_messages_reach_rapid_receivers(server, names):
    ch, a, b = names("ch", "a", "b")
    sent = elipc_send(server, ch, a, "to everyone")
    got = server.get(f"/recv?to={b}&channel={ch}").json()["messages"]
    assert [(m["id"], m["from"], m["msg"], m["to"]) for m in got] == [(sent["id"], a, "to everyone", "*")]


def test_rapid_messages_addressed_to_an_agent_show_in_its_elipc_read_only(server, names):
    ch, a, b, c = names("ch", "a", "b", "c")
    server.send(a, b, "just for b", channel=ch)
    assert [m["content"] for m in server.get(f"/messages?channel={ch}&agent={b}").json()] == ["just for b"]
    assert server.get(f"/messages?channel={ch}&agent={c}").json() == []


def test_mixed_protocol_fields_are_refused(server, names):
    ch, a, b = names("ch", "a", "b")
    reply = server.post("/send", json={"channel": ch, "sender": a, "content": "x", "to": b})
    assert reply.status_code == 400 and reply.json()["code"] == 40008
