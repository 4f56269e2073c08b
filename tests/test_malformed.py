"""Every malformed request gets a 4xx that names the problem; the bus stays healthy.

The property test drives the space of bad requests that are still valid HTTP
(bodies, fields, names, query values, paths, methods) and requires a JSON error
from the table for each. Requests that are not valid HTTP/1.1 at all are refused
by the HTTP parser before they reach the app; the raw-socket tests below check
that those also get a 4xx naming the fault and never hang or crash the server.
"""
from __future__ import annotations

import json
import socket
import time
from urllib.parse import quote

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.bus import BusServer

VALID = st.sampled_from(["spark", "dell", "a.b_c-1", "x" * 64])
BAD_NAMES = st.one_of(
    st.sampled_from(["", ".", "..", "...", "a/b", "../etc", "a\x00b", "a\nb", "a b", "x" * 65,
                     "é", "*", "a*", "\ud800"]),
    st.text(min_size=1, max_size=80).filter(
        lambda s: not (1 <= len(s) <= 64 and all(c.isascii() and (c.isalnum() or c in "._-")
                                                 for c in s) and s.strip(".") != "")),
)
NOT_A_STRING = st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(),
                         st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3),
                                                                              st.integers(), max_size=2))
BAD_META = st.one_of(st.integers(), st.text(), st.lists(st.integers(), min_size=1),
                     st.dictionaries(st.text(max_size=5),
                                     st.one_of(st.lists(st.integers()), st.dictionaries(
                                         st.text(max_size=3), st.integers(), min_size=1)),
                                     min_size=1, max_size=3))
BAD_KEYS = st.one_of(st.just(""), st.just("x" * 201), st.just("has space"), st.just("tab\t"),
                     st.just("é"), st.integers())


@st.composite
def bad_rapid_sends(draw):
    body = {"from": draw(VALID), "to": draw(VALID), "msg": draw(st.text(max_size=50))}
    fault = draw(st.sampled_from(["from", "to", "msg", "channel", "key", "meta", "missing"]))
    if fault in ("from", "to"):
        body[fault] = draw(st.one_of(BAD_NAMES, NOT_A_STRING, st.none()))
    elif fault == "msg":
        body["msg"] = draw(st.one_of(NOT_A_STRING, st.none(), st.just("\udc80")))
    elif fault == "channel":
        body["channel"] = draw(st.one_of(BAD_NAMES, NOT_A_STRING))
    elif fault == "key":
        body["key"] = draw(BAD_KEYS)
    elif fault == "meta":
        body["meta"] = draw(BAD_META)
    else:
        del body[draw(st.sampled_from(["from", "to", "msg"]))]
    if fault == "to" and body["to"] == "*":
        body["from"] = "*"  # "*" is a fine recipient; make the request wrong another way
    return json.dumps(body).encode()


@st.composite
def bad_elipc_sends(draw):
    body = {"channel": draw(VALID), "sender": draw(VALID), "content": draw(st.text(min_size=1))}
    fault = draw(st.sampled_from(["channel", "sender", "content", "signature", "missing"]))
    if fault in ("channel", "sender"):
        body[fault] = draw(st.one_of(BAD_NAMES, NOT_A_STRING))
    elif fault == "content":
        body["content"] = draw(st.one_of(NOT_A_STRING, st.just("")))
    elif fault == "signature":
        body["signature"] = draw(st.one_of(NOT_A_STRING.filter(lambda v: v not in (None, "")),
                                           st.just("é" * 10), st.just("A" * 201)))
    else:
        del body[draw(st.sampled_from(["channel", "sender", "content"]))]
    return json.dumps(body).encode()


RAW_BODIES = st.one_of(
    st.binary(max_size=200).filter(lambda b: not _is_json_object(b)),
    st.sampled_from([b"", b"   ", b"null", b"[]", b"[1,2]", b'"text"', b"42", b"true",
                     b'{"from": "a", "to": "b", "msg": NaN}',
                     b'{"from": "a", "to": "b", "msg": "x", "meta": {"n": Infinity}}',
                     b'{"from": "a", "to": "b", "msg": "\xff\xfe"}', b"{" * 5000,
                     b'{"from": "a", "to": "b", "msg": "x", "sender": "a"}', b"{}"]),
)


def _is_json_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except ValueError:
        return False


QUERY_FAULTS = st.one_of(
    st.fixed_dictionaries({"to": st.one_of(BAD_NAMES, st.just(""))}),
    st.fixed_dictionaries({"to": VALID, "since": st.sampled_from(
        ["nan", "NaN", "inf", "-inf", "Infinity", "abc", "1e999", "0x10", "1,5"])}),
    st.fixed_dictionaries({"to": VALID, "max": st.sampled_from(
        ["-1", "0", "abc", "1.5", "1e3", str(-10**12)])}),  # above the limit is served
    st.fixed_dictionaries({"to": VALID, "block": st.sampled_from(["maybe", "2", "on?"])}),
    st.fixed_dictionaries({"to": VALID, "channel": BAD_NAMES.filter(lambda s: s not in ("", "*"))}),
    st.just({}),
)

ELIPC_QUERY_FAULTS = st.one_of(
    st.fixed_dictionaries({"channel": VALID, "agent": BAD_NAMES.filter(bool)}),
    st.fixed_dictionaries({"channel": BAD_NAMES.filter(bool), "agent": VALID}),
    st.fixed_dictionaries({"channel": VALID}),
)

REQUESTS = st.one_of(
    st.tuples(st.just("POST"), st.just("/send"), st.just({}),
              st.one_of(bad_rapid_sends(), bad_elipc_sends(), RAW_BODIES)),
    st.tuples(st.just("GET"), st.just("/recv"), QUERY_FAULTS, st.just(b"")),
    st.tuples(st.just("GET"), st.sampled_from(["/messages", "/health"]), ELIPC_QUERY_FAULTS,
              st.just(b"")),
    st.tuples(st.just("GET"), st.just("/messages"),
              st.just({"channel": "c", "agent": "a", "wait": "perhaps"}), st.just(b"")),
    st.tuples(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
              st.sampled_from(["/nope", "/send/x", "/recv/", "/../etc/passwd", "/%00"]),
              st.just({}), st.just(b"")),
    st.tuples(st.sampled_from(["PUT", "DELETE", "PATCH"]),
              st.sampled_from(["/send", "/recv", "/messages", "/healthz"]), st.just({}), st.just(b"")),
    st.tuples(st.just("GET"), st.just("/recv"), st.just({"to": "a", "since": "1"}),
              st.just(b"")).map(lambda t: ("GET", "/recv?to=a&to=b", {}, b"")),
)


def _query(params: dict) -> str:
    """Percent-encode by hand: a lone surrogate becomes invalid UTF-8 on the wire."""
    if not params:
        return ""
    return "?" + "&".join(f"{quote(k)}={quote(str(v).encode('utf-8', 'surrogatepass'))}"
                          for k, v in params.items())


@pytest.fixture(scope="module")
def session():
    with requests.Session() as s:
        yield s


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=REQUESTS)
def test_every_malformed_request_gets_a_4xx_json_error(server, session, request):
    method, path, params, body = request
    reply = session.request(method, server.url + path + _query(params), data=body, timeout=10)
    assert 400 <= reply.status_code < 500, (request, reply.status_code, reply.text[:200])
    payload = reply.json()
    assert isinstance(payload["error"], str) and payload["error"]
    assert payload["code"] // 100 == reply.status_code


def test_the_server_is_intact_after_the_malformed_barrage(server, session):
    # Runs after the property test in this module, on the same server.
    before = server.send("keeper", "keeper-inbox", "kept")
    test_every_malformed_request_gets_a_4xx_json_error(server, session)
    assert server.get("/healthz").json()["ok"] is True
    got = server.get("/recv?to=keeper-inbox").json()["messages"]
    assert [m["id"] for m in got] == [before["id"]]


def _raw_exchange(url: str, data: bytes, timeout: float = 5) -> tuple[bytes, float]:
    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        try:
            while b"\r\n\r\n" not in received or not _complete(received):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except socket.timeout:
            pass
    return received, time.monotonic() - started


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return True


@pytest.mark.parametrize("request_bytes, names", [
    (b"POST /send HTTP/1.1\r\nHost: localhost\r\nContent-Length: abc\r\n\r\n{}", b"Content-Length"),
    (b"POST /send HTTP/1.1\r\nHost: localhost\r\nContent-Length: -5\r\n\r\n", b"Content-Length"),
    (b"POST /send HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", b"8190"),
    (b"BREW /send HTTP/1.1\r\nHost: localhost\r\n\r\n", b"method"),
    (b"garbage\r\n\r\n", b"method"),
    (b"POST /send HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n", b"empty"),
    (b"POST /send HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
     b"5\r\n{\"a\":\r\n0\r\n\r\n", b"not valid JSON"),
])
def test_requests_that_are_not_valid_http_get_a_4xx_naming_the_fault(server, request_bytes, names):
    response, _ = _raw_exchange(server.url, request_bytes)
    status = int(response.split(b" ", 2)[1])
    assert 400 <= status < 500, response[:200]
    assert names.lower() in response.lower(), response[:300]


def test_a_content_length_larger_than_the_body_gets_408_not_a_hang(tmp_path):
    with BusServer(tmp_path / "bus.db", "--body-timeout", "1") as bus:
        response, elapsed = _raw_exchange(
            bus.url, b"POST /send HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{}", timeout=10)
        assert response.startswith(b"HTTP/1.1 408"), response[:200]
        assert b"Content-Length larger than the body" in response
        assert elapsed < 5
        assert bus.get("/healthz").status_code == 200
        assert bus.stop() == 0


def test_an_oversize_body_is_refused_before_it_is_read(server):
    huge = b'{"from": "a", "to": "b", "msg": "' + b"x" * (1024 * 1024) + b'"}'
    reply = requests.post(server.url + "/send", data=huge, timeout=10)
    assert reply.status_code == 413 and reply.json()["code"] == 41301
