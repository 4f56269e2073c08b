"""Child processes the harness starts, and what /proc says about processes."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
from typing import Iterator


class Child:
    """A child process with threads draining its pipes: stopped with SIGTERM or killed
    with kill -9 (as a crash would), then reaped, its drains joined, its pipes closed."""

    STOP_TIMEOUT = 10.0

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self._drains: list[threading.Thread] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _reap(self, timeout: float) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        for drain in self._drains:
            drain.join(timeout)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        self.proc = None
        return code

    def stop(self, timeout: float | None = None) -> int:
        """SIGTERM, and the exit code."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        return self._reap(self.STOP_TIMEOUT if timeout is None else timeout)

    def kill(self) -> None:
        """kill -9, as a crash would."""
        if self.proc is None:
            return
        self.proc.kill()
        self._reap(10)


def finish(process: subprocess.Popen, timeout: float) -> tuple[bytes, bytes]:
    """A child's whole output once it exits; killed (and reaped) if it outlives `timeout`,
    so no test leaves it running. Its exit status is then process.returncode."""
    try:
        return process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def live_processes() -> Iterator[tuple[int, list[str]]]:
    """(pid, the fields of /proc/<pid>/stat after the command name) of every process
    that is not a zombie: fields[0] is the state, [1] the parent, [2] the process
    group, [3] the session."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended meanwhile
        if fields[0] != "Z":
            yield int(entry), fields
