"""Who is calling, and what they may do: bearer tokens and signed messages.

The routes ask this module and never decide themselves. `authenticate` turns a
request's Authorization header into a Principal; the `check_*` methods raise a
BusError (401: no or bad credential, 403: not allowed) when the principal may
not act; `verify_send` applies the signature rules of secure mode.

Auth is on once the token store holds any unrevoked token; until then the bus is
open, like both older servers (and it may only listen on loopback then).
Secure mode (el-ipc's word) is on once an operator key exists: every send must
then be signed by its sender's registered key.
"""
from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Mapping

from . import errors, signing
from .errors import BusError
from .model import NewMessage
from .store import Store

TOKEN_PREFIX = "abt_"
LEGACY_SIGNATURES = ("auto", "on", "off")
NATIVE_SIGNING_FLAG = "native_signing_seen"


@dataclass(frozen=True)
class Principal:
    name: str | None                      # the agent a token is bound to
    admin: bool
    channels: tuple[str, ...] | None      # None: every channel
    authenticated: bool


OPEN = Principal(name=None, admin=True, channels=None, authenticated=False)
ANONYMOUS = Principal(name=None, admin=False, channels=None, authenticated=False)


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Access:
    def __init__(self, store: Store, legacy_signatures: str = "auto"):
        if legacy_signatures not in LEGACY_SIGNATURES:
            raise ValueError(f"legacy_signatures must be one of {LEGACY_SIGNATURES}")
        self.store = store
        self.legacy_signatures = legacy_signatures

    # -- tokens ------------------------------------------------------------

    async def authenticate(self, headers: Mapping[str, str]) -> Principal:
        header = headers.get("Authorization")
        auth_on = await self.store.auth_enabled()
        if header is None:
            return ANONYMOUS if auth_on else OPEN
        if not auth_on:
            return OPEN  # an open bus ignores credentials, as the older servers did
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise BusError(errors.BAD_CREDENTIAL, "use the header 'Authorization: Bearer <token>'")
        record = await self.store.token_by_hash(hash_token(token.strip()))
        if record is None:
            raise BusError(errors.BAD_CREDENTIAL,
                           "unknown or revoked token; ask the operator for a new one "
                           "(agent-bus token create)")
        return Principal(name=record.agent, admin=record.admin, channels=record.channels,
                         authenticated=True)

    @staticmethod
    def require_token(principal: Principal) -> None:
        if principal is not OPEN and not principal.authenticated:
            raise BusError(errors.UNAUTHENTICATED,
                           "this bus needs 'Authorization: Bearer <token>' (AGENT_BUS_TOKEN)")

    @staticmethod
    def _check_channel(principal: Principal, channel: str) -> None:
        if principal.channels is None:
            return
        if channel == "*" or channel not in principal.channels:
            raise BusError(errors.FORBIDDEN, f"the token for {principal.name} is limited to "
                                             f"channels {', '.join(principal.channels)}")

    def check_send_as(self, principal: Principal, sender: str, channel: str) -> None:
        if principal is OPEN:
            return
        self.require_token(principal)
        if sender != principal.name:
            raise BusError(errors.FORBIDDEN, f"this token belongs to {principal.name}; "
                                             f"it cannot send as {sender}")
        self._check_channel(principal, channel)

    def check_read_as(self, principal: Principal, agent: str, channel: str) -> None:
        if principal is OPEN:
            return
        self.require_token(principal)
        if agent != principal.name:
            raise BusError(errors.FORBIDDEN, f"this token belongs to {principal.name}; "
                                             f"it cannot read {agent}'s messages")
        self._check_channel(principal, channel)

    def check_admin(self, principal: Principal) -> None:
        if principal is OPEN:
            return
        self.require_token(principal)
        if not principal.admin:
            raise BusError(errors.FORBIDDEN, "this needs an admin token "
                                             "(agent-bus token create NAME --admin)")

    # -- signatures --------------------------------------------------------

    async def secure_mode(self) -> bool:
        return await self.store.first_operator_key() is not None

    async def verify_send(self, message: NewMessage, signed_at: object, legacy: bool) -> NewMessage:
        """Apply the signature rules; returns the message to store (signature kept if verified).

        `legacy` says the request used el-ipc's format (channel/sender/content
        with a signature and no signed_at).
        """
        signature = message.signature
        secure = await self.secure_mode()
        if not signature:
            if secure:
                raise BusError(errors.SIGNATURE_REQUIRED,
                               "sign with the sender's registered key (AGENT_BUS_KEY)")
            return message
        registered = await self.store.public_key(message.sender)
        if registered is None:
            if secure:
                raise BusError(errors.UNKNOWN_SENDER,
                               f"{message.sender} has no registered key (agent-bus register)")
            return message  # open mode keeps an unverifiable signature, as el-ipc did
        public_key, _role = registered
        if legacy and signed_at is None:
            await self._check_legacy_allowed()
            payload = signing.elipc_payload(message.channel, message.sender, message.body)
        else:
            signed_at_ms = self._fresh(signed_at)
            if message.key is None:
                raise BusError(errors.MISSING_FIELD, "key (a signed send needs an idempotency "
                                                     "key: it is what makes a replay detectable)")
            payload = signing.native_payload(message.channel, message.sender, message.to,
                                             signed_at_ms, message.key, message.body)
        if not signing.verify(public_key, payload, signature):
            raise BusError(errors.BAD_SIGNATURE, f"not made by {message.sender}'s registered key "
                                                 "over this message")
        if not legacy or signed_at is not None:
            if await self.store.get_flag(NATIVE_SIGNING_FLAG) is None:
                await self.store.set_flag(NATIVE_SIGNING_FLAG, repr(time.time()))
        return message

    async def _check_legacy_allowed(self) -> None:
        if self.legacy_signatures == "on":
            return
        if self.legacy_signatures == "auto" and await self.store.get_flag(NATIVE_SIGNING_FLAG) is None:
            return
        raise BusError(errors.LEGACY_SIGNATURE_REFUSED)

    @staticmethod
    def _fresh(signed_at: object) -> int:
        if not isinstance(signed_at, int) or isinstance(signed_at, bool):
            raise BusError(errors.WRONG_TYPE, "signed_at must be whole milliseconds since 1970")
        skew = abs(time.time() * 1000 - signed_at)
        if skew > signing.MAX_SKEW_MS:
            raise BusError(errors.STALE_SIGNATURE, f"signed_at is {skew / 1000:.0f} s off")
        return signed_at

    async def verify_registration(self, body: dict) -> tuple[str, str, str, str]:
        """Check an operator-signed registration; returns (name, identity, public key, operator)."""
        for field_name, value in body.items():
            if field_name == "operator_key" or signing.looks_like_private_key(value):
                raise BusError(errors.PRIVATE_KEY_IN_REQUEST,
                               f"field {field_name!r}: sign the registration on the operator's "
                               "machine (agent-bus register) and send only the signature")
        missing = [f for f in ("name", "public_key", "operator", "signature", "signed_at")
                   if body.get(f) in (None, "")]
        if missing:
            raise BusError(errors.MISSING_FIELD, ", ".join(missing))
        name, public_key, operator = body["name"], body["public_key"], body["operator"]
        identity = body.get("identity") or ""
        for field_name, value in (("public_key", public_key), ("operator", operator),
                                  ("identity", identity), ("signature", body["signature"])):
            if not isinstance(value, str):
                raise BusError(errors.WRONG_TYPE, f"{field_name} must be a string")
        try:
            signing.load_public(public_key)
        except signing.SigningError as exc:
            raise BusError(errors.WRONG_TYPE, str(exc)) from None
        registered = await self.store.public_key(operator)
        if registered is None or registered[1] != "operator":
            raise BusError(errors.FORBIDDEN, f"{operator} is not an operator of this bus")
        payload = signing.register_payload(name, identity, public_key,
                                           self._fresh(body["signed_at"]))
        if not signing.verify(registered[0], payload, body["signature"]):
            raise BusError(errors.BAD_SIGNATURE, f"the registration is not signed by {operator}")
        return name, identity, public_key.strip() + "\n", operator
