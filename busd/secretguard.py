"""The secret guard: refuse message bodies that look like keys or credentials.

What the bus carries may be shown to people (a listener's output rendered in an
operator's chat), so secrets travel as files and the bus carries their hash and
path (see handoff). `find_secret` names the first secret-looking thing in a body,
or returns None. The shapes are deliberately specific: a git SHA, a UUID, a
handoff's `sha256=<hex>`, a colour code or ordinary prose must pass.
"""
from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources

ADVICE = ("send it as a file instead: agent-bus handoff --to NAME FILE (only its sha256 and "
          "path travel); --allow-secret sends this one message anyway")

_B58 = "1-9A-HJ-NP-Za-km-z"

# (what it is, pattern). Order matters only for which name a message reports.
SHAPES: tuple[tuple[str, re.Pattern], ...] = tuple((name, re.compile(pattern)) for name, pattern in (
    ("a PEM private key", r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"),
    ("a cloud service-account key file", r'"private_key(?:_id)?"\s*:\s*"'),
    ("an AWS access key id", r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}\b"),
    ("an AWS secret access key",
     r"(?i)aws.{0,30}?(?:secret|private).{0,30}?[:=]\s*['\"]?[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])"),
    ("a Google API key", r"\bAIza[0-9A-Za-z_\-]{35}(?![0-9A-Za-z_\-])"),
    ("an Azure storage key", r"AccountKey=[A-Za-z0-9+/=]{40,}"),
    ("a GitHub token", r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})"),
    ("a GitLab token", r"\bglpat-[A-Za-z0-9_\-]{20,}"),
    ("a Slack token", r"\bxox[abposr]-[A-Za-z0-9\-]{10,}"),
    ("a Stripe secret key", r"\b[sr]k_(?:live|test)_[A-Za-z0-9]{16,}"),
    ("an API secret key (sk-...)", r"\bsk-(?:ant-|proj-)?[A-Za-z0-9_\-]{20,}"),
    ("an agent-bus token", r"\babt_[A-Za-z0-9_\-]{30,}"),
    ("a JSON web token", r"\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"),
    ("a bearer token", r"(?i)\bbearer\s+[A-Za-z0-9._~+/\-]{20,}"),
    ("a password or secret in an assignment",
     r"(?i)\b(?:password|passwd|pwd|passphrase|secret|api[_-]?key|access[_-]?token|"
     r"auth[_-]?token|client[_-]?secret|private[_-]?key)\b\s*[:=]\s*['\"]?[^\s'\"]{8,}"),
    # A scheme is short: bounding it keeps this linear on text like "a.a.a.a...".
    ("a URL with a password in it", r"\b[a-z][a-z0-9+.\-]{0,30}://[^\s:/@]+:[^\s@/]{3,}@"),
    ("an extended private key (xprv)", rf"\b[xyzt]prv[{_B58}]{{100,}}"),
    ("a WIF private key", rf"(?<![{_B58}])[5KL][{_B58}]{{50,51}}(?![{_B58}])"),
    ("a long base58 secret", rf"(?<![{_B58}])[{_B58}]{{80,90}}(?![{_B58}])"),
))

_HEX64 = re.compile(r"(?<![0-9A-Fa-f])(?:0x)?[0-9A-Fa-f]{64}(?![0-9A-Fa-f])")
# A 64-hex value is a digest, not a key, when it says so just before it.
_DIGEST_LABEL = re.compile(
    r"(?i)(?:sha-?256|sha256sum|sha|digest|hash|checksum|txid|tx|block|commit)"
    r"[\s\"':=(]{0,4}$")
_WORD = re.compile(r"[a-z]+")
SEED_PHRASE_WORDS = 12


@lru_cache(maxsize=1)
def bip39_words() -> frozenset[str]:
    text = resources.files("busd").joinpath("data/bip39-english.txt").read_text("ascii")
    return frozenset(text.split())


def _unlabelled_hex_key(text: str) -> bool:
    for match in _HEX64.finditer(text):
        before = text[max(0, match.start() - 24):match.start()]
        if not _DIGEST_LABEL.search(before):
            return True
    return False


def _seed_phrase(text: str) -> bool:
    """12 or more BIP-39 words in a row (words separated by spaces or newlines only)."""
    words = bip39_words()
    run = 0
    for token in re.split(r"[ \t\r\n]+", text.strip()):
        token = token.strip(".,;")
        if _WORD.fullmatch(token) and token in words:
            run += 1
            if run >= SEED_PHRASE_WORDS:
                return True
        else:
            run = 0
    return False


def find_secret(text: str) -> str | None:
    """What secret-looking thing `text` holds, or None when it looks clean."""
    for name, pattern in SHAPES:
        if pattern.search(text):
            return name
    if _unlabelled_hex_key(text):
        return "an unlabelled 64-hex-digit key"
    if _seed_phrase(text):
        return "a seed phrase (12 or more BIP-39 words in a row)"
    return None


def refusal(text: str) -> str | None:
    """The error message for a body the guard refuses, or None."""
    found = find_secret(text)
    return None if found is None else f"the message looks like it holds {found}; {ADVICE}"
