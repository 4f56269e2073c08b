"""The message and the rules every message obeys, whichever protocol carried it."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from . import errors
from .errors import BusError

# Only for the annotations: importing `typing` costs `agent-bus drop` and `inbox` milliseconds.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEFAULT_CHANNEL = "default"
BROADCAST = "*"          # as `to`: everyone on the channel
ALL_CHANNELS = "*"       # as a recv channel: every channel

DEFAULT_MAX_MSG_BYTES = 64 * 1024
DEFAULT_MAX_META_BYTES = 16 * 1024
MAX_KEY_CHARS = 200

_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_KEY_RE = re.compile(r"[\x21-\x7e]{1,%d}" % MAX_KEY_CHARS)


def is_valid_name(value: object) -> bool:
    # Names become file and folder names in the spool, so "." and ".." are refused.
    return (isinstance(value, str) and _NAME_RE.fullmatch(value) is not None
            and value.strip(".") != "")


def check_name(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise BusError(errors.WRONG_TYPE, f"{what} must be a string")
    if value == "":
        raise BusError(errors.MISSING_FIELD, what)
    if not is_valid_name(value):
        raise BusError(errors.BAD_NAME, f"{what}={_shown(value)}")
    return value


def check_recipient(value: object, what: str = "to") -> str:
    if value == BROADCAST:
        return value
    return check_name(value, what)


def check_channel(value: object, what: str = "channel", allow_all: bool = False) -> str:
    if value is None:
        return DEFAULT_CHANNEL
    if not isinstance(value, str):
        raise BusError(errors.WRONG_TYPE, f"{what} must be a string")
    if allow_all and value == ALL_CHANNELS:
        return value
    if value == "" or not is_valid_name(value):
        raise BusError(errors.BAD_CHANNEL, f"{what}={_shown(value)}")
    return value


def check_meta(value: object, max_bytes: int) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BusError(errors.BAD_META, "got " + type(value).__name__)
    for k, v in value.items():
        if isinstance(v, (dict, list)):
            raise BusError(errors.BAD_META, f"meta[{_shown(k)}] is nested")
        if isinstance(v, float) and not math.isfinite(v):
            raise BusError(errors.BAD_META, f"meta[{_shown(k)}] is not a finite number")
    try:
        size = len(encode_meta(value).encode("utf-8"))
    except UnicodeEncodeError:
        raise BusError(errors.BAD_ENCODING, "meta holds an unpaired surrogate") from None
    if size > max_bytes:
        raise BusError(errors.META_TOO_LARGE, f"over {max_bytes} bytes")
    return value


def check_key(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _KEY_RE.fullmatch(value):
        raise BusError(errors.BAD_KEY)
    return value


def check_body(value: object, what: str, max_bytes: int, allow_empty: bool) -> str:
    if not isinstance(value, str):
        raise BusError(errors.WRONG_TYPE, f"{what} must be a string")
    if not allow_empty and value == "":
        raise BusError(errors.MISSING_FIELD, what)
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        # A lone surrogate from a JSON "\udc80" escape can never be stored or shown.
        raise BusError(errors.BAD_ENCODING, f"{what} holds an unpaired surrogate") from None
    if size > max_bytes:
        raise BusError(errors.MSG_TOO_LARGE, f"{what} is {size} bytes, the limit is {max_bytes}")
    return value


def encode_meta(meta: dict | None) -> str | None:
    if meta is None:
        return None
    return json.dumps(meta, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _shown(value: str, limit: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "...\""


@dataclass(frozen=True)
class NewMessage:
    """A validated message before the server gives it an id and ts."""
    channel: str
    sender: str
    to: str
    body: str
    meta: dict | None = None
    key: str | None = None
    signature: str | None = None


@dataclass(frozen=True)
class StoredMessage:
    id: int
    ts: float
    channel: str
    sender: str
    to: str
    body: str
    meta: dict | None = None
    signature: str | None = None

    def as_rapid(self) -> dict[str, Any]:
        """The shape rapid receivers expect: ts/from/msg, plus our extra fields."""
        out: dict[str, Any] = {"ts": self.ts, "from": self.sender, "msg": self.body,
                               "id": self.id, "to": self.to, "channel": self.channel}
        if self.meta is not None:
            out["meta"] = self.meta
        if self.signature:
            out["signed"] = True
        return out

    def as_elipc(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "sender": self.sender,
                               "content": self.body, "timestamp": self.ts}
        if self.signature:
            out["signed"] = True
        return out


@dataclass(frozen=True)
class SendResult:
    message: StoredMessage
    duplicate: bool = False   # an earlier send with the same (from, key) is returned


@dataclass
class Limits:
    max_msg_bytes: int = DEFAULT_MAX_MSG_BYTES
    max_meta_bytes: int = DEFAULT_MAX_META_BYTES

    @property
    def max_request_bytes(self) -> int:
        # JSON escaping can make a body up to 6x its text (\u00XX); allow for it
        # so a legal message is never refused by the transport limit first.
        return 6 * self.max_msg_bytes + 2 * self.max_meta_bytes + 4096


def check_message(message: NewMessage, limits: Limits) -> NewMessage:
    """A message made outside a request (a command writing straight into the database)
    meets the rules a /send enforces: names, channel, sizes, key."""
    check_channel(message.channel)
    check_name(message.sender, "from")
    check_recipient(message.to)
    check_body(message.body, "body", limits.max_msg_bytes, allow_empty=True)
    check_meta(message.meta, limits.max_meta_bytes)
    check_key(message.key)
    return message
