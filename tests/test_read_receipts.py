"""The `read` receipt on a real bus, on SQLite and PostgreSQL, with auth on: only a
recipient marks its own messages read, with its own token, never from another site;
read implies filed; a database an older agent-bus made (schema 5) gains it."""
from __future__ import annotations

import asyncio
import sqlite3

import pytest

from harness.bus import BusServer
from tests.test_security import bearer, make_token


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    if request.param == "sqlite":
        yield str(tmp_path / "bus.db")
    else:
        yield request.getfixturevalue("postgres_db")


def states(bus, token, message_id):
    reply = bus.get(f"/status?id={message_id}", headers=bearer(token))
    assert reply.status_code == 200, reply.text
    return reply.json()["messages"][0]


def mark(bus, token, agent, *ids, **headers):
    return bus.post("/read", json={"agent": agent, "ids": list(ids)},
                    headers={**bearer(token), **headers})


def test_only_the_recipient_marks_its_messages_read(db):
    with BusServer(db, "--hold", "1") as bus:
        # Made by another process while the bus serves the database: auth is on.
        tokens = {name: make_token(db, name) for name in ("spark", "dell", "lab")}
        sent = bus.post("/send", json={"from": "spark", "to": "dell", "msg": "hi"},
                        headers=bearer(tokens["spark"])).json()
        message_id = sent["id"]
        assert states(bus, tokens["spark"], message_id)["state"] == "queued"

        # Another agent's token cannot speak for dell, and as itself the message is not its.
        assert mark(bus, tokens["lab"], "dell", message_id).status_code == 403
        as_lab = mark(bus, tokens["lab"], "lab", message_id)
        assert as_lab.json() == {"ok": True, "read": [], "unknown": [message_id]}
        # The sender cannot mark its own message read for its recipient either.
        assert mark(bus, tokens["spark"], "spark", message_id).json()["read"] == []
        # A page on another site cannot make dell's browser mark it.
        assert mark(bus, tokens["dell"], "dell", message_id,
                    **{"Sec-Fetch-Site": "cross-site"}).status_code == 403
        assert states(bus, tokens["spark"], message_id)["state"] == "queued"

        # dell marks it: read, straight from queued (read implies filed and delivered).
        mine = mark(bus, tokens["dell"], "dell", message_id, 999999)
        assert mine.json() == {"ok": True, "read": [message_id], "unknown": [999999]}
        assert states(bus, tokens["spark"], message_id) | {"ts": None} == {
            "id": message_id, "ts": None, "from": "spark", "to": "dell",
            "channel": "default", "state": "read", "recipients": {"dell": "read"}}

        # A broadcast: read per recipient; the message is read once all its readers read it.
        cast = bus.post("/send", json={"from": "spark", "to": "*", "msg": "all"},
                        headers=bearer(tokens["spark"])).json()["id"]
        for name in ("dell", "lab"):
            bus.get(f"/recv?to={name}&since=0", headers=bearer(tokens[name]))
        mark(bus, tokens["dell"], "dell", cast)
        shown = states(bus, tokens["spark"], cast)
        assert shown["recipients"] == {"dell": "read", "lab": "delivered"}
        assert shown["state"] == "delivered"
        mark(bus, tokens["lab"], "lab", cast)
        assert states(bus, tokens["spark"], cast)["state"] == "read"
        assert bus.stop() == 0


def test_a_schema_5_database_gains_read_receipts(db):
    if db.startswith("postgres"):
        from busd.store_pg import PostgresStore

        async def migrate() -> tuple[int, int]:
            store = PostgresStore(db, listen=False)
            conn = await store._connect()
            try:
                return await store._migrate(conn, upto=5)
            finally:
                await conn.close()
        assert asyncio.run(migrate()) == (0, 5)
    else:
        from busd.store_sqlite import SQLiteStore
        conn = sqlite3.connect(db, isolation_level=None)
        try:
            assert SQLiteStore._migrate(conn, upto=5) == (0, 5)
        finally:
            conn.close()
    with BusServer(db, "--hold", "1") as bus:
        sent = bus.send("spark", "dell", "hello")
        assert bus.post("/read", json={"agent": "dell", "ids": [sent["id"]]}).json()["read"] \
            == [sent["id"]]
        assert bus.get(f"/status?id={sent['id']}").json()["messages"][0]["state"] == "read"
        assert bus.stop() == 0
