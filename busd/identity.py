"""Who is calling, and what they may do: bearer tokens and signed messages.

The routes ask this module and never decide themselves. `authenticate` turns a
request's Authorization header into a Principal; the `check_*` methods raise a
BusError (401: no or bad credential, 403: not allowed) when the principal may
not act; `verify_send` applies the signature rules of secure mode.

Auth is on once the token store holds any unrevoked token; until then the bus is
open, like both older servers (and it may only listen on loopback then).
Secure mode (el-ipc's word) is on once an operator key exists: every send must
then be signed by its sender's registered key. A message keeps its signature (and is
shown `signed`) only when it was verified here against that key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Mapping

from . import errors, signing
from .errors import BusError
from .model import NewMessage, check_name
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
    def check_channel(principal: Principal, channel: str) -> None:
        """A request names a channel: refused if the token is limited to others."""
        if principal.channels is None:
            return
        if channel == "*" or channel not in principal.channels:
            raise BusError(errors.FORBIDDEN, f"the token for {principal.name} is limited to "
                                             f"channels {', '.join(principal.channels)}")

    def check_send_as(self, principal: Principal, sender: str, channel: str) -> None:
        self._check_acting_as(principal, sender, channel, f"send as {sender}")

    def check_read_as(self, principal: Principal, agent: str, channel: str | None) -> None:
        """`agent`'s own token, on `channel` (None: the route checks the channel of
        whatever it finds, with Access.sees_channel)."""
        self._check_acting_as(principal, agent, channel, f"read {agent}'s messages")

    def _check_acting_as(self, principal: Principal, agent: str, channel: str | None,
                         action: str) -> None:
        if principal is OPEN:
            return
        self.require_token(principal)
        if agent != principal.name:
            raise BusError(errors.FORBIDDEN, f"this token belongs to {principal.name}; "
                                             f"it cannot {action}")
        if channel is not None:
            self.check_channel(principal, channel)

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
        """Apply the signature rules; returns the message to store, which keeps its signature
        only if it was verified (`signed` means exactly that to every reader).

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
            # Nothing to verify it against: stored unsigned, never shown as signed.
            return dataclasses.replace(message, signature=None)
        public_key, _role = registered
        if legacy and signed_at is None:
            await self._check_legacy_allowed()
            if message.channel in signing.RETIRED_TAGS:
                # Such a "message" may be a captured v1 native or registration signature.
                raise BusError(errors.BAD_SIGNATURE, f"no el-ipc signature is accepted on "
                                                     f"channel {message.channel}")
            payload = signing.elipc_payload(message.channel, message.sender, message.body)
            covered = "el-ipc's format: channel, sender, content"
        else:
            signed_at_ms = self._fresh(signed_at)
            if message.key is None:
                raise BusError(errors.MISSING_FIELD, "key (a signed send needs an idempotency "
                                                     "key: it is what makes a replay detectable)")
            # meta passed check_meta: flat, finite, so it always has a canonical form.
            payload = signing.native_payload(message.channel, message.sender, message.to,
                                             signed_at_ms, message.key, message.body,
                                             message.meta)
            covered = (f"{signing.NATIVE_TAG}: channel, from, to, signed_at, key, msg and meta; "
                       "a client that signs the older v1 form must be upgraded")
        if not signing.verify(public_key, payload, signature):
            raise BusError(errors.BAD_SIGNATURE, f"not made by {message.sender}'s registered key "
                                                 f"over this message ({covered})")
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

    async def register(self, body: dict) -> tuple[str, str]:
        """Register (or rotate) an agent's key on an operator's signature, made on the
        operator's machine; returns (name, operator).

        "Not an operator" and "a signature that does not verify" get one answer, so
        nobody learns from it which names are operators. A registration signed at or
        before the agent's current one (a captured request replayed, or an older one)
        changes nothing.
        """
        for field_name, value in body.items():
            if field_name == "operator_key" or signing.looks_like_private_key(value):
                raise BusError(errors.PRIVATE_KEY_IN_REQUEST,
                               f"field {field_name!r}: sign the registration on the operator's "
                               "machine (agent-bus register) and send only the signature")
        missing = [f for f in ("name", "public_key", "operator", "signature", "signed_at")
                   if body.get(f) in (None, "")]
        if missing:
            raise BusError(errors.MISSING_FIELD, ", ".join(missing))
        name = check_name(body["name"], "name")
        public_key, operator = body["public_key"], body["operator"]
        identity = body.get("identity") or ""
        for field_name, value in (("public_key", public_key), ("operator", operator),
                                  ("identity", identity), ("signature", body["signature"])):
            if not isinstance(value, str):
                raise BusError(errors.WRONG_TYPE, f"{field_name} must be a string")
        try:
            signing.load_public(public_key)
        except signing.SigningError as exc:
            raise BusError(errors.WRONG_TYPE, str(exc)) from None
        signed_at = self._fresh(body["signed_at"])
        approver = await self.store.public_key(operator)
        payload = signing.register_payload(name, identity, public_key, signed_at)
        if (approver is None or approver[1] != "operator"
                or not signing.verify(approver[0], payload, body["signature"])):
            raise BusError(errors.REGISTRATION_REFUSED)
        current = await self.store.public_key(name)
        if current is not None and current[1] == "operator":
            raise BusError(errors.CONFLICT, f"{name} is an operator of this bus; an operator's "
                                            "key changes only on the server's database")
        if not await self.store.register_agent_signed(name, identity, public_key.strip() + "\n",
                                                      operator, signed_at):
            raise BusError(errors.REGISTRATION_NOT_NEWER, f"for {name}")
        return name, operator

    # -- what a token may see ------------------------------------------------

    @staticmethod
    def sees_channel(principal: Principal, channel: str) -> bool:
        """Whether anything of `channel` (messages, names, counts) may reach this principal:
        a token limited to some channels sees only those, admin or not."""
        return principal.channels is None or channel in principal.channels
