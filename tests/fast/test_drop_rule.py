"""The drop rule (busd/agent/spool.py, spool/README.md) as properties: what `drop_bytes`
writes, `parse_drop` reads back exactly; any file at all is a Drop or a BadDrop, and
what it accepts is a message the bus takes as it is.

Fast tier: pure logic in-process (`PY -m pytest tests/fast`).
"""
from __future__ import annotations

import os

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from busd import model, secretguard
from busd.agent.spool import HEADER_OPEN, BadDrop, Drop, drop_bytes, parse_drop

LIMIT = 64 * 1024

NAMES = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True).filter(model.is_valid_name)
RECIPIENTS = NAMES | st.just(model.BROADCAST)
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
               max_size=200)
# Bodies that look like the rule's own syntax are where a byte could go missing.
TRICKY_STARTS = st.sampled_from(["", "---bus\n", "---bus\r\n", "---\n", "\n---\n", "to: x\n",
                                 "---bus", "---"])
BODIES = st.builds(lambda start, rest: start + rest, TRICKY_STARTS, TEXT)


def sendable(body: str) -> bool:
    return secretguard.refusal(body) is None


@settings(deadline=None)
@given(to=RECIPIENTS, channel=st.none() | NAMES, body=BODIES, folder=st.none() | RECIPIENTS,
       default_channel=NAMES)
def test_what_drop_bytes_writes_parses_back_exactly(to, channel, body, folder, default_channel):
    assume(sendable(body))
    data = drop_bytes(to, body.encode(), channel)
    assert parse_drop(data, folder, default_channel, LIMIT) == Drop(
        to=to, channel=channel or default_channel, body=body)


@settings(deadline=None)
@given(folder=RECIPIENTS, body=BODIES)
def test_without_a_header_block_the_folder_names_the_recipient_and_the_file_is_the_body(
        folder, body):
    data = body.encode()
    assume(not data.startswith(HEADER_OPEN) and sendable(body))
    assert parse_drop(data, folder, "default", LIMIT) == Drop(to=folder, channel="default",
                                                            body=body)


HEADER_VALUES = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp"),
                                      blacklist_characters="\0\n\x85"), min_size=1,
                        max_size=30)
KEYS = st.from_regex(r"[\x21-\x7e]{1,40}", fullmatch=True)


@settings(deadline=None)
@given(to=RECIPIENTS, channel=NAMES, key=KEYS,
       meta=st.dictionaries(NAMES, HEADER_VALUES | st.just(""), max_size=4),
       upper=st.booleans(), spaces=st.sampled_from(["", " ", "  ", "\t"]), body=BODIES)
def test_every_header_reads_back_whatever_its_case_and_spacing(to, channel, key, meta, upper,
                                                               spaces, body):
    assume(sendable(body))
    fields = {"to": to, "channel": channel, "key": key,
              **{f"meta.{name}": value for name, value in meta.items()}}

    def header(name: str) -> str:
        # Header names (not meta fields) are not case-sensitive; spaces around go.
        shown = name.upper() if upper and not name.startswith("meta.") else name
        return f"{shown}{spaces}:{spaces}{fields[name]}{spaces}"

    data = ("---bus\n" + "\n".join(header(name) for name in fields) + "\n---\n" + body).encode()
    assert parse_drop(data, None, "default", LIMIT) == Drop(
        to=to, channel=channel, body=body, key=key, meta=meta or None)


# (header, the rest of its line): each makes a block wrong, in place of that header's
# right line when the block has one.
WRONG_LINES = [
    ("to", ": bad name"), ("to", ":"), ("to", ": .."), ("channel", ": *"), ("channel", ": a/b"),
    ("key", ": a key"), ("key", ":"), ("key", ": " + "k" * 300), ("allow-secret", ": maybe"),
    ("meta.", ": v"), ("meta.a b", ": v"), ("meta." + "x" * 65, ": v"),
    ("meta.big", ": " + "v" * 17000),  # over the meta limit (16 KiB)
    ("from", ": mallory"), ("no colon", ""), ("", ": no name"), ("", ""), ("---bus", ""),
    None,  # a right line, given twice
]


@pytest.mark.parametrize("wrong", WRONG_LINES,
                         ids=lambda w: "twice" if w is None else repr(w[0] + w[1][:12]))
@settings(max_examples=25, deadline=None)
@given(channel=NAMES, key=KEYS, meta=st.dictionaries(NAMES, HEADER_VALUES, max_size=3),
       position=st.integers(0, 6), body=BODIES)
def test_a_header_block_with_one_wrong_line_is_a_bad_drop(wrong, channel, key, meta, position,
                                                          body):
    lines = {"to": ": dell", "channel": f": {channel}", "key": f": {key}",
             **{f"meta.{name}": f": {value}" for name, value in meta.items()}}
    block = [name + rest for name, rest in lines.items()]
    if wrong is None:
        block.insert(position % (len(block) + 1), block[position % len(block)])
    else:
        name, rest = wrong
        lines[name] = rest
        block = [name + rest for name, rest in lines.items()]
    data = ("---bus\n" + "\n".join(block) + "\n---\n" + body).encode()
    with pytest.raises(BadDrop):
        parse_drop(data, "spark", "default", LIMIT)


SECRET = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJ+abc\n-----END PRIVATE KEY-----\n"


@settings(deadline=None)
@given(to=RECIPIENTS, body=TEXT, position=st.integers(0, 200),
       spoiler=st.sampled_from([b"\0", b"\xff", b"\xc3", b"\xed\xa0\x80", SECRET.encode()]))
def test_binary_and_secret_looking_bodies_are_bad_drops(to, body, position, spoiler):
    clean = body.encode()
    assume(sendable(body))
    at = len(body[:position].encode())
    spoilt = clean[:at] + spoiler + clean[at:]
    with pytest.raises(BadDrop):
        parse_drop(drop_bytes(to, spoilt), None, "default", LIMIT)
    with pytest.raises(BadDrop):
        parse_drop(spoilt, "dell", "default", LIMIT)
    if spoiler == SECRET.encode():  # unless the file says it means it
        allowed = b"---bus\nallow-secret: yes\n---\n" + spoilt
        assert parse_drop(allowed, to, "default", LIMIT).body == spoilt.decode()


# Pieces of the rule's syntax, and bytes that break it, to build files that come close.
PIECES = st.sampled_from([
    b"---bus\n", b"---\n", b"---", b"\n", b"\r\n", b"to: ", b"TO:", b"channel: ", b"key: ",
    b"allow-secret: ", b"yes", b"no", b"maybe", b"meta.", b"meta.kind: ", b"meta.a b: ",
    b"from: ", b":", b" ", b"dell", b"*", b"..", b".", b"a" * 70, b"\0", b"\xff", b"\xc3",
    b"\xed\xa0\x80", SECRET.encode(), b"k" * 300,
])
# Header lines, most of them right, so that a block gets as far as its wrong one.
LINE_PIECES = st.sampled_from([
    b"to: dell", b"To :*", b"channel: ops", b"key: k-1", b"allow-secret: yes",
    b"allow-secret: no", b"meta.kind: v", b"META.Kind:", b"to: dell", b"channel: ops",
    b"to:", b"to: bad name", b"channel: *", b"key: a key", b"key: " + b"k" * 300,
    b"allow-secret: maybe", b"meta.: v", b"meta.a b: v", b"meta.x/y: v", b"from: mallory",
    b"no colon", b": no name", b"", b"---bus", b"--", b"meta." + b"x" * 65 + b": v",
    b"meta.big: " + b"v" * 17000,
])
SMALL_TEXT = st.text(max_size=4).map(str.encode)
FILES = st.one_of(
    st.binary(max_size=300),
    st.lists(PIECES | SMALL_TEXT, max_size=40).map(b"".join),
    st.lists(PIECES | SMALL_TEXT, max_size=40).map(lambda p: b"---bus\n" + b"".join(p)),
    # A whole header block, closed, of lines close to right.
    st.builds(lambda lines, body: b"---bus\n" + b"\n".join(lines) + b"\n---\n" + body,
              st.lists(LINE_PIECES | (LINE_PIECES | SMALL_TEXT).map(lambda p: p + b" x"),
                       max_size=5),
              SMALL_TEXT | PIECES),
)
# A folder name comes from the file system: any bytes but "/" and NUL, as Python decodes them.
FOLDERS = st.none() | RECIPIENTS | st.binary(min_size=1, max_size=70).filter(
    lambda b: b"/" not in b and b"\0" not in b).map(os.fsdecode)


@settings(max_examples=400, deadline=None)
@given(data=FILES, folder=FOLDERS, default_channel=NAMES | st.text(max_size=5),
       limit=st.integers(0, 400) | st.just(LIMIT))
def test_any_file_is_a_drop_the_bus_takes_or_a_bad_drop_that_says_why(data, folder,
                                                                     default_channel, limit):
    try:
        drop = parse_drop(data, folder, default_channel, limit)
    except BadDrop as refused:
        assert str(refused).strip()
        return
    assert drop.to == model.BROADCAST or model.is_valid_name(drop.to)
    assert model.is_valid_name(drop.channel)
    assert model.check_body(drop.body, "body", limit, allow_empty=True) == drop.body
    assert data.endswith(drop.body.encode())  # the body is the file's tail, byte for byte
    assert "\0" not in drop.body  # binary is shared by path, never sent
    assert model.check_key(drop.key) == drop.key
    assert model.check_meta(drop.meta, model.DEFAULT_MAX_META_BYTES) == drop.meta
    assert sendable(drop.body) or b"allow-secret" in data.lower()
