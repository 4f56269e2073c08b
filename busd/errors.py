"""Every error the bus answers with, in one table.

A reply body is always `{"error": "<what went wrong and what to do>", "code": <int>}`.
The code's first three digits are the HTTP status, so a client can branch on either.
Nothing here imports any other module of ours.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ErrorKind:
    code: int
    http_status: int
    text: str


class BusError(Exception):
    """An error with a place in the table; `detail` says which field or value."""

    def __init__(self, kind: ErrorKind, detail: str | None = None, *,
                 close_connection: bool = False, fields: dict | None = None,
                 headers: dict | None = None):
        self.kind = kind
        self.detail = detail
        self.close_connection = close_connection
        self.fields = fields or {}      # extra JSON fields, e.g. the first id of a replay
        self.headers = headers or {}    # e.g. Retry-After
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return f"{self.kind.text}: {self.detail}" if self.detail else self.kind.text

    @property
    def http_status(self) -> int:
        return self.kind.http_status

    def as_json(self) -> dict:
        return {"error": self.message, "code": self.kind.code, **self.fields}


# 400: the request itself is wrong; the client must change it.
BAD_JSON = ErrorKind(40001, 400, "the request body is not valid JSON")
NOT_AN_OBJECT = ErrorKind(40002, 400, "the request body must be a JSON object")
MISSING_FIELD = ErrorKind(40003, 400, "a required field is missing or empty")
WRONG_TYPE = ErrorKind(40004, 400, "a field has the wrong type")
BAD_NAME = ErrorKind(
    40005, 400,
    "invalid name: use 1-64 characters of A-Z a-z 0-9 . _ - (not only dots)")
BAD_CHANNEL = ErrorKind(
    40006, 400,
    "invalid channel: use 1-64 characters of A-Z a-z 0-9 . _ - (not only dots)")
BAD_PARAM = ErrorKind(40007, 400, "invalid query parameter")
AMBIGUOUS_SEND = ErrorKind(
    40008, 400,
    "mixed protocols in one send: use from/to/msg (rapid) or channel/sender/content (el-ipc)")
BAD_META = ErrorKind(
    40009, 400, "meta must be a flat JSON object of string, number, boolean or null values")
BAD_KEY = ErrorKind(40010, 400, "key must be 1-200 printable characters")
BAD_ENCODING = ErrorKind(40011, 400, "the request body is not valid UTF-8")
EMPTY_BODY = ErrorKind(40012, 400, "the request body is empty; send a JSON object")
PRIVATE_KEY_IN_REQUEST = ErrorKind(
    40013, 400,
    "the request carries private key material; sign locally and send only the signature")
BAD_SIGNATURE_FORMAT = ErrorKind(40014, 400, "the signature is malformed")
SECRET_REFUSED = ErrorKind(40015, 400, "refused by the secret guard")
NOT_A_HANDOFF = ErrorKind(
    40016, 400, "that message is not a handoff (its meta has no kind=handoff); only handoffs "
    "are checked")

# 401/403: who you are, and what you may do.
UNAUTHENTICATED = ErrorKind(40101, 401, "authentication required")
BAD_CREDENTIAL = ErrorKind(40102, 401, "the credential is not valid")
FORBIDDEN = ErrorKind(40301, 403, "not allowed")
SIGNATURE_REQUIRED = ErrorKind(40302, 403, "signature required (secure mode is on)")
BAD_SIGNATURE = ErrorKind(40303, 403, "the signature does not verify")
UNKNOWN_SENDER = ErrorKind(40304, 403, "unknown sender")
STALE_SIGNATURE = ErrorKind(
    40305, 403, "the signature's signed_at is more than 5 minutes off; check the clock and sign again")
LEGACY_SIGNATURE_REFUSED = ErrorKind(
    40306, 403,
    "el-ipc-format signatures (no timestamp, so replayable) are refused here once native signing "
    "is in use; sign natively (AGENT_BUS_KEY), or the operator can allow them with "
    "--legacy-signatures on")
FOREIGN_HOST = ErrorKind(
    40307, 403,
    "the Host header names a site this bus does not serve (DNS rebinding?); "
    "use its own address, or the operator can add the name with --allow-host")
FOREIGN_ORIGIN = ErrorKind(
    40308, 403, "cross-site requests from web pages are refused (Origin header)")
REGISTRATION_REFUSED = ErrorKind(
    40309, 403,
    "the registration is not signed by an operator of this bus over these fields; sign it on "
    "the operator's machine: agent-bus register NAME --pubkey FILE --as OPERATOR --key "
    "OPERATOR.key")
CROSS_SITE = ErrorKind(
    40310, 403,
    "the browser marks this request as coming from another site (Sec-Fetch-Site); a bus obeys "
    "no web page but its own console")

# 404/405/408/413/429
NOT_FOUND = ErrorKind(40401, 404, "no such route; GET /openapi.json lists every route this bus serves")
NO_SUCH_MESSAGE = ErrorKind(40402, 404, "no such message")
METHOD_NOT_ALLOWED = ErrorKind(40501, 405, "method not allowed on this route")
BODY_TIMEOUT = ErrorKind(
    40801, 408, "the request body did not arrive in time (is Content-Length larger than the body?)")
CONFLICT = ErrorKind(40901, 409, "already exists")
REPLAY = ErrorKind(
    40902, 409, "this signed message was already accepted (same sender and key); nothing new was stored")
REGISTRATION_NOT_NEWER = ErrorKind(
    40903, 409,
    "the agent's current registration was signed at the same time or later: this one is a "
    "replay or older, and changes nothing; sign a new one (agent-bus register)")
BODY_TOO_LARGE = ErrorKind(41301, 413, "the request body is too large")
MSG_TOO_LARGE = ErrorKind(41302, 413, "the message is too large")
META_TOO_LARGE = ErrorKind(41303, 413, "meta is too large")
RATE_LIMITED = ErrorKind(42901, 429, "too many requests; retry after the given delay")

# 5xx: our side; the client may retry.
STORAGE_UNAVAILABLE = ErrorKind(
    50301, 503,
    "storage is unavailable (disk full or read-only? database down?); nothing was stored, "
    "retry later")
SHUTTING_DOWN = ErrorKind(50302, 503, "the server is shutting down; retry shortly")
INTERNAL = ErrorKind(50001, 500, "internal error; the server log has details")



def replayed_ack(channel: str, fields: dict) -> dict:
    """A signer's own send refused as a REPLAY (its fields: the first one's id and ts):
    that send was stored, so the signer acknowledges it as a duplicate, as rapid's /send
    answers one."""
    return {"ok": True, "ts": fields.get("ts"), "channel": channel, "id": fields.get("id"),
            "duplicate": True}


ALL_KINDS = tuple(v for v in dict(globals()).values() if isinstance(v, ErrorKind))
