"""A real, private `systemd --user` manager for tests: the units run as users run them.

The manager gets what a login session would give it, without touching the host's:
- its own mount namespace (`unshare --mount`), where a tmpfs on /run/systemd (with
  /run/systemd/system in it) tells systemd it may act as a service manager;
- its own HOME and XDG_RUNTIME_DIR (0700) under the test's temp folder, so units,
  settings and spools land there, never in the real home;
- its own cgroup, a fresh child of ours in every hierarchy systemd tracks processes
  in. Started in the host's root cgroup, a manager would move every process on the
  host into its init.scope, and two of them would share app.slice; here it owns a
  subtree, which also finds every process it started, for the cleanup.
Commands run inside the namespace through nsenter. `stop()` ends it all by PID.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

TOOLS = ("systemd", "systemctl", "systemd-analyze", "unshare", "nsenter")

# Run inside the new mount namespace, as root: join the cgroups, fake a booted
# /run/systemd in this namespace only, then become the user manager.
_START = r"""
set -eu
for cgroup in "$@"; do echo $$ > "$cgroup/cgroup.procs"; done
mkdir -p /run/systemd
mount -t tmpfs -o mode=0755 agent-bus-test /run/systemd
mkdir /run/systemd/system
exec systemd --user
"""


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def _cgroup_parents() -> list[Path]:
    """The folder of our own cgroup in each hierarchy systemd uses for processes:
    the cgroup2 one, and on a hybrid v1 host also name=systemd."""
    mounts = {}
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        for line in handle:
            fields = line.split()
            fstype, super_options = fields[fields.index("-") + 1], fields[-1]
            if fstype == "cgroup2":
                mounts.setdefault("unified", fields[4])
            elif fstype == "cgroup" and "name=systemd" in super_options.split(","):
                mounts.setdefault("name=systemd", fields[4])
    parents = []
    with open("/proc/self/cgroup", encoding="utf-8") as handle:
        for line in handle:
            number, controllers, path = line.rstrip("\n").split(":", 2)
            key = "unified" if number == "0" else controllers
            if key in mounts:
                parents.append(Path(mounts[key] + path))
    if not parents:
        raise RuntimeError("no cgroup2 or name=systemd hierarchy is mounted; a systemd "
                           "user manager cannot run here")
    return parents


class UserManager:
    def __init__(self, home: Path):
        self.home = Path(home)
        self.runtime_dir = ""
        self.proc: subprocess.Popen | None = None
        self.cgroups: list[Path] = []
        self.log_path = self.home.parent / "systemd-user.log"

    # -- lifecycle -----------------------------------------------------------

    def start(self, timeout: float = 20.0) -> "UserManager":
        self.home.mkdir(parents=True, exist_ok=True)
        # Short and private: sockets under it must fit in 108 bytes.
        self.runtime_dir = tempfile.mkdtemp(prefix="agent-bus-run-")
        os.chmod(self.runtime_dir, 0o700)
        name = f"agent-bus-test-{os.getpid()}-{secrets.token_hex(4)}"
        for parent in _cgroup_parents():
            cgroup = parent / name
            cgroup.mkdir()
            self.cgroups.append(cgroup)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private",
                 "sh", "-c", _START, "sh", *map(str, self.cgroups)],
                env=self.env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd --user exited with {self.proc.returncode}: "
                                   + self.log_path.read_text(errors="replace"))
            state = self.systemctl("is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"systemd --user not up after {timeout}s (state {state!r})")
            time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> None:
        """End the manager (SIGTERM: it stops its units first), then anything left in
        its cgroups, by PID, and remove the cgroups and the runtime folder."""
        try:
            if self.proc is not None:
                if self.proc.poll() is None:
                    self.proc.send_signal(signal.SIGTERM)
                    try:
                        self.proc.wait(timeout)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait(10)
                self.proc = None
            self._empty_cgroups()
        finally:
            if self.runtime_dir:
                shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def _empty_cgroups(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for top in self.cgroups:
            while top.exists():
                folders = sorted((p for p in top.rglob("*") if p.is_dir()),
                                 key=lambda p: len(p.parts), reverse=True) + [top]
                for folder in folders:
                    for pid in self._pids(folder):
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    try:
                        folder.rmdir()
                    except OSError:
                        pass  # processes still dying, or a child not removed yet
                if top.exists():
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"cannot empty {top}: {self._pids(top)}")
                    time.sleep(0.05)
        self.cgroups = []

    @staticmethod
    def _pids(folder: Path) -> list[int]:
        try:
            return [int(pid) for pid in (folder / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def __enter__(self) -> "UserManager":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- commands inside the namespace -------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        """A login-like environment for this user: HOME and XDG_RUNTIME_DIR are ours,
        and nothing of the caller's agent-bus or XDG settings leaks in."""
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("AGENT_BUS_", "XDG_", "DBUS_", "NOTIFY_", "WATCHDOG_",
                                      "SYSTEMD_", "INVOCATION_ID", "JOURNAL_STREAM"))
               and key not in ("AGENT_NAME", "PYTHONPATH")}
        env.update(HOME=str(self.home), XDG_RUNTIME_DIR=self.runtime_dir,
                   PATH=f"{self.home}/.local/bin:{os.environ.get('PATH', '/usr/bin:/bin')}")
        env.update(extra)
        return env

    def run(self, *command: str, check: bool = True, timeout: float = 60.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        assert self.proc is not None and self.proc.poll() is None, "the manager is not running"
        result = subprocess.run(["nsenter", f"--target={self.proc.pid}", "--mount", "--",
                                 *command], env=env or self.env(), capture_output=True,
                                text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {result.returncode}:\n"
                                 f"{result.stdout}{result.stderr}")
        return result

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("systemctl", "--user", "--no-pager", *args, check=check)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_for(self, unit: str, timeout: float = 20.0, **expected: str) -> dict[str, str]:
        """Poll the unit's properties until each equals its expected value."""
        deadline = time.monotonic() + timeout
        while True:
            props = self.show(unit, *expected)
            if all(props.get(key) == value for key, value in expected.items()):
                return props
            if time.monotonic() > deadline:
                raise AssertionError(f"{unit}: wanted {expected}, have {props} after "
                                     f"{timeout}s")
            time.sleep(0.05)
