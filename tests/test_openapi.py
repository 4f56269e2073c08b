"""The OpenAPI document is true: it lists exactly the served routes, and live replies fit it."""
from __future__ import annotations

import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance,
                                               response_schema_conformance,
                                               status_code_conformance)
from hypothesis import HealthCheck, settings
from prometheus_client.parser import text_string_to_metric_families

from busd import __version__
from busd.service import Bus, BusSettings
from busd.api.openapi import document
from busd.identity import Access
from busd.server import RequestGuard, make_app
from busd.ratelimit import RateLimiter
from busd.store_sqlite import SQLiteStore

schema = schemathesis.openapi.from_dict(document(__version__))


def test_the_document_lists_exactly_the_routes_served(tmp_path):
    store = SQLiteStore(str(tmp_path / "bus.db"))
    bus = Bus(store=store, settings=BusSettings(), access=Access(store))
    app = make_app(bus, RequestGuard(True, (), RateLimiter(0, 1)))
    served = {(route.method.lower(), route.resource.canonical) for route in app.router.routes()
              if route.method != "HEAD"}
    documented = {(method, path) for path, ops in document(__version__)["paths"].items()
                  for method in ops}
    assert served == documented


def test_served_document_is_the_module_document(server):
    assert server.get("/openapi.json").json() == document(__version__)


@schema.parametrize()
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_live_replies_fit_the_document_and_none_is_a_5xx(case, server):
    # What the issue asks of a run: no 5xx, only documented statuses and content types,
    # and every reply body fits its schema. (schemathesis's negative-data check does not
    # count 413 as a refusal, and the bus rightly answers oversize bodies with 413.)
    case.call_and_validate(base_url=server.url, timeout=10, checks=[
        not_a_server_error, status_code_conformance, content_type_conformance,
        response_schema_conformance])


def test_metrics_parse_and_count_what_was_sent(server, names):
    a, b, ch = names("a", "b", "ch")
    for i in range(3):
        server.send(a, b, str(i), channel=ch)
    server.get(f"/recv?to={b}&channel={ch}")
    server.get("/recv?to=bad name")
    families = {f.name: f for f in text_string_to_metric_families(server.get("/metrics").text)}

    def value(family, sample_name, **labels):
        for sample in families[family].samples:
            if sample.name == sample_name and all(sample.labels.get(k) == v
                                                  for k, v in labels.items()):
                return sample.value
        return None

    assert value("agent_bus_messages_stored", "agent_bus_messages_stored_total", channel=ch) == 3
    assert value("agent_bus_messages_delivered", "agent_bus_messages_delivered_total",
                 channel=ch) == 3
    assert value("agent_bus_errors", "agent_bus_errors_total", code="40005") >= 1
    assert value("agent_bus_parked_waiters", "agent_bus_parked_waiters") == 0
    for reason in ("commit", "recheck", "shutdown", "timeout"):
        assert value("agent_bus_long_poll_wakeups", "agent_bus_long_poll_wakeups_total",
                     reason=reason) is not None
    assert value("agent_bus_request_duration_seconds", "agent_bus_request_duration_seconds_count",
                 route="/send") >= 3
    assert value("agent_bus_commit_batch_messages", "agent_bus_commit_batch_messages_count") >= 1
