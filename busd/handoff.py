"""Hash-and-path handoffs: the bus carries a file's fingerprint, never its bytes.

A handoff message's `meta` holds kind=handoff, files=N and, for each file, its
sha256, absolute path, host, bytes, lines and mtime. The first file's fields have
plain names (`sha256`, `path`, ...); the i-th file's (i >= 2) end in `.i`
(`sha256.2`, ...), so meta stays a flat object and one-file handoffs read simply.
The body is one readable line per file:
`hits.csv: lines=8 sha256=<hex> at host:/abs/path`.
"""
from __future__ import annotations

import hashlib
import os
import shlex
import socket
import tempfile
from dataclasses import dataclass

CHUNK = 1 << 20          # hashing reads 1 MiB at a time: memory stays flat for any size
FIELDS = ("sha256", "path", "host", "bytes", "lines", "mtime")

VERIFIED, MISMATCH, UNREACHABLE = "verified", "mismatch", "unreachable"


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


def hash_file(path: str) -> tuple[str, int, int]:
    """(sha256 hex, bytes, lines) read in chunks. Lines count like `wc -l`, plus a last
    line without a newline."""
    digest = hashlib.sha256()
    size = newlines = 0
    last = b"\n"
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            newlines += chunk.count(b"\n")
            last = chunk[-1:]
    return digest.hexdigest(), size, newlines + (1 if size and last != b"\n" else 0)


def describe(path: str, host: str | None = None) -> FileFacts:
    """Make the file private (0600), then fingerprint it."""
    absolute = os.path.abspath(path)
    if not os.path.isfile(absolute):
        raise HandoffError(f"{path}: not a regular file")
    try:
        os.chmod(absolute, 0o600)
        sha256, size, lines = hash_file(absolute)
        mtime = os.stat(absolute).st_mtime
    except OSError as exc:
        raise HandoffError(f"{path}: {exc.strerror}") from None
    return FileFacts(sha256=sha256, path=absolute, host=host or socket.gethostname(),
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


def files_in(meta: dict) -> list[FileFacts]:
    """The files a handoff message's meta describes (empty if it is not a handoff)."""
    if not isinstance(meta, dict) or meta.get("kind") != "handoff":
        return []
    files = []
    for index in range(1, int(meta.get("files", 1)) + 1):
        values = {field: meta.get(field + _suffix(index)) for field in FIELDS}
        if not isinstance(values["sha256"], str) or not isinstance(values["path"], str):
            continue
        files.append(FileFacts(sha256=values["sha256"], path=values["path"],
                               host=str(values["host"] or ""), bytes=int(values["bytes"] or 0),
                               lines=int(values["lines"] or 0), mtime=float(values["mtime"] or 0)))
    return files


def verify_file(path: str, sha256: str) -> str:
    try:
        actual, _, _ = hash_file(path)
    except OSError:
        return UNREACHABLE
    return VERIFIED if actual == sha256.lower() else MISMATCH


def overall(results: list[str]) -> str:
    """One word for several files: any mismatch wins, then any unreachable."""
    if MISMATCH in results:
        return MISMATCH
    if UNREACHABLE in results or not results:
        return UNREACHABLE
    return VERIFIED


def verify_meta(meta: dict) -> str:
    return overall([verify_file(f.path, f.sha256) for f in files_in(meta)])


def scp_command(facts: FileFacts, folder: str) -> str:
    return f"scp {shlex.quote(facts.host + ':' + facts.path)} {shlex.quote(folder)}/"


def fetch(facts: FileFacts, folder: str) -> str:
    """Copy a handed-off file into `folder`, keeping it only if its hash matches.

    Returns the new path. Raises HandoffError (nothing kept) when the file cannot
    be read here or its bytes are not the ones handed off.
    """
    target = os.path.join(folder, facts.name)
    if os.path.exists(target):
        raise HandoffError(f"{target} already exists; move it away or fetch into another folder")
    try:
        source = open(facts.path, "rb")
    except OSError as exc:
        raise HandoffError(f"{facts.host}:{facts.path} is not reachable from here "
                           f"({exc.strerror})") from None
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{facts.name}.", suffix=".fetching")
    digest = hashlib.sha256()
    try:
        with source, os.fdopen(fd, "wb") as out:
            while chunk := source.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != facts.sha256.lower():
            raise HandoffError(f"{facts.path}: its sha256 is {digest.hexdigest()}, not the "
                               f"{facts.sha256} handed off; the file changed, nothing was kept")
        os.link(tmp, target)  # unlike a rename, never replaces a file that appeared meanwhile
        os.unlink(tmp)
    except FileExistsError:
        os.unlink(tmp)
        raise HandoffError(f"{target} appeared meanwhile; nothing was overwritten") from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target
