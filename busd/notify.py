"""sd_notify: tell a service manager we are ready, and alive, if one is listening.

The protocol is one datagram of `KEY=value` lines to the unix socket named in
$NOTIFY_SOCKET (a leading '@' means the abstract namespace); it is small enough
to speak here without a dependency. With no socket configured every call is a
no-op, so the daemon runs the same in a terminal.
"""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("busd.notify")


class Notifier:
    def __init__(self, socket_path: str = "", watchdog_usec: str = "", watchdog_pid: str = ""):
        self.address = self._address(socket_path)
        self.watchdog_interval = self._interval(watchdog_usec, watchdog_pid)
        self._socket: socket.socket | None = None

    @staticmethod
    def _address(path: str) -> str | bytes | None:
        if not path:
            return None
        if path.startswith("@"):
            return b"\0" + path[1:].encode()
        if path.startswith("/"):
            return path
        log.warning("NOTIFY_SOCKET=%r is neither a path nor @abstract; not notifying", path)
        return None

    @staticmethod
    def _interval(usec: str, pid: str) -> float | None:
        """Half the watchdog timeout, as systemd advises; None when no watchdog is asked for."""
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            value = int(usec)
        except ValueError:
            log.warning("WATCHDOG_USEC=%r is not a number of microseconds; not pinging", usec)
            return None
        return value / 2e6 if value > 0 else None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        if self.address is None:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto("\n".join(assignments).encode(), self.address)
            return True
        except OSError as exc:
            log.warning("cannot notify the service manager at %r: %s", self.address, exc)
            return False

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=stopping")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
