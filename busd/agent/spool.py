"""One agent's spool folder: its layout, the drop rule, and the names of the files in it.

Everything here is plain file work with no threads and no network, so the daemon,
`agent-bus drop` and `agent-bus inbox` share one definition of the folder.
spool/README.md is the user's side of this module; keep the two in step.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
import time
from dataclasses import dataclass

from .. import model, secretguard
from ..errors import BusError
from ..fileio import FILE_MODE, fsync_dir, write_atomically

# Only for the annotations: importing `typing` costs `agent-bus drop` and `inbox` milliseconds.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

FOLDER_MODE = 0o700

# A header block may use this much of a file on top of the message size limit.
MAX_HEADER_BYTES = 8 * 1024

HEADER_OPEN = b"---bus\n"
HEADER_CLOSE = b"---"
HEADERS = ("to", "channel", "key", "allow-secret")
META_PREFIX = "meta."

# Longest file name most filesystems take (bytes).
NAME_MAX = 255

_TOKEN_RE = re.compile(r"(\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{8})-(.*)", re.DOTALL)


def is_ignored(name: str) -> bool:
    """Names a writer uses while a file is unfinished: never sent, never touched."""
    return (name.startswith(".") or name.endswith((".swp", "~", ".tmp"))
            or (len(name) > 1 and name.startswith("#") and name.endswith("#")))


@dataclass(frozen=True)
class SpoolLayout:
    """The paths of one agent's folder, `<spool root>/<name>/`."""
    root: str

    @classmethod
    def for_agent(cls, spool_root: str, name: str) -> "SpoolLayout":
        if not model.is_valid_name(name):
            raise ValueError(f"invalid agent name {name!r}: use 1-64 characters of "
                             "A-Z a-z 0-9 . _ - (not only dots)")
        return cls(os.path.join(os.path.abspath(spool_root), name))

    @property
    def outbox(self) -> str:
        return os.path.join(self.root, "outbox")

    @property
    def claimed(self) -> str:
        return os.path.join(self.root, "claimed")

    @property
    def sent(self) -> str:
        return os.path.join(self.root, "sent")

    @property
    def failed(self) -> str:
        return os.path.join(self.root, "failed")

    @property
    def inbox(self) -> str:
        return os.path.join(self.root, "inbox")

    @property
    def checking(self) -> str:
        """Handoffs filed and waiting for their check: one empty file per inbox name."""
        return os.path.join(self.root, "checking")

    @property
    def inbox_log(self) -> str:
        return os.path.join(self.root, "inbox.log")

    @property
    def cursor(self) -> str:
        return os.path.join(self.root, "cursor")

    @property
    def lock_file(self) -> str:
        return os.path.join(self.root, ".lock")

    def create(self) -> None:
        """Make every folder, 0700; folders that exist are made private too."""
        os.makedirs(os.path.dirname(self.root), mode=FOLDER_MODE, exist_ok=True)
        for folder in (self.root, self.outbox, self.claimed, self.sent, self.failed, self.inbox,
                       self.checking):
            os.makedirs(folder, mode=FOLDER_MODE, exist_ok=True)
            if stat.S_IMODE(os.stat(folder).st_mode) != FOLDER_MODE:
                os.chmod(folder, FOLDER_MODE)


class AgentLocked(Exception):
    """Another daemon already serves this agent's folder."""


class AgentLock:
    """An flock on `<agent>/.lock`: one daemon per folder. The kernel drops it when the
    process dies, even by kill -9, so a crash never leaves a stale lock."""

    def __init__(self, layout: SpoolLayout):
        self.path = layout.lock_file
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise AgentLocked(f"another daemon (pid {holder}) already runs for "
                                  f"{os.path.dirname(self.path)}; stop it first") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# -- names -----------------------------------------------------------------

def new_token(now: float | None = None) -> str:
    """A name part no other claim or drop of this agent will ever have: UTC time + random."""
    now = time.time() if now is None else now
    micros = int(round(now * 1_000_000))
    seconds, fraction = divmod(micros, 1_000_000)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(seconds))
    return f"{stamp}.{fraction:06d}Z-{os.urandom(4).hex()}"


def fit_name(prefix: str, name: str, suffix: str = "") -> str:
    """prefix + name + suffix, shortening `name` so the whole fits in one file name."""
    room = NAME_MAX - len(prefix.encode()) - len(suffix.encode())
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) > room:
        name = encoded[:max(room, 0)].decode("utf-8", "ignore")
    return prefix + name + suffix


def claimed_name(token: str, original: str) -> str:
    return fit_name(token + "-", original)


def split_claimed_name(name: str) -> tuple[str, str] | None:
    """(token, original name) of a claimed/ or failed/ file, or None if it is not one."""
    match = _TOKEN_RE.fullmatch(name)
    return (match.group(1), match.group(2)) if match else None


def idempotency_key(token: str) -> str:
    # Fixed by the claim's file name, so a resend after a crash carries the same key.
    return "spool-" + token


def shown_path(layout: SpoolLayout, path: str) -> str:
    """A path relative to the agent's folder, for messages."""
    return os.path.relpath(path, layout.root)


# -- the drop rule ---------------------------------------------------------

@dataclass(frozen=True)
class Drop:
    """What a dropped file asks for: the message to send."""
    to: str
    channel: str
    body: str
    key: str | None = None
    meta: dict | None = None


class BadDrop(Exception):
    """A file that can never be sent as it is. The text says why and what to do."""


def outbox_place(outbox: str, path: str) -> tuple[str | None, str] | None:
    """(recipient folder or None for outbox/ itself, file name) of a file under outbox/.

    None if the path is not a drop at all (outside outbox/, or an ignored name).
    Raises BadDrop for a file deeper than outbox/<to>/.
    """
    relative = os.path.relpath(path, outbox)
    parts = relative.split(os.sep)
    if relative.startswith("..") or any(is_ignored(part) for part in parts):
        return None
    if len(parts) == 1:
        return None, parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise BadDrop(f"dropped in a nested folder (outbox/{relative}): drop files in "
                  "outbox/<to>/ or in outbox/ itself, not deeper")


def read_drop_file(path: str, max_msg_bytes: int) -> bytes:
    """The bytes of a claimed file; never follows a symlink or blocks on a pipe."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except PermissionError:
        raise BadDrop("cannot read it: permission denied (is it yours, and readable?)") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BadDrop("not a regular file but a symlink: drop the file itself "
                          "(cp or mv it into the outbox)") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadDrop("not a regular file (a pipe, socket or device?): drop a plain file")
        limit = max_msg_bytes + MAX_HEADER_BYTES
        if info.st_size > limit:
            raise BadDrop(_too_large(info.st_size, max_msg_bytes))
        chunks = []
        remaining = limit + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:
            raise BadDrop(_too_large(len(data), max_msg_bytes))
        return data
    finally:
        os.close(fd)


def _too_large(size: int, max_msg_bytes: int) -> str:
    return (f"too large: {size} bytes, the message limit is {max_msg_bytes} bytes: "
            "split it, or share the file by its path instead of its content")


def parse_drop(data: bytes, folder: str | None, default_channel: str,
               max_msg_bytes: int) -> Drop:
    """Apply the drop rule (spool/README.md) to a file's bytes; BadDrop says what is wrong."""
    if b"\0" in data:
        raise BadDrop(f"binary: the file holds a NUL byte at offset {data.index(0)}; only UTF-8 "
                      "text can be sent: share binary files by their path instead")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadDrop(f"binary: the file is not UTF-8 text (byte {exc.start} is "
                      f"0x{data[exc.start]:02x}); only UTF-8 text can be sent: share binary "
                      "files by their path instead") from None

    headers: dict[str, str] = {}
    body = data
    if data.startswith(HEADER_OPEN):
        headers, body = _split_header_block(data)

    body_text = body.decode("utf-8")
    if len(body) > max_msg_bytes:
        raise BadDrop(_too_large(len(body), max_msg_bytes))

    if "to" in headers:
        to, source = headers["to"], "in the to: header"
    elif folder is not None:
        to, source = folder, f"from the folder outbox/{folder}/"
    else:
        raise BadDrop("no recipient: a file dropped directly in outbox/ needs a `to:` header; "
                      "or drop it in outbox/<to>/")
    if to != model.BROADCAST and not model.is_valid_name(to):
        raise BadDrop(f"invalid recipient name {to!r} ({source}): names are 1-64 characters "
                      "of A-Z a-z 0-9 . _ - and not only dots; '*' means everyone")

    channel = headers.get("channel", default_channel)
    if not model.is_valid_name(channel):
        raise BadDrop(f"invalid channel {channel!r}: channels are 1-64 characters of "
                      "A-Z a-z 0-9 . _ - and not only dots")

    key = headers.get("key")
    try:
        model.check_key(key)
    except BusError as exc:
        raise BadDrop(f"invalid key {key!r}: {exc.message}") from None

    allow_secret = headers.get("allow-secret", "no").lower()
    if allow_secret not in ("yes", "no"):
        raise _malformed(f"`allow-secret:` is {allow_secret!r}; write yes or no")
    if allow_secret == "no" and (problem := secretguard.refusal(body_text)):
        raise BadDrop(f"{problem.replace('--allow-secret', 'the header `allow-secret: yes`')}")

    meta = {name[len(META_PREFIX):]: value for name, value in headers.items()
            if name.startswith(META_PREFIX)} or None
    try:
        model.check_meta(meta, model.DEFAULT_MAX_META_BYTES)
    except BusError as exc:
        raise BadDrop(f"invalid meta headers: {exc.message}") from None
    return Drop(to=to, channel=channel, body=body_text, key=key, meta=meta)


def _split_header_block(data: bytes) -> tuple[dict[str, str], bytes]:
    if data.find(b"\n" + HEADER_CLOSE + b"\n") < 0 and not data.endswith(b"\n" + HEADER_CLOSE):
        raise _malformed("the block has no closing line `---`")
    headers: dict[str, str] = {}
    pos = len(HEADER_OPEN)
    line_number = 1
    while True:
        line_number += 1
        end = data.find(b"\n", pos)
        line = data[pos:] if end < 0 else data[pos:end]
        if line == HEADER_CLOSE:
            return headers, (b"" if end < 0 else data[end + 1:])
        if end < 0 or pos > MAX_HEADER_BYTES:
            raise _malformed("the block has no closing line `---`")
        pos = end + 1
        text = line.decode("utf-8")
        name, colon, value = text.partition(":")
        name, value = name.strip(), value.strip()
        if not colon or not name:
            raise _malformed(f"line {line_number} ({text[:40]!r}) is not `name: value`")
        if name.lower() in HEADERS:
            name = name.lower()
            if not value:
                raise _malformed(f"line {line_number}: `{name}:` has no value")
        elif name.lower().startswith(META_PREFIX):
            field = name[len(META_PREFIX):]
            if not model.is_valid_name(field):
                raise _malformed(f"line {line_number}: {name!r} is not meta.<field> with a "
                                 "field of A-Z a-z 0-9 . _ -")
            name = META_PREFIX + field
        else:
            raise _malformed(f"line {line_number}: unknown header {name!r}")
        if name in headers:
            raise _malformed(f"line {line_number}: `{name}:` is given twice")
        headers[name] = value


def _malformed(detail: str) -> BadDrop:
    return BadDrop(f"malformed header block: {detail}. A header block is the line `---bus`, "
                   "then `name: value` lines (to, channel, key, allow-secret, meta.<field>), "
                   "then the line "
                   "`---`; see spool/README.md")


def is_being_written(path: str) -> bool | None:
    """Does any process hold `path` open for writing? None if this system cannot tell.

    Asks the kernel for a read lease, which Linux grants only while no one has the
    file open for writing, and gives it straight back. A writer that opens the file
    in that instant waits for the release; the lease-break signal, SIGIO, must be
    ignored by the process (the daemon does).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False  # gone, a symlink, unreadable: the claim and the read say what it is
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return True if exc.errno in (errno.EAGAIN, errno.EBUSY) else None
    except AttributeError:
        return None  # not Linux
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


# -- the inbox: its file names and the file format (agent/inbox.py writes them) -----

INBOX_NAME_RE = re.compile(r"(\d+\.\d{6})-(\d+)-(.+)\.msg")


@dataclass(frozen=True)
class InboxEntry:
    id: int
    ts: float
    sender: str
    path: str

    @classmethod
    def named(cls, folder: str, name: str) -> "InboxEntry | None":
        """The entry a file name `<ts>-<id>-<from>.msg` stands for, or None."""
        match = INBOX_NAME_RE.fullmatch(name)
        if match is None:
            return None
        return cls(id=int(match.group(2)), ts=float(match.group(1)), sender=match.group(3),
                   path=os.path.join(folder, name))


def entries_in(folder: str) -> list[InboxEntry]:
    """The inbox names in `folder` (inbox/, or checking/), oldest first."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    entries = [e for e in (InboxEntry.named(folder, name) for name in names) if e is not None]
    return sorted(entries, key=lambda e: (e.ts, e.id))


def list_inbox(layout: SpoolLayout) -> list[InboxEntry]:
    """The inbox files, oldest first."""
    return entries_in(layout.inbox)


def read_header_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_inbox_file(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(headers, body bytes) of an inbox file; meta.<k> headers gathered in headers["meta"]."""
    head, sep, body = data.partition(b"\n\n")
    if not sep:
        raise ValueError("not an inbox file: no blank line after the headers")
    headers: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    for line in head.decode("utf-8").split("\n"):
        name, _, value = line.partition(": ")
        if name.startswith("meta."):
            meta[name[5:]] = read_header_value(value)
        elif name == "meta":
            others = read_header_value(value)
            if isinstance(others, dict):
                meta.update(others)
        else:
            headers[name] = value
    if meta:
        headers["meta"] = meta
    return headers, body


# -- writing ---------------------------------------------------------------

def drop_bytes(to: str, body: bytes, channel: str | None = None) -> bytes:
    """A drop file that says its own recipient (and channel): a header block, then the body."""
    lines = [f"to: {to}"] + ([f"channel: {channel}"] if channel else [])
    return HEADER_OPEN + "\n".join(lines).encode() + b"\n" + HEADER_CLOSE + b"\n" + body


def drop(layout: SpoolLayout, to: str, body: bytes, channel: str | None,
         max_msg_bytes: int) -> str:
    """Drop `body` for `to` into the outbox atomically; the path it got. BadDrop if it never could go.

    The file is written in the agent's folder, outside outbox/, and renamed in, so
    the daemon sees one finished file. It always carries a header block, which keeps
    a body that itself starts with `---bus` byte-exact.
    """
    if to != model.BROADCAST and not model.is_valid_name(to):
        raise BadDrop(f"invalid recipient name {to!r}: names are 1-64 characters of "
                      "A-Z a-z 0-9 . _ - and not only dots; '*' means everyone")
    if channel is not None and not model.is_valid_name(channel):
        raise BadDrop(f"invalid channel {channel!r}: channels are 1-64 characters of "
                      "A-Z a-z 0-9 . _ - and not only dots")
    data = drop_bytes(to, body, channel)
    parse_drop(data, None, channel or model.DEFAULT_CHANNEL, max_msg_bytes)
    layout.create()
    token = new_token()
    target = os.path.join(layout.outbox, f"drop-{token}")
    write_atomically(target, data, temp_dir=layout.root)
    fsync_dir(layout.outbox)
    return target

