"""The secret guard: refuse message bodies that look like keys or credentials.

What the bus carries may be shown to people (a listener's output rendered in an
operator's chat), so secrets travel as files and the bus carries their hash and
path (see handoff). `find_secret` names the first secret-looking thing in a body,
or returns None. The shapes are deliberately specific: a git SHA, a UUID, a
handoff's `sha256=<hex>`, a colour code or ordinary prose must pass. They live in
busd/data/secret-shapes.json, which bin/lib/agent-bus.sh reads too.
"""
from __future__ import annotations

import json
import os
import re
from functools import lru_cache

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
ADVICE = ("send it as a file instead: agent-bus handoff --to NAME FILE (only its sha256 and "
          "path travel); --allow-secret sends this one message anyway")

# Python's meanings of the shapes file's engine-specific parts (see its "about").
_MEANINGS = {"<ws>": r"\s", "<wb>": r"(?<!\w)", "<we>": r"(?!\w)"}


def _pattern(text: str, macros: dict[str, str]) -> str:
    for name, meaning in {**macros, **_MEANINGS}.items():
        text = text.replace(name, meaning)
    return text


@lru_cache(maxsize=1)
def shapes() -> dict:
    """The shapes file, compiled (once, when a first body is looked at)."""
    with open(os.path.join(DATA, "secret-shapes.json"), encoding="utf-8") as handle:
        data = json.load(handle)
    macros = data["macros"]
    labels = "|".join(re.escape(label) for label in data["digest_labels"])
    separators = _pattern(data["label_separators"], macros)
    return {
        # (what it is, pattern). Order matters only for which name a message reports.
        "shapes": tuple((name, re.compile(_pattern(text, macros))) for name, text in data["shapes"]),
        # A 64-hex value is a digest, not a key, when it says so just before it.
        "label": re.compile(f"(?i)(?:{labels})[{separators}]{{0,4}}$"),
        "seed_words": data["seed_phrase_words"],
    }


_HEX64 = re.compile(r"(?<![0-9A-Fa-f])(?:0x)?[0-9A-Fa-f]{64}(?![0-9A-Fa-f])")
_WORD = re.compile(r"[a-z]+")


@lru_cache(maxsize=1)
def bip39_words() -> frozenset[str]:
    with open(os.path.join(DATA, "bip39-english.txt"), encoding="ascii") as handle:
        return frozenset(handle.read().split())


def _unlabelled_hex_key(text: str) -> bool:
    for match in _HEX64.finditer(text):
        before = text[max(0, match.start() - 24):match.start()]
        if not shapes()["label"].search(before):
            return True
    return False


def _seed_phrase(text: str) -> bool:
    """12 or more BIP-39 words in a row (words separated by spaces or newlines only)."""
    words, enough = bip39_words(), shapes()["seed_words"]
    run = 0
    for token in re.split(r"[ \t\r\n]+", text.strip()):
        token = token.strip(".,;")
        if _WORD.fullmatch(token) and token in words:
            run += 1
            if run >= enough:
                return True
        else:
            run = 0
    return False


def find_secret(text: str) -> str | None:
    """What secret-looking thing `text` holds, or None when it looks clean."""
    for name, pattern in shapes()["shapes"]:
        if pattern.search(text):
            return name
    if _unlabelled_hex_key(text):
        return "an unlabelled 64-hex-digit key"
    if _seed_phrase(text):
        return f"a seed phrase ({shapes()['seed_words']} or more BIP-39 words in a row)"
    return None


def refusal(text: str) -> str | None:
    """The error message for a body the guard refuses, or None."""
    found = find_secret(text)
    return None if found is None else f"the message looks like it holds {found}; {ADVICE}"
