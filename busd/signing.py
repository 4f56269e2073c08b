"""Ed25519 keys and the exact bytes each kind of signature covers.

Keys are PEM files interchangeable with the older el-ipc tool's: private keys
PKCS8, public keys SubjectPublicKeyInfo. Private keys never leave this module's
caller's machine: only signatures travel.

Three signed payloads, each a list of lines:
  el-ipc (legacy)  channel \\n sender \\n content   -- no time, no nonce: replayable
  native send      NATIVE_TAG, channel, from, to, signed_at, key, the body's sha256 and
                   the sha256 of meta's canonical form (or "-" when there is no meta)
  registration     REGISTER_TAG, an operator's approval of one agent's public key: name,
                   the sha256 of identity and of the key, signed_at

Domain separation: an el-ipc payload starts with a channel name (1-64 of
[A-Za-z0-9._-]); both tags hold a ":", which no channel can, so no payload of one kind
is ever a payload of another, and a signature made for one never verifies as another.
The v1 tags were valid channel names; el-ipc signatures on those channels are refused.

Canonical meta (the same bytes from Python and from jq 1.6, bin/lib/agent-bus.sh
BUS_SIGN_JQ): one line per key, in the order of the keys' UTF-8 bytes:
  base64(key) SP value LF
where value is "s" + base64(UTF-8 string), "n" + the number, "t", "f" or "z" (null).
A number is the decimal value of its JSON text: an integer exactly, any other number as
the shortest decimal that reads back as the same double (what Python's repr and jq 1.6
print alike), in one layout: DIGITSeEXPONENT with no leading or trailing zeros in DIGITS
("15e-1" for 1.5, "1e3" for 1000 and 1000.0), and "0" for zero. So 1 and 1.0 sign
alike (the same JSON number), and two different numbers never do.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import math
import os
import time
import uuid

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .fileio import write_atomically

NATIVE_TAG = "agent-bus:send:v2"
REGISTER_TAG = "agent-bus:register:v2"
# The v1 tags: valid channel names, so an el-ipc signature on such a channel could be a
# captured v1 native or registration signature. Never verified again.
RETIRED_TAGS = ("agent-bus-send-v1", "agent-bus-register-v1")
NO_META = "-"
MAX_SKEW_MS = 5 * 60 * 1000     # a signature older or newer than this is refused


class SigningError(ValueError):
    """A key file or signature that cannot be used; the message says why."""


def generate() -> tuple[str, str]:
    """A new keypair as (private PEM, public PEM)."""
    private = Ed25519PrivateKey.generate()
    return private_pem(private), public_pem(private.public_key())


def private_pem(key: Ed25519PrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode("ascii")


def public_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def load_private(pem: str | bytes, where: str = "the key") -> Ed25519PrivateKey:
    try:
        data = pem.encode("ascii") if isinstance(pem, str) else pem
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{where} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{where} is not an Ed25519 key")
    return key


def load_public(pem: str | bytes, where: str = "the public key") -> Ed25519PublicKey:
    try:
        data = pem.encode("ascii") if isinstance(pem, str) else pem
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{where} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{where} is not an Ed25519 key")
    return key


def read_private_file(path: str) -> Ed25519PrivateKey:
    try:
        with open(path, "rb") as handle:
            return load_private(handle.read(), path)
    except OSError as exc:
        raise SigningError(f"cannot read the private key {path}: {exc.strerror}") from None


def write_keypair(prefix: str) -> tuple[str, str]:
    """PREFIX.key (0600) and PREFIX.pub, each written atomically; returns their paths."""
    private, public = generate()
    key_path, pub_path = f"{prefix}.key", f"{prefix}.pub"
    for path in (key_path, pub_path):
        if os.path.exists(path):
            raise SigningError(f"{path} already exists; move it away or choose another --out")
    write_atomically(key_path, private.encode("ascii"), 0o600)
    write_atomically(pub_path, public.encode("ascii"), 0o644)
    return key_path, pub_path


def sign(key: Ed25519PrivateKey, payload: bytes) -> str:
    return base64.b64encode(key.sign(payload)).decode("ascii")


def verify(public_key_pem: str, payload: bytes, signature_b64: str) -> bool:
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        load_public(public_key_pem).verify(signature, payload)
        return True
    except (InvalidSignature, binascii.Error, ValueError):
        return False


def elipc_payload(channel: str, sender: str, content: str) -> bytes:
    return f"{channel}\n{sender}\n{content}".encode("utf-8")


def native_payload(channel: str, sender: str, to: str, signed_at_ms: int, key: str,
                   body: str, meta: dict | None) -> bytes:
    """What a native send's signature covers; SigningError if meta cannot be signed."""
    return "\n".join([NATIVE_TAG, channel, sender, to, str(signed_at_ms), key, _sha256(body),
                      meta_digest(meta)]).encode("utf-8")


def sign_send(key: Ed25519PrivateKey, channel: str, sender: str, to: str, body: str,
              meta: dict | None, idempotency_key: str | None = None) -> dict:
    """The fields a natively signed send carries beside the message: `key` (a fresh one
    if None: it is the nonce that makes a replay detectable), `signed_at` (now, in
    milliseconds) and `signature`. SigningError if meta cannot be signed."""
    idempotency_key = idempotency_key or uuid.uuid4().hex
    signed_at = int(time.time() * 1000)
    payload = native_payload(channel, sender, to, signed_at, idempotency_key, body, meta)
    return {"key": idempotency_key, "signed_at": signed_at, "signature": sign(key, payload)}


def meta_digest(meta: dict | None) -> str:
    if meta is None:
        return NO_META
    return _sha256(canonical_meta(meta))


def canonical_meta(meta: dict) -> str:
    """meta's canonical form (see the module's docstring); SigningError if it has none."""
    lines = []
    for name in sorted(meta, key=lambda k: k.encode("utf-8")):
        lines.append(f"{_b64(name)} {_canonical_value(name, meta[name])}\n")
    return "".join(lines)


def _canonical_value(name: str, value: object) -> str:
    if value is None:
        return "z"
    if value is True:
        return "t"
    if value is False:
        return "f"
    if isinstance(value, str):
        return "s" + _b64(value)
    if isinstance(value, int):
        return "n" + canonical_number(str(value))
    if isinstance(value, float) and math.isfinite(value):
        return "n" + canonical_number(repr(value))
    raise SigningError(f"meta[{name!r}] is not a string, finite number, boolean or null")


def canonical_number(text: str) -> str:
    """A number printed as the shortest round-trip decimal ("1e-05", "1.5e+16", "-0.0",
    "100") in the one canonical layout DIGITSeEXPONENT."""
    sign = "-" if text.startswith("-") else ""
    mantissa, _, exponent = text.lstrip("-").lower().partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    significant = digits.rstrip("0")
    if not significant:
        return "0"
    power = int(exponent or 0) - len(fraction) + len(digits) - len(significant)
    return f"{sign}{significant}e{power}"


def register_payload(name: str, identity: str, public_key: str, signed_at_ms: int) -> bytes:
    # identity is free text: hashed, so no newline in it can shift the fields after it.
    return "\n".join([REGISTER_TAG, name, _sha256(identity), _sha256(public_key.strip()),
                      str(signed_at_ms)]).encode("utf-8")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def looks_like_private_key(value: object) -> bool:
    return isinstance(value, str) and "PRIVATE KEY" in value and "-----BEGIN" in value


_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _base58btc(data: bytes) -> str:
    # Twelve lines are simpler than a dependency for the one encoding did:key needs.
    number = int.from_bytes(data, "big")
    out = ""
    while number:
        number, digit = divmod(number, 58)
        out = _B58[digit] + out
    leading_zeros = len(data) - len(data.lstrip(b"\0"))
    return "1" * leading_zeros + out


def did_key(public_key_pem: str) -> str:
    """did:key for an Ed25519 key: multicodec 0xed 0x01, then base58btc with a 'z'."""
    raw = load_public(public_key_pem).public_bytes(serialization.Encoding.Raw,
                                                   serialization.PublicFormat.Raw)
    return "did:key:z" + _base58btc(b"\xed\x01" + raw)
