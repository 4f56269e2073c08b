"""A real headless Chromium for tests, driven over the DevTools protocol.

Debian's chromium, started by us with --remote-debugging-pipe: the protocol's JSON
messages (NUL-terminated) go over two pipes, so nothing listens on a port and no
library is needed. Everything is synchronous: a command is written and its answer
read back, and the events that arrive meanwhile are kept for `wait_for_event`.
Chromium runs in a session of its own, so `close` ends its whole process tree
(zygotes, renderers, GPU and network services) by that session's id.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any

from .processes import live_processes

# What keeps a headless Chromium on this machine: no sandbox (we run as root in CI),
# no GPU, and none of the background connections it makes on its own (there is no
# internet here: each would be a blocked connection and a delay).
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--no-default-browser-check", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
    "--disable-extensions", "--disable-default-apps", "--disable-domain-reliability",
    "--metrics-recording-only", "--password-store=basic", "--use-mock-keychain",
    "--mute-audio", "--remote-debugging-pipe",
)
# Debian's /usr/bin/chromium is a shell launcher; the program it runs takes our pipes.
CANDIDATES = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    for candidate in CANDIDATES:
        path = candidate if os.path.isabs(candidate) else shutil.which(candidate)
        if path and os.access(path, os.X_OK):
            return path
    return None


class BrowserError(Exception):
    """The browser answered a command with an error, went away, or did not answer in time."""


class Browser:
    """One Chromium with one page (tab); `evaluate` runs JavaScript in it."""

    def __init__(self, width: int = 1280, height: int = 800):
        self.width, self.height = width, height
        self.proc: subprocess.Popen | None = None
        self.profile: str | None = None
        self.session: str | None = None
        self.events: list[dict] = []
        self._to_browser = self._from_browser = -1
        self._buffer = b""
        self._next_id = 0

    # -- lifecycle -------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> "Browser":
        program = find_chromium()
        if program is None:
            raise BrowserError("no Chromium here; ./install.sh --dev installs Debian's chromium")
        self.profile = tempfile.mkdtemp(prefix="agent-bus-chromium-")
        # Our ends stay here; Chromium reads commands on its fd 3 and writes on its fd 4.
        their_in, ours_out = os.pipe()
        ours_in, their_out = os.pipe()
        # Moved above 9 first, so the shell's `3<&N 4>&M` cannot clobber one with the other.
        high_in = fcntl.fcntl(their_in, fcntl.F_DUPFD_CLOEXEC, 10)
        high_out = fcntl.fcntl(their_out, fcntl.F_DUPFD_CLOEXEC, 10)
        for fd in (their_in, their_out):
            os.close(fd)
        command = [program, *FLAGS, f"--user-data-dir={self.profile}",
                   f"--window-size={self.width},{self.height}", "about:blank"]
        try:
            # bash execs Chromium in its place (same pid) with the pipes on fds 3 and 4.
            self.proc = subprocess.Popen(
                ["bash", "-c", f'exec "$@" 3<&{high_in} 4>&{high_out} {high_in}<&- {high_out}>&-',
                 "chromium", *command],
                pass_fds=(high_in, high_out), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        finally:
            os.close(high_in)
            os.close(high_out)
        self._to_browser, self._from_browser = ours_out, ours_in
        try:
            self.call("Browser.getVersion", timeout=timeout)
            target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            self.session = self.call("Target.attachToTarget",
                                     {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime"):
                self.call(f"{domain}.enable", session=True)
            self.call("Emulation.setDeviceMetricsOverride",
                      {"width": self.width, "height": self.height, "deviceScaleFactor": 1,
                       "mobile": False}, session=True)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Ask Chromium to quit, then end whatever of its process tree is left; waits."""
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    self.call("Browser.close", timeout=5)
                except BrowserError:
                    pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
            _kill_session(self.proc.pid)
            self.proc.wait(10)
            self.proc = None
        for fd in (self._to_browser, self._from_browser):
            if fd >= 0:
                os.close(fd)
        self._to_browser = self._from_browser = -1
        if self.profile is not None:
            shutil.rmtree(self.profile, ignore_errors=True)
            self.profile = None

    def __enter__(self) -> "Browser":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the protocol ----------------------------------------------------------

    def send(self, method: str, params: dict | None = None, session: bool = False) -> int:
        """Write a command; its id, for `result`."""
        self._next_id += 1
        command: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            command["sessionId"] = self.session
        data = json.dumps(command).encode("utf-8") + b"\0"
        try:
            while data:
                data = data[os.write(self._to_browser, data):]
        except OSError as exc:
            raise BrowserError(f"Chromium is gone ({exc}); cannot send {method}") from None
        return self._next_id

    def result(self, command_id: int, timeout: float = 15.0) -> dict:
        """The answer to command `command_id`; events read meanwhile are kept."""
        deadline = time.monotonic() + timeout
        while True:
            message = self._read(deadline, f"the answer to command {command_id}")
            if message.get("id") == command_id:
                if "error" in message:
                    raise BrowserError(f"command {command_id}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def call(self, method: str, params: dict | None = None, session: bool = False,
             timeout: float = 15.0) -> dict:
        return self.result(self.send(method, params, session), timeout)

    def wait_for_event(self, method: str, timeout: float = 15.0) -> dict:
        """The first kept or arriving event named `method` (removed from the kept ones)."""
        deadline = time.monotonic() + timeout
        while True:
            for index, event in enumerate(self.events):
                if event["method"] == method:
                    return self.events.pop(index)
            message = self._read(deadline, f"the event {method}")
            if "method" in message:
                self.events.append(message)

    def _read(self, deadline: float, what: str) -> dict:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self._from_browser], [], [], max(0.0, remaining))
            if not ready:
                raise BrowserError(f"no {what} from Chromium in time")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise BrowserError(f"Chromium closed its pipe while we waited for {what}")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    # -- the page ------------------------------------------------------------------

    def navigate(self, url: str, timeout: float = 15.0) -> None:
        """Open `url` in the page and return once its load event fired."""
        self.events = [e for e in self.events if e["method"] != "Page.loadEventFired"]
        answer = self.call("Page.navigate", {"url": url}, session=True, timeout=timeout)
        if answer.get("errorText"):
            raise BrowserError(f"cannot open {url}: {answer['errorText']}")
        self.wait_for_event("Page.loadEventFired", timeout)

    def evaluate(self, expression: str, timeout: float = 15.0) -> Any:
        """Run JavaScript in the page; its value (a promise is awaited)."""
        return self._value(self.call("Runtime.evaluate", _evaluation(expression),
                                     session=True, timeout=timeout))

    def evaluate_later(self, expression: str) -> int:
        """Start JavaScript (typically a promise that waits for something) without waiting
        for it; `value_of` collects its value."""
        return self.send("Runtime.evaluate", _evaluation(expression), session=True)

    def value_of(self, command_id: int, timeout: float = 15.0) -> Any:
        return self._value(self.result(command_id, timeout))

    @staticmethod
    def _value(answer: dict) -> Any:
        if "exceptionDetails" in answer:
            details = answer["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"the page's JavaScript failed: {text}")
        return answer["result"].get("value")

    def screenshot(self, path: str) -> None:
        data = self.call("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
        with open(path, "wb") as handle:
            handle.write(base64.b64decode(data))

    def dialogs(self) -> list[dict]:
        """alert/confirm/prompt dialogs the page opened (none should, ever)."""
        return [e for e in self.events if e["method"] == "Page.javascriptDialogOpening"]


def _evaluation(expression: str) -> dict:
    return {"expression": expression, "awaitPromise": True, "returnByValue": True}


def wait_in_page(condition: str, timeout_ms: int) -> str:
    """JavaScript: a promise that resolves true as soon as `condition` (an expression)
    holds -- re-checked on every change to the page, not on a timer -- or false once
    `timeout_ms` passed."""
    return f"""new Promise((resolve) => {{
        const holds = () => {{ try {{ return Boolean({condition}); }} catch (e) {{ return false; }} }};
        if (holds()) return resolve(true);
        const observer = new MutationObserver(() => {{
            if (holds()) {{ observer.disconnect(); resolve(true); }}
        }});
        observer.observe(document, {{subtree: true, childList: true, characterData: true,
                                     attributes: true}});
        setTimeout(() => {{ observer.disconnect(); resolve(holds()); }}, {int(timeout_ms)});
    }})"""


def session_processes(sid: int) -> list[int]:
    """Pids of the live processes in session `sid` (zombies are already dead)."""
    return [pid for pid, fields in live_processes() if int(fields[3]) == sid]


def _kill_session(sid: int, timeout: float = 10.0) -> None:
    """SIGKILL every process of Chromium's session (it leads it: sid = its pid), and wait
    until none is left."""
    deadline = time.monotonic() + timeout
    while True:
        pids = session_processes(sid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise BrowserError(f"Chromium's processes {pids} outlived SIGKILL")
        time.sleep(0.05)
