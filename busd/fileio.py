"""Writing a file so that no crash leaves half of it: the one recipe every writer uses.

A file is written under a hidden temporary name in the folder it will live in (or in
`temp_dir`, on the same filesystem), fsynced, then renamed over its name -- or, with
`replace=False`, linked to it, which fails rather than replace a file that appeared
meanwhile. Readers see the old file or the new one, never a mix. Making the rename
itself durable is the caller's `fsync_dir`, once per batch of files.
"""
from __future__ import annotations

import contextlib
import os

# Only for the annotations: importing `typing` costs `agent-bus drop` and `inbox` milliseconds.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import BinaryIO, Iterator

FILE_MODE = 0o600


def fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_new_file(path: str, data: bytes, mode: int = FILE_MODE) -> None:
    """Create `path` (O_EXCL, never through a symlink) with `data`, durably. A leftover
    from a crash is replaced."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        os.unlink(path)
        fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)   # the mode asked for, whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str, mode: int = FILE_MODE, *, replace: bool = True,
                temp_dir: str | None = None) -> Iterator[BinaryIO]:
    """Write `path` through the handle this yields; it appears, whole and durable, when the
    block ends, and not at all if the block raises. FileExistsError with `replace=False`
    when `path` exists by then."""
    folder, name = os.path.split(os.path.abspath(path))
    temp = os.path.join(temp_dir or folder, f".{name.encode()[:200].decode('utf-8', 'ignore')}.{os.urandom(4).hex()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(fd, mode)   # the mode asked for, whatever the umask
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(temp, path)
        else:
            os.link(temp, path)
            os.unlink(temp)
    except BaseException:
        unlink_quietly(temp)
        raise


def write_atomically(path: str, data: bytes, mode: int = FILE_MODE, *, replace: bool = True,
                     temp_dir: str | None = None) -> None:
    """Replace (or, `replace=False`, create) `path` with `data` all at once."""
    with atomic_file(path, mode, replace=replace, temp_dir=temp_dir) as handle:
        handle.write(data)
