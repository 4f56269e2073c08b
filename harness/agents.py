"""Real agent daemons for tests and benchmarks: `agent-bus agent NAME` as child processes."""
from __future__ import annotations

import os
import re
import secrets
import subprocess
import threading
import time
from pathlib import Path

from busd.agent.inbox import parse_inbox_file
from busd.agent.spool import SpoolLayout
from .bus import agent_bus_cmd, repo_env
from .processes import Child


class AgentProcess(Child):
    """One agent's daemon; stdout (the Monitor blocks) and stderr (the log) are collected."""

    STOP_TIMEOUT = 20.0

    def __init__(self, name: str, spool: str | Path, url: str, *args: str, **env: str):
        super().__init__()
        self.name = name
        self.spool = str(spool)
        self.url = url
        self.args = list(args)
        self.env = env
        self.layout = SpoolLayout.for_agent(self.spool, name)
        self.log: list[str] = []
        self.stdout: list[str] = []
        self.changed = threading.Condition()

    def start(self, wait_ready: bool = True, timeout: float = 15.0) -> "AgentProcess":
        env = repo_env(AGENT_BUS_URL=self.url, AGENT_BUS_SPOOL=self.spool, **self.env)
        self.proc = subprocess.Popen(agent_bus_cmd("agent", self.name, *self.args),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                     start_new_session=True)
        seen = len(self.log)
        self._drains = [
            threading.Thread(target=self._drain, args=(self.proc.stdout, self.stdout),
                             name=f"agent-{self.name}-stdout", daemon=True),
            threading.Thread(target=self._drain, args=(self.proc.stderr, self.log),
                             name=f"agent-{self.name}-stderr", daemon=True),
        ]
        for drain in self._drains:
            drain.start()
        if wait_ready:
            try:
                self.wait_for_log(r": ready: ", timeout, since=seen)
            except AssertionError:
                self.kill()
                raise
        return self

    def _drain(self, pipe, lines: list[str]) -> None:
        for raw in pipe:
            with self.changed:
                lines.append(raw.decode("utf-8", "replace"))
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_for_log(self, pattern: str, timeout: float = 15.0, since: int = 0) -> str:
        """The first stderr line (from index `since`) matching `pattern`, waiting for it."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for line in self.log[since:]:
                    if regex.search(line):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{self.name}: no log line matching {pattern!r} "
                                         f"within {timeout}s; log:\n" + "".join(self.log[-40:]))
                self.changed.wait(remaining)

    def __enter__(self) -> "AgentProcess":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.kill()


def drop_atomically(layout: SpoolLayout, folder: str | None, name: str, data: bytes) -> str:
    """Write elsewhere in the spool, then rename into outbox/<folder>/: the recommended way."""
    target_dir = layout.outbox if folder is None else os.path.join(layout.outbox, folder)
    os.makedirs(target_dir, exist_ok=True)
    temp = os.path.join(layout.root, f".test-{secrets.token_hex(6)}.tmp")
    with open(temp, "wb") as handle:
        handle.write(data)
    target = os.path.join(target_dir, name)
    os.rename(temp, target)
    return target


def drop_in_place(layout: SpoolLayout, folder: str, name: str, data: bytes) -> str:
    """`echo ... > outbox/<folder>/<name>`: written where it lands, no rename."""
    target_dir = os.path.join(layout.outbox, folder)
    os.makedirs(target_dir, exist_ok=True)
    target = os.path.join(target_dir, name)
    with open(target, "wb") as handle:
        handle.write(data)
    return target


def inbox_files(layout: SpoolLayout) -> list[str]:
    try:
        return sorted(n for n in os.listdir(layout.inbox) if n.endswith(".msg"))
    except FileNotFoundError:
        return []


def inbox_messages(layout: SpoolLayout) -> list[tuple[dict, bytes]]:
    """(headers, body) of every inbox file, oldest first."""
    found = []
    for name in inbox_files(layout):
        with open(os.path.join(layout.inbox, name), "rb") as handle:
            found.append(parse_inbox_file(handle.read()))
    return sorted(found, key=lambda hb: float(hb[0]["ts"]))


def files_under(folder: str) -> list[str]:
    """Every file below `folder` (dotfiles left out), relative paths."""
    out = []
    for parent, _dirs, files in os.walk(folder):
        for name in files:
            if not name.startswith("."):
                out.append(os.path.relpath(os.path.join(parent, name), folder))
    return sorted(out)


def count_blocks(log_text: str) -> int:
    return len(re.findall(r"^\[\d\d:\d\d:\d\dZ\] from [^\n]*:\n", log_text, flags=re.M))
