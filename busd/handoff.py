"""Hash-and-path handoffs: the bus carries a file's fingerprint, never its bytes.

A handoff message's `meta` holds kind=handoff, files=N and, for each file, its
sha256, absolute path, host, bytes, lines and mtime. The first file's fields have
plain names (`sha256`, `path`, ...); the i-th file's (i >= 2) end in `.i`
(`sha256.2`, ...), so meta stays a flat object and one-file handoffs read simply.
The body is one readable line per file:
`hits.csv: lines=8 sha256=<hex> at host:/abs/path`.

Every file this module reads on someone's word -- a handoff's path, or a path a
person gives `verify` -- is opened the same way (open_regular): only a regular
file, never blocking, never a FIFO or a device, and never read past the size the
handoff announced. The daemon checks a handoff on arrival only under the shared
roots its owner declared (check_shared): everything else is `not checked`, and
why stays on the recipient's machine.
"""
from __future__ import annotations

import hashlib
import os
import re
import shlex
import socket
import stat
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from .fileio import atomic_file

CHUNK = 1 << 20          # hashing reads 1 MiB at a time: memory stays flat for any size
FIELDS = ("sha256", "path", "host", "bytes", "lines", "mtime")
# meta is at most 16 KiB by default, about 60 files' worth; a count above this is a lie.
MAX_FILES = 1000
SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")

VERIFIED, MISMATCH, NOT_CHECKED = "verified", "mismatch", "not checked"
# What `verify` says of a file it cannot read here. A daemon never reports it: to the
# bus, "absent" or "unreadable" would tell the sender what exists on this machine.
UNREACHABLE = "unreachable"
# The results a recipient's daemon reports to the bus (POST /handoff-checks).
REPORTED = (VERIFIED, MISMATCH, NOT_CHECKED)


class HandoffError(Exception):
    """A file cannot be handed off or fetched; the message says why."""


@dataclass(frozen=True)
class FileFacts:
    sha256: str
    path: str
    host: str
    bytes: int
    lines: int
    mtime: float

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def line(self) -> str:
        return f"{self.name}: lines={self.lines} sha256={self.sha256} at {self.host}:{self.path}"


class NotRegular(HandoffError):
    """The path names something other than a regular file (a FIFO, device, folder...)."""


class Stopped(Exception):
    """The daemon is stopping: a check in progress is left for its next start."""


class OverBudget(Exception):
    """A check took longer than its time budget."""


def open_regular(path: str, *, dir_fd: int | None = None,
                 follow: bool = True) -> tuple[int, os.stat_result]:
    """Open a regular file to read, never anything else and never blocking: (fd, fstat).

    Anything but a regular file is refused before it is opened (opening a FIFO
    blocks, opening a device can act on it), and again after (it may have been
    swapped in between). `follow=False` also refuses a final symlink. Raises
    OSError, or NotRegular.
    """
    before = os.stat(path, dir_fd=dir_fd, follow_symlinks=follow)
    if not stat.S_ISREG(before.st_mode):
        raise NotRegular("it is a symlink" if stat.S_ISLNK(before.st_mode)
                         else "it is not a regular file")
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    if not follow:
        flags |= os.O_NOFOLLOW
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular("it is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_chunks(fd: int, limit: int, deadline: float | None = None,
                stop: Callable[[], bool] | None = None):
    """At most `limit` bytes of fd, 1 MiB at a time; OverBudget past `deadline`
    (time.monotonic), Stopped once `stop()` says so."""
    left = limit
    while left > 0:
        if stop is not None and stop():
            raise Stopped()
        if deadline is not None and time.monotonic() > deadline:
            raise OverBudget()
        chunk = os.read(fd, min(CHUNK, left))
        if not chunk:
            return
        left -= len(chunk)
        yield chunk


def hash_file(path: str) -> tuple[str, int, int]:
    """(sha256 hex, bytes, lines) of a regular file, read in chunks up to the size it
    had when opened. Lines count like `wc -l`, plus a last line without a newline."""
    digest = hashlib.sha256()
    size = newlines = 0
    last = b"\n"
    fd, st = open_regular(path)
    try:
        for chunk in read_chunks(fd, st.st_size):
            digest.update(chunk)
            size += len(chunk)
            newlines += chunk.count(b"\n")
            last = chunk[-1:]
    finally:
        os.close(fd)
    return digest.hexdigest(), size, newlines + (1 if size and last != b"\n" else 0)


def absolute(path: str) -> str:
    """`path` made absolute without resolving a link (as `realpath -m -s` does, so a
    leading // is one /, as Linux reads it)."""
    return "/" + os.path.abspath(path).lstrip("/")


def describe(path: str, host: str | None = None) -> FileFacts:
    """Make the file private (0600), then fingerprint it."""
    absolute_path = absolute(path)
    if not os.path.isfile(absolute_path):
        raise HandoffError(f"{path}: not a regular file")
    try:
        os.chmod(absolute_path, 0o600)
        sha256, size, lines = hash_file(absolute_path)
        mtime = os.stat(absolute_path).st_mtime
    except NotRegular:
        raise HandoffError(f"{path}: not a regular file") from None
    except OSError as exc:
        raise HandoffError(f"{path}: {exc.strerror}") from None
    return FileFacts(sha256=sha256, path=absolute_path, host=host or socket.gethostname(),
                     bytes=size, lines=lines, mtime=mtime)


def _suffix(index: int) -> str:
    return "" if index == 1 else f".{index}"


def message_for(files: list[FileFacts], note: str | None = None) -> tuple[str, dict]:
    """The body and meta of a handoff message."""
    meta: dict = {"kind": "handoff", "files": len(files)}
    for index, facts in enumerate(files, start=1):
        for field in FIELDS:
            meta[field + _suffix(index)] = getattr(facts, field)
    body = "\n".join(facts.line() for facts in files)
    if note:
        body += "\n" + note
    return body, meta


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def files_in(meta: object) -> list[FileFacts]:
    """The files a handoff message's meta describes ([] if it is not a handoff).

    Raises HandoffError, saying what is wrong (never quoting the sender's values),
    for a handoff this cannot read: a file count that is not a whole number from 1
    to MAX_FILES, or a file without a sha256 (64 hex digits), an absolute path, or a
    size in bytes (a whole number). bin/bus-verify reads them the same way.
    """
    if not isinstance(meta, dict) or meta.get("kind") != "handoff":
        return []
    count = meta.get("files", 1)
    if not _is_count(count) or not 1 <= count <= MAX_FILES:
        raise HandoffError(f"meta.files is not a number of files from 1 to {MAX_FILES}")
    files = []
    for index in range(1, count + 1):
        suffix = _suffix(index)
        sha256, path, size = (meta.get(field + suffix) for field in ("sha256", "path", "bytes"))
        if not isinstance(sha256, str) or not SHA256_RE.fullmatch(sha256):
            raise HandoffError(f"meta.sha256{suffix} is not a sha256 (64 hex digits)")
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
            raise HandoffError(f"meta.path{suffix} is not an absolute path")
        if not _is_count(size) or size < 0:
            raise HandoffError(f"meta.bytes{suffix} is not a size in bytes")
        host, lines, mtime = (meta.get(field + suffix) for field in ("host", "lines", "mtime"))
        files.append(FileFacts(
            sha256=sha256.lower(), path=path, host=host if isinstance(host, str) else "",
            bytes=size, lines=lines if _is_count(lines) else 0,
            mtime=float(mtime) if _is_count(mtime) or isinstance(mtime, float) else 0.0))
    return files


# -- verify: a person asks about one file ----------------------------------------

def verify_file(path: str, sha256: str, size: int | None = None) -> str:
    """verified, mismatch or unreachable: `path`'s bytes against `sha256`.

    Any path a person names, but only a regular file, opened without blocking;
    with `size` (the handoff's announced bytes) a file of another size is a
    mismatch without a byte read, and no more than `size` bytes are ever read.
    """
    try:
        fd, st = open_regular(path)
    except (OSError, HandoffError):
        return UNREACHABLE
    try:
        if size is not None and st.st_size != size:
            return MISMATCH
        digest = hashlib.sha256()
        for chunk in read_chunks(fd, st.st_size):
            digest.update(chunk)
    except OSError:
        return UNREACHABLE
    finally:
        os.close(fd)
    return VERIFIED if digest.hexdigest() == sha256.lower() else MISMATCH


def overall(results: list[str]) -> str:
    """One word for several files: any mismatch wins, then any file that could not be
    read or was not checked; verified only if every file was."""
    for word in (MISMATCH, UNREACHABLE, NOT_CHECKED):
        if word in results:
            return word
    return VERIFIED if results else UNREACHABLE


def verify_meta(meta: dict) -> str:
    return overall([verify_file(f.path, f.sha256, f.bytes) for f in files_in(meta)])


# -- the daemon's check on arrival: only under the shared roots ---------------------

@dataclass(frozen=True)
class Check:
    """What a daemon found: `result` goes to the bus; `reason` never leaves this machine."""
    result: str
    reason: str = ""


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def unchecked_reason(path: str, roots: Sequence[str]) -> str | None:
    """Why `path` is not checked, judged from its text alone (nothing is touched on
    disk); None when it names a file under one of the shared `roots`."""
    if not roots:
        return "no folder is shared: see agent-bus init --shared"
    if ".." in path.split("/"):
        return "its path has a .. part"
    normal = os.path.normpath(path)
    if not any(_inside(normal, root) for root in roots):
        return "its path is outside the shared roots"
    if normal in roots:
        return "its path is a shared root itself"
    return None


def _folder_of(fd: int) -> str | None:
    """Where an open folder is now, as the kernel sees it (Linux), or None."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def check_shared_file(facts: FileFacts, roots: Sequence[str], deadline: float,
                      stop: Callable[[], bool]) -> Check:
    """One file of a handoff, checked as the shared roots allow. Raises Stopped."""
    reason = unchecked_reason(facts.path, roots)
    if reason:
        return Check(NOT_CHECKED, reason)
    folder, name = os.path.split(os.path.normpath(facts.path))
    real_roots = [os.path.realpath(root) for root in roots]
    try:
        real_folder = os.path.realpath(folder, strict=True)
    except OSError:
        return Check(NOT_CHECKED, "its folder cannot be reached")
    if not any(_inside(real_folder, root) for root in real_roots):
        return Check(NOT_CHECKED, "its folder leads out of the shared roots")
    try:
        dir_fd = os.open(real_folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return Check(NOT_CHECKED, "its folder cannot be opened")
    try:
        # The folder may have been swapped for a symlink since it was resolved.
        now = _folder_of(dir_fd)
        if now is not None and not any(_inside(now, root) for root in real_roots):
            return Check(NOT_CHECKED, "its folder leads out of the shared roots")
        try:
            fd, st = open_regular(name, dir_fd=dir_fd, follow=False)
        except NotRegular as exc:
            return Check(NOT_CHECKED, str(exc))
        except OSError:
            return Check(NOT_CHECKED, "it cannot be read here")
    finally:
        os.close(dir_fd)
    try:
        if st.st_size != facts.bytes:
            return Check(MISMATCH, f"its size is {st.st_size} bytes, not the {facts.bytes} "
                                   "handed off")
        digest = hashlib.sha256()
        for chunk in read_chunks(fd, facts.bytes, deadline, stop):
            digest.update(chunk)
    except OverBudget:
        return Check(NOT_CHECKED, "it took longer than the time a check may take")
    except OSError:
        return Check(NOT_CHECKED, "it could not be read to the end")
    finally:
        os.close(fd)
    if digest.hexdigest() != facts.sha256.lower():
        return Check(MISMATCH, "its sha256 differs")
    return Check(VERIFIED)


def check_shared(files: list[FileFacts], roots: Sequence[str], budget: float,
                 stop: Callable[[], bool]) -> Check:
    """A whole handoff, within `budget` seconds in all. Raises Stopped."""
    deadline = time.monotonic() + budget
    checks = [check_shared_file(facts, roots, deadline, stop) for facts in files]
    result = overall([c.result for c in checks])
    if len(checks) == 1:
        return checks[0]
    reasons = [f"file {i}: {c.reason}" for i, c in enumerate(checks, start=1) if c.reason]
    return Check(result, "; ".join(reasons))


# -- fetch ----------------------------------------------------------------------

def scp_command(facts: FileFacts, folder: str) -> str:
    return f"scp {shlex.quote(facts.host + ':' + facts.path)} {shlex.quote(folder)}/"


def fetch(facts: FileFacts, folder: str) -> str:
    """Copy a handed-off file into `folder`, keeping it only if its hash matches.

    Returns the new path. Raises HandoffError (nothing kept) when the file cannot
    be read here as a regular file or its bytes are not the ones handed off.
    """
    target = os.path.join(folder, facts.name)
    if os.path.exists(target):
        raise HandoffError(f"{target} already exists; move it away or fetch into another folder")
    try:
        source, st = open_regular(facts.path)
    except NotRegular as exc:
        raise HandoffError(f"{facts.path}: {exc}; nothing was kept") from None
    except OSError as exc:
        raise HandoffError(f"{facts.host}:{facts.path} is not reachable from here "
                           f"({exc.strerror})") from None
    try:
        if st.st_size != facts.bytes:
            raise HandoffError(f"{facts.path}: its size is {st.st_size} bytes, not the "
                               f"{facts.bytes} handed off; the file changed, nothing was kept")
        _copy_checked(source, facts, folder, target)
    finally:
        os.close(source)
    return target


def _copy_checked(source: int, facts: FileFacts, folder: str, target: str) -> None:
    """Copy `facts.bytes` bytes of `source` to `target` if they hash to `facts.sha256`."""
    digest = hashlib.sha256()
    try:
        # replace=False: never replaces a file that appeared meanwhile.
        with atomic_file(target, replace=False) as out:
            for chunk in read_chunks(source, facts.bytes):
                digest.update(chunk)
                out.write(chunk)
            if digest.hexdigest() != facts.sha256.lower():
                raise HandoffError(f"{facts.path}: its sha256 is {digest.hexdigest()}, not the "
                                   f"{facts.sha256} handed off; the file changed, nothing was "
                                   "kept")
    except FileExistsError:
        raise HandoffError(f"{target} appeared meanwhile; nothing was overwritten") from None
