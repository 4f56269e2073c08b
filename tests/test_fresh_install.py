"""The README's run line on a fresh machine: a new HOME with nothing installed, and a PATH
without ~/.local/bin (a new user, a container, root). The line is read from README.md
and run as it stands; install.sh installs everything into that HOME (pip, from this
checkout), and the bus it starts must answer."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
from pathlib import Path

from harness.bus import REPO, BusServer

INSTALL_TIMEOUT = 600  # a whole install: a Python environment and every dependency


def readme_run_line() -> str:
    """The first line of README.md's first shell block: the run line."""
    match = re.search(r"^```sh\n(.+)$", (REPO / "README.md").read_text(encoding="utf-8"), re.M)
    assert match, "README.md has no ```sh block"
    return match.group(1)


def path_without_agent_bus(*bin_dirs: Path) -> str:
    """This PATH less `bin_dirs` and any folder that holds an agent-bus."""
    drop = {str(d) for d in bin_dirs}
    kept = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and d.rstrip("/") not in drop and shutil.which("agent-bus", path=d) is None]
    return os.pathsep.join(kept)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_tree(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def command_line(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def test_the_readme_run_line_works_in_a_fresh_home_whatever_path_holds(tmp_path, monkeypatch):
    line = readme_run_line()
    home = tmp_path / "home"
    home.mkdir()
    path = path_without_agent_bus(Path.home() / ".local" / "bin", home / ".local" / "bin")
    assert shutil.which("agent-bus", path=path) is None
    port = free_port()
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("AGENT_BUS_", "IPC_", "XDG_", "DBUS_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), PATH=path,
               # Keep pip's cache (HOME moved it): the install downloads only what is new.
               PIP_CACHE_DIR=os.environ.get("PIP_CACHE_DIR") or str(
                   Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pip"),
               # The bus serve starts takes its port from el-ipc's IPC_PORT: a free one here.
               IPC_PORT=str(port))
    monkeypatch.chdir(REPO)  # the line starts ./install.sh: it runs in a checkout
    bus = BusServer("", command=["sh", "-c", line], env=env)
    try:
        bus.start(timeout=INSTALL_TIMEOUT)
        assert bus.port == port
        health = bus.get("/healthz")
        assert health.status_code == 200 and health.json()["ok"] is True
        assert (home / ".local" / "share" / "agent-bus" / "venv" / "bin" / "agent-bus").exists()
        # Stop the server itself, by its PID (sh may or may not have exec'd it), as a
        # user's Ctrl-C or systemd would: it exits 0, and so does the line.
        [server] = [pid for pid in process_tree(bus.pid) if "serve" in command_line(pid)]
        os.kill(server, signal.SIGTERM)
        assert bus.proc.wait(30) == 0, "".join(bus.log)
        assert bus.stop() == 0
    finally:
        if bus.proc is not None and bus.proc.poll() is None:
            os.killpg(bus.pid, signal.SIGKILL)  # its own session: only what this test started
            bus.stop()
    shutil.rmtree(home)  # a whole Python environment; no need to keep it
