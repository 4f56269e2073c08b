"""The Python client: speaks to a bus over HTTP only (requests), from any machine.

requests (and signing's cryptography) are imported when a client is made, not with
this module, and this module imports nothing at its top: what only reads the spool
(`agent-bus inbox`, the hooks) starts fast. `nothing_waits` is the one question asked
without requests, with the standard library alone: the Claude Code hooks ask it on
every prompt and tool call, where importing requests would take longer than the whole
answer may."""
from __future__ import annotations

# Only for the annotations: importing `typing` costs the hooks' fast path milliseconds.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

DEFAULT_UA = "Mozilla/5.0"   # the older clients' default; WAFs in front of buses expect it
RECV_TIMEOUT = 35.0          # the server holds a long-poll ~25-30 s
PEEK_BYTES = 16384           # the most of an answer nothing_waits reads ("none": ~40 bytes)


class BusClientError(Exception):
    """The bus could not do what was asked. `transient` says whether a retry can help."""

    def __init__(self, message: str, status: int | None = None, code: int | None = None,
                 transient: bool = False, retry_after: float | None = None,
                 payload: dict | None = None):
        super().__init__(message)
        self.payload = payload
        self.status = status
        self.code = code
        self.transient = transient
        self.retry_after = retry_after


class BusClient:
    def __init__(self, url: str, *, token: str | None = None, user_agent: str = DEFAULT_UA,
                 ca: str | None = None, timeout: float = 15.0,
                 signing_key: Ed25519PrivateKey | None = None):
        import requests

        if not url:
            raise ValueError("no bus URL: set AGENT_BUS_URL (for example http://127.0.0.1:9876)")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.signing_key = signing_key
        self.session = requests.Session()
        # Configuration arrives as values (DESIGN.md). Left on, requests re-reads proxy,
        # CA and netrc settings from the environment on every request (about a tenth of
        # a busy agent daemon's CPU), and a proxy variable can hijack a loopback bus.
        self.session.trust_env = False
        self.session.headers.update(request_headers(token, user_agent))
        # Passed with each request: requests lets REQUESTS_CA_BUNDLE override session.verify.
        self.verify: str | bool = ca or True

    def close(self) -> None:
        self.session.close()

    def request(self, method: str, path: str, *, params: dict | None = None,
                body: Any = None, timeout: float | None = None) -> Any:
        import requests

        try:
            response = self.session.request(method, self.url + path, params=params, json=body,
                                            timeout=timeout or self.timeout, verify=self.verify)
        except requests.exceptions.SSLError as exc:
            raise BusClientError(f"cannot reach the bus at {self.url}: its TLS certificate is "
                                 "not trusted here; point AGENT_BUS_CA at the CA certificate "
                                 f"that signed it ({_short(exc, 80)})", transient=True) from None
        except requests.RequestException as exc:
            raise BusClientError(f"cannot reach the bus at {self.url}: {_short(exc)}",
                                 transient=True) from None
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if response.status_code >= 400:
            text = payload.get("error") if isinstance(payload, dict) else response.text[:200]
            code = payload.get("code") if isinstance(payload, dict) else None
            retry_after = _float_or_none(response.headers.get("Retry-After"))
            transient = response.status_code >= 500 or response.status_code == 429
            raise BusClientError(f"the bus answered {response.status_code}: {text}",
                                 status=response.status_code, code=code,
                                 transient=transient, retry_after=retry_after,
                                 payload=payload if isinstance(payload, dict) else None)
        if payload is None:
            raise BusClientError(f"the bus answered {response.status_code} with a body that is "
                                 "not JSON; is AGENT_BUS_URL pointing at an agent-bus?",
                                 status=response.status_code, transient=True)
        return payload

    # -- the rapid protocol, with our extra fields --------------------------

    def send(self, sender: str, to: str, msg: str, *, channel: str = "default",
             key: str | None = None, meta: dict | None = None) -> dict:
        body: dict[str, Any] = {"from": sender, "to": to, "msg": msg, "channel": channel}
        if self.signing_key is not None:
            from . import signing
            try:
                signed = signing.sign_send(self.signing_key, channel, sender, to, msg, meta, key)
            except signing.SigningError as exc:
                raise BusClientError(f"cannot sign this message: {exc}") from None
            key = signed.pop("key")
            body.update(signed)
        if key is not None:
            body["key"] = key
        if meta is not None:
            body["meta"] = meta
        try:
            return self.request("POST", "/send", body=body)
        except BusClientError as exc:
            from .errors import REPLAY, replayed_ack

            if exc.code == REPLAY.code and exc.payload:
                # Our own earlier send with this key was stored: that is success.
                return replayed_ack(channel, exc.payload)
            raise

    def recv(self, to: str, *, since: float = 0.0, block: bool = False,
             channel: str = "default", max_batch: int | None = None,
             filed: bool = False) -> dict:
        """`filed`: since is a cursor saved only after the inbox files up to it are
        durable -- the receipt that turns messages `filed` for their senders."""
        return self.request("GET", "/recv", params=recv_params(to, since, block, channel,
                                                               max_batch, filed),
                            timeout=RECV_TIMEOUT if block else None)

    def messages(self, channel: str, agent: str, wait: bool = False) -> list[dict]:
        """el-ipc's read: `agent`'s unread messages on `channel`; its watermark moves past
        them. `wait`: the bus holds the request until one comes or its hold ends."""
        params = {"channel": channel, "agent": agent}
        if wait:
            params["wait"] = "true"
        return self.request("GET", "/messages", params=params,
                            timeout=RECV_TIMEOUT if wait else None)

    def healthz(self) -> dict:
        return self.request("GET", "/healthz")

    def status(self, ids: list[int]) -> list[dict]:
        return self.request("GET", "/status", params=[("id", i) for i in ids])["messages"]

    def undelivered(self, older: float) -> list[dict]:
        return self.request("GET", "/undelivered", params={"older": older})["messages"]

    def report_handoff_check(self, message_id: int, agent: str, result: str) -> dict:
        """Tell the bus what `agent`'s daemon found when it checked handoff `message_id`."""
        return self.request("POST", "/handoff-checks",
                            body={"id": message_id, "agent": agent, "result": result})

    def mark_read(self, agent: str, ids: list[int]) -> dict:
        """Tell the bus `agent` was shown these messages: {ok, read, unknown}."""
        return self.request("POST", "/read", body={"agent": agent, "ids": ids})

    def inbox(self) -> dict:
        return self.request("GET", "/inbox")

    def agents(self) -> list:
        return self.request("GET", "/agents")

    def channels(self) -> list:
        return self.request("GET", "/channels")

    def agent_card(self) -> dict:
        return self.request("GET", "/.well-known/agent-card.json")


def request_headers(token: str | None, user_agent: str) -> dict[str, str]:
    """The headers every request to the bus carries: who asks (the token), and as what."""
    headers = {"User-Agent": user_agent}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def recv_params(to: str, since: float, block: bool, channel: str, max_batch: int | None,
                filed: bool) -> dict[str, Any]:
    """The query of GET /recv (BusClient.recv says what each means)."""
    params: dict[str, Any] = {"to": to, "since": repr(float(since)),
                              "block": "true" if block else "false", "channel": channel}
    if max_batch is not None:
        params["max"] = max_batch
    if filed:
        params["filed"] = "true"
    return params


def nothing_waits(url: str, to: str, *, since: float, channel: str, token: str | None = None,
                  user_agent: str = DEFAULT_UA, timeout: float = 1.0) -> bool:
    """Does the bus plainly say that no message for `to` on `channel` is past `since`?

    One GET /recv that does not wait (max=1, as BusClient.recv asks it, with the same
    headers), over a plain socket: the Claude Code hooks ask it on every prompt and
    tool call when no daemon files for the agent, and http.client alone takes most of
    their time. True only for a whole `200` whose JSON holds an empty `messages` list;
    False for anything else -- a message, a refusal, an unreachable or slow bus, an
    answer too long or not read here, an https URL (TLS is left to BusClient) -- and
    the caller then asks through BusClient, which says what went wrong. It claims no
    receipt (no `filed`) and moves no cursor: it only asks."""
    import json
    import socket
    import time
    from urllib.parse import urlencode, urlsplit

    try:
        base = url.rstrip("/")
        parts = urlsplit(base)
        if (parts.scheme != "http" or not parts.hostname or parts.username is not None
                or parts.password is not None or parts.query or parts.fragment):
            return False
        address = (parts.hostname, parts.port or 80)
        target = f"{parts.path}/recv?" + urlencode(
            recv_params(to, since, False, channel, 1, False))
        lines = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc}", "Accept: application/json",
                 "Accept-Encoding: identity", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in
                  request_headers(token, user_agent).items()]
        if not all(line.isascii() and line.isprintable() for line in lines):
            return False   # a header this cannot send as it is: left to BusClient
        deadline = time.monotonic() + timeout
        with socket.create_connection(address, timeout=timeout) as sock:
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
            answer = b""
            while len(answer) <= PEEK_BYTES:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False   # a bus that drips its answer is no plain answer
                sock.settimeout(remaining)
                chunk = sock.recv(PEEK_BYTES + 1 - len(answer))
                if not chunk:
                    break
                answer += chunk
                if _whole_answer(answer) is not None:
                    break
        body = _whole_answer(answer)
        if body is None:
            return False
        reply = json.loads(body)
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested too deep
        return False
    return isinstance(reply, dict) and reply.get("messages") == []


def _whole_answer(answer: bytes) -> bytes | None:
    """The body of `answer` if it is a whole HTTP 200 with a Content-Length, sent as it
    is (no chunks, no compression); None otherwise (cut short, or anything else)."""
    head, found, body = answer.partition(b"\r\n\r\n")
    if not found:
        return None
    status, *fields = head.split(b"\r\n")
    version, _, rest = status.partition(b" ")
    if not version.startswith(b"HTTP/1.") or rest[:4] not in (b"200", b"200 "):
        return None
    length = None
    for field in fields:
        name, colon, value = field.partition(b":")
        name, value = name.strip().lower(), value.strip()
        if not colon or name == b"transfer-encoding" or (
                name == b"content-encoding" and value.lower() != b"identity"):
            return None
        if name == b"content-length":
            if length is not None or not value.isdigit():
                return None
            length = int(value)
    if length is None or len(body) != length:
        return None
    return body


def _short(exc: Exception, limit: int = 160) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + "..."


def _float_or_none(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None

