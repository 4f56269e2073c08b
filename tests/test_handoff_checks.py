"""Handoff checks on the server: only a recipient reports, and everyone who may see it does."""
from __future__ import annotations

import logging
import threading

from busd.agent.checks import CheckReporter
from busd.client import BusClient
from busd.receive import Backoff
from harness.bus import BusServer
from tests.test_security import bearer, make_token

HANDOFF_META = {"kind": "handoff", "files": 1, "sha256": "ab" * 32, "path": "/shared/hits.csv",
                "host": "spark", "bytes": 8, "lines": 2, "mtime": 1.0}


def report(bus, message_id, agent, result="verified", **kw):
    return bus.post("/handoff-checks", json={"id": message_id, "agent": agent, "result": result},
                    **kw)


def test_a_recipient_reports_its_check_and_status_shows_it(server, names):
    spark, dell = names("spark", "dell")
    ack = server.send(spark, dell, "hits.csv: lines=2", meta=HANDOFF_META)
    assert report(server, ack["id"], dell, "mismatch").json() == {"ok": True}
    assert report(server, ack["id"], dell, "verified").status_code == 200  # the last one counts
    [state] = server.get(f"/status?id={ack['id']}").json()["messages"]
    assert state["handoff"] == {dell: "verified"}
    # A message that is not a handoff has no such field.
    plain = server.send(spark, dell, "hello")
    assert "handoff" not in server.get(f"/status?id={plain['id']}").json()["messages"][0]


def test_only_a_recipient_may_report_and_only_on_a_handoff(server, names):
    spark, dell, other = names("spark", "dell", "other")
    ack = server.send(spark, dell, "hits.csv: lines=2", meta=HANDOFF_META)
    # Not a recipient: the same answer as for no such message (nothing told about it).
    refused = report(server, ack["id"], other)
    assert refused.status_code == 404 and refused.json()["code"] == 40402
    assert report(server, ack["id"], spark).status_code == 404     # the sender is not one either
    plain = server.send(spark, dell, "hello")
    assert report(server, plain["id"], dell).json()["code"] == 40016
    assert report(server, 2 ** 62, dell).json()["code"] == 40402
    assert report(server, 2 ** 70, dell).json()["code"] == 40402
    assert report(server, ack["id"], dell, "fine").json()["code"] == 40004
    # A broadcast handoff: everyone on the channel but its sender may report.
    everyone = server.send(spark, "*", "hits.csv: lines=2", meta=HANDOFF_META)
    assert report(server, everyone["id"], other, "not checked").status_code == 200
    assert report(server, everyone["id"], spark).status_code == 404
    [state] = server.get(f"/status?id={everyone['id']}").json()["messages"]
    assert state["handoff"] == {other: "not checked"}
    # `unreachable` would tell a sender what exists on the recipient's machine: refused.
    assert report(server, everyone["id"], other, "unreachable").json()["code"] == 40004


def test_a_token_reports_only_as_its_own_agent(tmp_path):
    with BusServer(tmp_path / "bus.db", "--hold", "1") as bus:
        tokens = {name: make_token(bus.db, name) for name in ("spark", "dell", "eve")}
        ack = bus.post("/send", headers=bearer(tokens["spark"]),
                       json={"from": "spark", "to": "dell", "msg": "hits.csv",
                             "meta": HANDOFF_META}).json()
        assert report(bus, ack["id"], "dell").status_code == 401
        as_dell = report(bus, ack["id"], "dell", headers=bearer(tokens["eve"]))
        assert as_dell.status_code == 403 and "cannot read dell's" in as_dell.json()["error"]
        assert report(bus, ack["id"], "eve", headers=bearer(tokens["eve"])).status_code == 404
        assert report(bus, ack["id"], "dell", headers=bearer(tokens["dell"])).status_code == 200
        # The sender follows it with its own token.
        [state] = bus.get(f"/status?id={ack['id']}", headers=bearer(tokens["spark"])
                          ).json()["messages"]
        assert state["handoff"] == {"dell": "verified"}
        assert bus.stop() == 0


def test_a_report_the_bus_cannot_take_is_dropped_with_a_log_line(caplog):
    """The daemon's reporter never blocks: with no bus at all, it tries a few times, says
    so and drops the report; closing it returns at once."""
    stop = threading.Event()
    # A port nothing listens on: every attempt is refused at once (a real connection).
    reporter = CheckReporter(lambda: BusClient("http://127.0.0.1:9", timeout=2), "dell", stop,
                             backoff=Backoff(0.01, 0.02))
    reporter.start()
    with caplog.at_level(logging.WARNING, logger="busd.agent.checks"):
        reporter.report([(7, "verified")])
        reporter.close(timeout=10)
    assert any("could not report the check of handoff 7 (verified)" in r.getMessage()
               and "dropped after 6 tries" in r.getMessage() for r in caplog.records)
