"""How a message is framed as lines of text, so that no body can pass for the frame.

A *block* is what `agent-bus recv`, the daemon's stdout and inbox.log show per message:

    [20:45:55Z] from spark:        the header
    4/4 hits checked               the body, escaped (below)
    handoff: verified              status lines (`note:`, `handoff:`): only the daemon's
    ---                            the boundary

What the Claude Code hooks put in a model's context is the same block, its header
saying more (`[20:45:55Z] from spark (message 42, channel default, signed):`), so
the same rule keeps a body inside its own frame there too (context_block).

The daemon also writes, after a handoff's block, the result of its check:

    [20:45:56Z] handoff check of message 42 from spark:
    handoff: verified
    ---

The escape rule, the one rule every writer of blocks applies (bin/lib/agent-bus.sh
applies the same in jq, byte for byte):

  A body is cut into *segments*: one starts at the beginning of the body and after
  every control character but tab -- U+0000-U+0008, U+000A-U+001F, U+007F-U+009F --
  and after U+2028 and U+2029. (These are all the line breaks any reader knows,
  str.splitlines' included, and the carriage returns, backspaces and escape
  sequences with which a terminal moves its cursor back to a line's start.)
  A segment that begins with the *frame form* -- any number of backslashes, any
  number of blanks, then `---`, `[`, `handoff:` or `note:` (these two in any mix of
  case) -- gets one backslash more in front. Nothing else changes. A *blank* is a
  space, a tab, or a character a reader does not see or sees as a space (NBSP, the
  zero-width and other format characters, ideographic space, Hangul fillers,
  variation selectors, tags: BLANKS); a dash in `---` may be any character that looks
  like one (DASHES) and the `[` any that looks like it (BRACKETS), so that no
  invisible prefix or look-alike makes a body line pass for a frame line.

  The inverse: a segment that begins with a backslash followed by the frame form
  loses that one backslash.

So a body line reads as a boundary, a header or a status line never: each of those
starts a segment with no backslash, and every body segment that could be read so
begins with one. A body with no such segment is shown exactly as it is.
"""
from __future__ import annotations

import re
import time

from .jqtext import dumps
from .model import is_valid_name

# The characters after which a segment starts: kept as a regex class body, the same
# text bin/lib/agent-bus.sh puts in its jq filter.
SEGMENT_BREAKS = "\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029"
# What a frame line begins with; "handoff:" and "note:" in any case, spelled out so
# that no regex engine's Unicode case folding ("ﬀ" for "ff") widens or narrows it.
# The code points of the blanks, dashes and brackets the rule knows, as ranges
# (bin/lib/agent-bus.sh lists the same numbers; tests/test_framing.py holds them equal).
BLANKS = ((0x09, 0x09), (0x20, 0x20), (0xA0, 0xA0), (0xAD, 0xAD), (0x34F, 0x34F),
          (0x61C, 0x61C), (0x115F, 0x1160), (0x1680, 0x1680), (0x17B4, 0x17B5),
          (0x180B, 0x180F), (0x2000, 0x200F), (0x202A, 0x202F), (0x205F, 0x206F),
          (0x2800, 0x2800), (0x3000, 0x3000), (0x3164, 0x3164), (0xFE00, 0xFE0F),
          (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF9, 0xFFFB), (0xE0000, 0xE0FFF))
DASHES = ((0x2D, 0x2D), (0x2010, 0x2015), (0x2212, 0x2212), (0x23AF, 0x23AF),
          (0x2500, 0x2501), (0x2E3A, 0x2E3B), (0x2F00, 0x2F00), (0x30FC, 0x30FC),
          (0x4E00, 0x4E00), (0xFE58, 0xFE58), (0xFE63, 0xFE63), (0xFF0D, 0xFF0D))
BRACKETS = ((0x5B, 0x5B), (0x2045, 0x2045), (0x23A1, 0x23A3), (0x2772, 0x2772),
            (0x27E6, 0x27E6), (0x3010, 0x3010), (0x3014, 0x3014), (0x3016, 0x3016),
            (0x301A, 0x301A), (0xFE5D, 0xFE5D), (0xFF3B, 0xFF3B))


def _class(ranges) -> str:
    return "[" + "".join(re.escape(chr(a)) + ("-" + re.escape(chr(b)) if b > a else "")
                         for a, b in ranges) + "]"


FRAME_WORDS = (rf"{_class(DASHES)}{{3}}|{_class(BRACKETS)}"
               r"|[Hh][Aa][Nn][Dd][Oo][Ff][Ff]:|[Nn][Oo][Tt][Ee]:")
FRAME_FORM = rf"\\*{_class(BLANKS)}*(?:{FRAME_WORDS})"

_ESCAPE = re.compile(rf"(\A|[{SEGMENT_BREAKS}])({FRAME_FORM})")
_UNESCAPE = re.compile(rf"(\A|[{SEGMENT_BREAKS}])\\({FRAME_FORM})")
_SEGMENTS = re.compile(rf"[{SEGMENT_BREAKS}]")
_BARE_FRAME = re.compile(rf"{_class(BLANKS)}*(?:{FRAME_WORDS})")
# What JSON leaves as it is but a reader may take for a line break (or cannot encode).
_RAW_BREAKS = re.compile("[\x80-\x9f\u2028\u2029\ud800-\udfff]")

BOUNDARY = "---"
STATUS_WORDS = ("handoff", "note")
HEADER_RE = re.compile(r"\[\d\d:\d\d:\d\dZ\] (.*):")


def escape_body(body: str) -> str:
    """The body as a block shows it (the rule above)."""
    return _ESCAPE.sub(r"\1\\\2", body)


def unescape_body(shown: str) -> str:
    """The body a block showed: escape_body's exact inverse."""
    return _UNESCAPE.sub(r"\1\2", shown)


def segments(text: str) -> list[str]:
    """`text` cut where the escape rule cuts it."""
    return _SEGMENTS.split(text)


def reads_as_frame(segment: str) -> bool:
    """Could a reader take this segment for a boundary, a header or a status line?"""
    return _BARE_FRAME.match(segment) is not None


def one_line(text: object, limit: int = 200) -> str:
    """`text` (an error, say, whose words may come from a bus or a sender) as one line
    that no reader can take for more: every segment break a space, blanks collapsed,
    escaped as a body is, cut to `limit` characters."""
    flat = " ".join(" ".join(segments(str(text))).split())
    flat = flat if len(flat) <= limit else flat[:limit] + "..."
    return escape_body(flat)


def shown_name(value: object) -> str:
    """A sender's name as a header shows it: a valid name as it is, anything else as
    JSON (jq's, as the shell mirror writes it) with every character a reader may take
    for a line break escaped, so it can never break the line."""
    if isinstance(value, str) and is_valid_name(value):
        return value
    try:
        text = dumps(value)
    except ValueError:  # an integer with more digits than Python prints
        text = dumps(f"a {type(value).__name__}")
    return _RAW_BREAKS.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def stamp(ts: float) -> str:
    """`[HH:MM:SSZ]`: a block header's time, UTC."""
    return "[" + time.strftime("%H:%M:%S", time.gmtime(float(ts))) + "Z]"


def monitor_block(message: dict, status: list[str] | None = None) -> str:
    """The block of one message: header, escaped body, the status lines given, boundary."""
    lines = [f"{stamp(message.get('ts', 0))} from {shown_name(message.get('from'))}:",
             escape_body(str(message.get("msg", "")))]
    lines += status or []
    return "\n".join(lines) + f"\n{BOUNDARY}\n"


def context_block(ts: float, sender: object, message_id: int, channel: object, signed: bool,
                  body: str, status: list[str] | None = None) -> str:
    """A message's block as the hooks show it to a model: the header names its sender, id,
    channel and whether its signature was verified; the body is escaped as in every block."""
    header = (f"{stamp(ts)} from {shown_name(sender)} (message {int(message_id)}, channel "
              f"{shown_name(channel)}, {'signed' if signed else 'not signed'}):")
    return "\n".join([header, escape_body(body), *(status or [])]) + f"\n{BOUNDARY}\n"


def check_block(ts: float, message_id: int, sender: object, status: str) -> str:
    """The entry that follows a handoff's block once the daemon has checked it."""
    return (f"{stamp(ts)} handoff check of message {int(message_id)} from "
            f"{shown_name(sender)}:\nhandoff: {status}\n{BOUNDARY}\n")
