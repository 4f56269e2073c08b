"""The systemd units and their setup, run for real: install.sh, `agent-bus init`, and a
private `systemd --user` manager (harness/systemd.py) running the bus server and
two agents' daemons exactly as `systemctl --user enable --now` runs them for a user."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.agents import AgentProcess, count_blocks
from harness.bus import REPO, BusServer, agent_bus_cmd, repo_env, wait_until
from harness.systemd import UserManager, missing_tools

USER_UNITS = ("agent-bus@.service", "agent-bus.target", "agent-bus-server.service")
SYSTEM_UNIT = "agent-bus-server.system.service"

needs_systemd = pytest.mark.skipif(
    bool(missing_tools()), reason=f"needs {', '.join(missing_tools())} (systemd, util-linux)")
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="starting a private user manager needs root (a mount "
                              "namespace and a cgroup of its own); CI runs as root")


def make_venv(folder: Path) -> Path:
    """A stand-in for an installed environment: bin/agent-bus running this checkout with
    this interpreter (whose environment has the dependencies). install.sh takes it via
    AGENT_BUS_VENV, so no test installs anything with pip."""
    script = folder / "venv" / "bin" / "agent-bus"
    script.parent.mkdir(parents=True)
    script.write_text(f"#!{sys.executable}\n"
                      "import sys\n"
                      f"sys.path.insert(0, {str(REPO)!r})\n"
                      "from busd.cli import main\n"
                      "sys.exit(main())\n")
    script.chmod(0o755)
    return script.parent.parent


def install(home: Path, venv: Path, *args: str, manager: UserManager | None = None,
            **env: str) -> subprocess.CompletedProcess:
    command = [str(REPO / "install.sh"), *args]
    if manager is not None:
        return manager.run(*command, env=manager.env(AGENT_BUS_VENV=str(venv), **env))
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("AGENT_BUS_", "XDG_", "DBUS_"))}
    environ.update(HOME=str(home), AGENT_BUS_VENV=str(venv), **env)
    result = subprocess.run(command, env=environ, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- 1. every unit file passes systemd-analyze verify ----------------------------------

@needs_systemd
def test_every_unit_file_passes_systemd_analyze_verify(tmp_path):
    home = tmp_path / "home"
    venv = make_venv(tmp_path)
    install(home, venv)
    unit_dir = home / ".config" / "systemd" / "user"
    agent_bus = str(venv / "bin" / "agent-bus")
    for unit in USER_UNITS:
        text = (unit_dir / unit).read_text()
        assert "@AGENT_BUS@" not in "".join(re.findall(r"^ExecStart=.*$", text, re.M))
    assert f"ExecStart={agent_bus} agent %i\n" in (unit_dir / "agent-bus@.service").read_text()

    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = dict(os.environ, HOME=str(home), XDG_RUNTIME_DIR=str(runtime))
    env.pop("XDG_CONFIG_HOME", None)
    # A template is checked through an instance of it.
    user = subprocess.run(["systemd-analyze", "--user", "verify", "--man=no",
                           str(unit_dir / "agent-bus@spark.service"),
                           str(unit_dir / "agent-bus.target"),
                           str(unit_dir / "agent-bus-server.service")],
                          env=env, capture_output=True, text=True, timeout=60)
    # verify exits 0 even for unknown keys and bad values: any output is a failure.
    assert (user.returncode, user.stdout + user.stderr) == (0, "")

    # The system variant, installed by hand as agent-bus-server.service.
    system_dir = tmp_path / "system"
    system_dir.mkdir()
    text = (REPO / "systemd" / SYSTEM_UNIT).read_text()
    (system_dir / "agent-bus-server.service").write_text(
        text.replace("ExecStart=@AGENT_BUS@", f"ExecStart={agent_bus}"))
    system = subprocess.run(["systemd-analyze", "verify", "--man=no",
                             str(system_dir / "agent-bus-server.service")],
                            capture_output=True, text=True, timeout=60)
    assert (system.returncode, system.stdout + system.stderr) == (0, "")


def test_every_directive_in_the_units_says_why():
    """A comment line right above each directive (as syncthing's units do)."""
    for unit in (*USER_UNITS, SYSTEM_UNIT):
        lines = (REPO / "systemd" / unit).read_text().splitlines()
        for number, line in enumerate(lines):
            if re.match(r"[A-Za-z]+=", line) and not line.startswith(("Description=",)):
                above = lines[number - 1]
                assert above.startswith("#") or re.match(r"[A-Za-z]+=", above), \
                    f"{unit}:{number + 1}: {line!r} has no reason above it"


# -- agent-bus init and install.sh, no manager needed ---------------------------------

def run_init(home: Path, *args: str, stdin: str = "", **env: str):
    environ = {k: v for k, v in repo_env().items()
               if not k.startswith(("AGENT_BUS_", "XDG_"))}
    environ.update(HOME=str(home), **env)
    return subprocess.run(agent_bus_cmd("init", *args), input=stdin, env=environ,
                          capture_output=True, text=True, timeout=60)


def read_settings(path: Path) -> dict[str, str]:
    """The file read back by sh, as a user sourcing it would (`set -a; . FILE`)."""
    out = subprocess.run(["sh", "-c", 'set -a; . "$1"; env', "sh", str(path)],
                         env={"PATH": os.environ["PATH"]}, capture_output=True, text=True,
                         check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines()
                if line.startswith(("AGENT_NAME=", "AGENT_BUS_")))


def test_init_writes_a_private_settings_file_and_the_spool_folder(tmp_path):
    home = tmp_path / "home"
    result = run_init(home, "spark", "--url", "http://127.0.0.1:9999/", "--channel", "*",
                      "--token", "-", stdin="tok-123\n")
    assert result.returncode == 0, result.stderr
    settings = home / ".config" / "agent-bus" / "spark.env"
    assert stat.S_IMODE(settings.stat().st_mode) == 0o600
    spool = home / ".local" / "state" / "agent-bus"
    assert read_settings(settings) == {
        "AGENT_NAME": "spark", "AGENT_BUS_URL": "http://127.0.0.1:9999",
        "AGENT_BUS_CHANNEL": "*", "AGENT_BUS_SPOOL": str(spool),
        "AGENT_BUS_TOKEN": "tok-123"}
    for folder in ("", "outbox", "inbox", "sent", "failed", "claimed"):
        assert stat.S_IMODE((spool / "spark" / folder).stat().st_mode) == 0o700, folder
    assert "systemctl --user enable --now agent-bus@spark" in result.stdout
    assert not [p for p in settings.parent.iterdir() if p.name.startswith(".")]


def test_init_never_replaces_settings_silently(tmp_path):
    home = tmp_path / "home"
    assert run_init(home, "dell", "--url", "http://127.0.0.1:1").returncode == 0
    settings = home / ".config" / "agent-bus" / "dell.env"
    before = settings.read_text()
    again = run_init(home, "dell", "--url", "http://127.0.0.1:2")
    assert again.returncode == 1
    assert "already exists" in again.stderr and "--force" in again.stderr
    assert settings.read_text() == before
    forced = run_init(home, "dell", "--url", "http://127.0.0.1:2", "--force")
    assert forced.returncode == 0, forced.stderr
    assert read_settings(settings)["AGENT_BUS_URL"] == "http://127.0.0.1:2"
    assert stat.S_IMODE(settings.stat().st_mode) == 0o600


@pytest.mark.parametrize("args, message", [
    (("bad name",), "invalid agent name"),
    (("spark", "--url", "127.0.0.1:9876"), "not an http:// or https:// address"),
    (("spark", "--channel", "a b"), "invalid channel"),
])
def test_init_refuses_bad_values_as_usage_errors(tmp_path, args, message):
    result = run_init(tmp_path / "home", *args)
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "home" / ".config" / "agent-bus").exists() or \
        not list((tmp_path / "home" / ".config" / "agent-bus").iterdir())


def test_init_writes_the_shared_folders_and_the_daemon_checks_handoffs_under_them(tmp_path):
    home, shared, later = tmp_path / "home", tmp_path / "shared files", tmp_path / "not yet"
    shared.mkdir()
    refused = run_init(home, "dell", "--shared", "/a:b")
    assert refused.returncode == 2 and "holds a ':'" in refused.stderr
    result = run_init(home, "dell", "--url", "http://127.0.0.1:9", "--shared", str(shared),
                      str(later), str(shared) + "/")
    assert result.returncode == 0, result.stderr
    assert f"{later} is not a folder here (yet)" in result.stderr
    settings = read_settings(home / ".config" / "agent-bus" / "dell.env")
    assert settings["AGENT_BUS_SHARED"] == f"{shared}:{later}"

    hits = shared / "hits.csv"
    hits.write_bytes(b"a,1\n")
    with BusServer(tmp_path / "bus.db") as bus:
        with AgentProcess("dell", tmp_path / "spool", bus.url,
                          AGENT_BUS_SHARED=settings["AGENT_BUS_SHARED"]) as dell:
            dell.wait_for_log(f"handoffs are checked under: {shared}, {later}")
            sent = subprocess.run(agent_bus_cmd("handoff", "--to", "dell", str(hits)),
                                  env=repo_env(AGENT_BUS_URL=bus.url, AGENT_NAME="spark"),
                                  capture_output=True, timeout=60)
            assert sent.returncode == 0, sent.stderr
            message_id = json.loads(sent.stdout)["id"]
            assert wait_until(lambda: bus.get(f"/status?id={message_id}").json()["messages"][0]
                              .get("handoff"), what="the check") == {"dell": "verified"}
            assert dell.stop() == 0
        assert bus.stop() == 0


def test_install_without_a_user_manager_says_so_and_what_to_run(tmp_path):
    home = tmp_path / "home"
    venv = make_venv(tmp_path)
    first = install(home, venv, "--agent", "spark")
    assert "no systemd user manager is reachable" in first.stdout
    assert "systemctl --user daemon-reload" in first.stdout
    assert (home / ".config" / "agent-bus" / "spark.env").exists()
    # Again: idempotent, and the settings are kept, saying so.
    (home / ".config" / "agent-bus" / "spark.env").write_text("# mine\n")
    again = install(home, venv, "--agent", "spark")
    assert "keeping" in again.stdout
    assert (home / ".config" / "agent-bus" / "spark.env").read_text() == "# mine\n"
    unit_dir = home / ".config" / "systemd" / "user"
    assert sorted(p.name for p in unit_dir.iterdir()) == sorted(USER_UNITS)
    # Uninstall takes the units, keeps settings and the environment it did not make.
    install(home, venv, "--uninstall")
    assert list(unit_dir.iterdir()) == []
    assert (home / ".config" / "agent-bus" / "spark.env").exists()
    assert (venv / "bin" / "agent-bus").exists()
    assert not (home / ".local" / "bin" / "agent-bus").exists()


# -- 2-5. a real user manager running the server and two agents ----------------------

class BusHost:
    """One machine's user: installed with install.sh, server and agents enabled."""

    def __init__(self, manager: UserManager, venv: Path, port: int):
        self.manager = manager
        self.venv = venv
        self.home = manager.home
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.spool = self.home / ".local" / "state" / "agent-bus"
        self.units = self.home / ".config" / "systemd" / "user"
        self.logs = self.home / "logs"

    def main_pid(self, unit: str) -> int:
        return int(self.manager.show(unit, "MainPID")["MainPID"])

    def drop(self, sender: str, to: str, name: str, body: str) -> None:
        """`echo body > outbox/<to>/<name>`, as the README does it."""
        folder = self.spool / sender / "outbox" / to
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(body)

    def inbox_log(self, name: str) -> str:
        try:
            return (self.spool / name / "inbox.log").read_text()
        except FileNotFoundError:
            return ""

    def log(self, unit: str) -> str:
        try:
            return (self.logs / f"{unit}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def diagnostics(self) -> str:
        """Every unit's output, for a failing assertion's message."""
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}"
                         for log in sorted(self.logs.glob("*.log")))

    def wait_for_inbox(self, name: str, text: str, timeout: float = 20.0) -> None:
        try:
            wait_until(lambda: text in self.inbox_log(name), timeout, interval=0.05,
                       what=f"{text!r} in {name}'s inbox.log")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.diagnostics()}") from None


@pytest.fixture(scope="module")
def bus_host(tmp_path_factory):
    if missing_tools():
        pytest.skip(f"needs {', '.join(missing_tools())}")
    if os.geteuid() != 0:
        pytest.skip("starting a private user manager needs root; CI runs as root")
    folder = tmp_path_factory.mktemp("systemd")
    venv = make_venv(folder)
    with UserManager(folder / "home") as manager:
        host = BusHost(manager, venv, free_port())
        config = host.home / ".config" / "agent-bus"
        config.mkdir(parents=True)
        # No journald here: each unit's output goes to a file (a drop-in, as a user
        # would add one), which failing tests print.
        host.logs.mkdir()
        for unit in ("agent-bus@.service", "agent-bus-server.service"):
            dropin = host.units / f"{unit}.d"
            dropin.mkdir(parents=True)
            (dropin / "test-logs.conf").write_text(
                f"[Service]\nStandardOutput=append:{host.logs}/%n.log\n"
                f"StandardError=append:{host.logs}/%n.log\n")
        (config / "server.env").write_text(f"AGENT_BUS_SERVE_ARGS=--port {host.port}\n")
        # Channel '*' (all channels) is quoted in the settings file: systemd must read
        # it back as it is.
        installed = install(host.home, venv, "--agent", "spark", "--agent", "dell",
                            manager=manager, AGENT_BUS_URL=host.url, AGENT_BUS_CHANNEL="*")
        assert "loaded" in installed.stdout, installed.stdout
        # spark signs its sends and names the bus by host name: the hardened unit must
        # allow both (cryptography under MemoryDenyWriteExecute, getaddrinfo).
        key = manager.run(str(venv / "bin" / "agent-bus"), "keygen", "--out",
                          str(config / "spark"))
        assert key.returncode == 0
        with open(config / "spark.env", "a") as settings:
            settings.write(f"AGENT_BUS_KEY={config / 'spark.key'}\n")
        settings_text = (config / "spark.env").read_text()
        (config / "spark.env").write_text(
            settings_text.replace(host.url, host.url.replace("127.0.0.1", "localhost")))
        yield host


@needs_systemd
@needs_root
def test_enable_now_starts_the_server_and_agents_and_a_drop_is_delivered(bus_host):
    manager = bus_host.manager
    manager.systemctl("enable", "--now", "agent-bus-server", "agent-bus@spark",
                      "agent-bus@dell")
    active = manager.systemctl("is-active", "agent-bus-server", "agent-bus@spark",
                               "agent-bus@dell", check=False)
    assert active.stdout.split() == ["active"] * 3, bus_host.diagnostics()
    # Enabled for every login: the agents through agent-bus.target (Also=).
    enabled = manager.systemctl("is-enabled", "agent-bus-server", "agent-bus@spark",
                                "agent-bus@dell", "agent-bus.target")
    assert enabled.stdout.split() == ["enabled"] * 4
    # Type=notify: each told systemd what it serves.
    status = manager.show("agent-bus-server", "StatusText")["StatusText"]
    assert status == f"listening on {bus_host.url}"
    status = manager.show("agent-bus@dell", "StatusText")["StatusText"]
    assert status == (f"serving {bus_host.spool}/dell <-> {bus_host.url} (channel *)")
    assert (bus_host.spool / "bus.db").exists()

    bus_host.drop("spark", "dell", "t1", "T1 verify done\n")
    bus_host.wait_for_inbox("dell", "T1 verify done")
    assert re.search(r"^\[\d\d:\d\d:\d\dZ\] from spark:\nT1 verify done\n\n---\n",
                     bus_host.inbox_log("dell"), re.M)


@needs_systemd
@needs_root
def test_a_killed_daemon_is_restarted_and_a_file_dropped_meanwhile_goes_once(bus_host):
    manager = bus_host.manager
    pid = bus_host.main_pid("agent-bus@spark")
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not os.path.exists(f"/proc/{pid}"), timeout=10,
               what="systemd to reap the killed daemon")
    bus_host.drop("spark", "dell", "while-down", "dropped while spark was down\n")
    dropped_at = time.monotonic()  # systemd's ...Monotonic timestamps use this clock
    manager.wait_for("agent-bus@spark", ActiveState="active", SubState="running",
                     timeout=20)
    props = manager.show("agent-bus@spark", "MainPID", "NRestarts",
                         "ExecMainStartTimestampMonotonic")
    assert int(props["MainPID"]) != pid and props["NRestarts"] == "1"
    assert int(props["ExecMainStartTimestampMonotonic"]) / 1e6 > dropped_at

    bus_host.wait_for_inbox("dell", "dropped while spark was down")
    claimed = bus_host.spool / "spark" / "claimed"
    wait_until(lambda: not [p for p in claimed.rglob("*") if p.is_file()],
               what="spark's claimed/ to empty")
    # Spark has nothing left to send: a duplicate would reach the bus, and dell's
    # inbox.log, before a message dropped now, so once that one is filed any
    # duplicate would show.
    bus_host.drop("spark", "dell", "marker", "filed after the restart\n")
    bus_host.wait_for_inbox("dell", "filed after the restart")
    log = bus_host.inbox_log("dell")
    assert log.count("dropped while spark was down") == 1
    assert count_blocks(log) == 3
    sent = [p.name for p in (bus_host.spool / "spark" / "sent").iterdir()]
    assert len([name for name in sent if name.endswith("-dell-while-down")]) == 1


@needs_systemd
@needs_root
def test_a_frozen_daemon_is_restarted_by_the_watchdog(bus_host):
    manager = bus_host.manager
    # A short watchdog for this test only, as a user would override it; the longer
    # RestartSec leaves time to see why it was restarted before it is. (dell, not spark:
    # each start counts against StartLimitBurst.)
    dropin = bus_host.units / "agent-bus@dell.service.d"
    dropin.mkdir(exist_ok=True)
    (dropin / "test-watchdog.conf").write_text("[Service]\nWatchdogSec=4\nRestartSec=5\n")
    manager.systemctl("daemon-reload")
    manager.systemctl("restart", "agent-bus@dell")
    assert manager.show("agent-bus@dell", "WatchdogUSec")["WatchdogUSec"] == "4s"
    restarts = int(manager.show("agent-bus@dell", "NRestarts")["NRestarts"])
    pid = bus_host.main_pid("agent-bus@dell")

    os.kill(pid, signal.SIGSTOP)  # alive, but silent: no more WATCHDOG=1
    frozen_at = time.monotonic()
    manager.wait_for("agent-bus@dell", Result="watchdog", SubState="auto-restart",
                     timeout=15)
    assert time.monotonic() - frozen_at >= 2  # not before the daemon went quiet
    manager.wait_for("agent-bus@dell", ActiveState="active", SubState="running", timeout=20)
    assert bus_host.main_pid("agent-bus@dell") != pid
    assert int(manager.show("agent-bus@dell", "NRestarts")["NRestarts"]) == restarts + 1
    # Killed with the watchdog's SIGABRT, Python printed where every thread was.
    assert "Fatal Python error: Aborted" in bus_host.log("agent-bus@dell.service")

    # And the restarted daemon works.
    bus_host.drop("dell", "spark", "after-watchdog", "dell is back\n")
    bus_host.wait_for_inbox("spark", "dell is back")


@needs_systemd
@needs_root
def test_running_again_restarts_the_running_units_on_the_new_program(bus_host):
    manager = bus_host.manager
    units = ("agent-bus-server.service", "agent-bus@dell.service", "agent-bus@spark.service")
    before = {unit: bus_host.main_pid(unit) for unit in units}
    again = install(bus_host.home, bus_host.venv, manager=manager)
    assert f"restarted on the new version: {' '.join(units)}" in again.stdout
    for unit in units:
        manager.wait_for(unit, ActiveState="active", SubState="running", timeout=20)
        assert bus_host.main_pid(unit) != before[unit], unit
    bus_host.drop("spark", "dell", "after-upgrade", "upgraded\n")
    bus_host.wait_for_inbox("dell", "upgraded")


@needs_systemd
@needs_root
def test_stopping_the_target_stops_every_agent_cleanly(bus_host):
    manager = bus_host.manager
    manager.systemctl("stop", "agent-bus.target")
    # Returns only when the agents are down (they are ordered after the target).
    for agent in ("agent-bus@spark", "agent-bus@dell"):
        props = manager.show(agent, "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
        assert props == {"ActiveState": "inactive", "Result": "success",
                         "ExecMainCode": "1", "ExecMainStatus": "0"}, agent  # 1: CLD_EXITED
    assert manager.systemctl("list-units", "--failed", "--plain", "--no-legend").stdout == ""
    assert manager.systemctl("is-active", "agent-bus-server").stdout.strip() == "active"
    # And the target brings them back together.
    manager.systemctl("start", "agent-bus.target")
    for agent in ("agent-bus@spark", "agent-bus@dell"):
        manager.wait_for(agent, ActiveState="active", timeout=20)


@needs_systemd
@needs_root
def test_uninstall_stops_and_removes_the_units_and_keeps_the_data(bus_host):
    manager = bus_host.manager
    venv = bus_host.venv
    install(bus_host.home, venv, "--uninstall", manager=manager)
    for unit in ("agent-bus-server", "agent-bus@spark", "agent-bus@dell"):
        assert manager.systemctl("is-active", unit, check=False).stdout.strip() == "inactive"
    # (exit 1: nothing matches)
    assert manager.systemctl("list-unit-files", "agent-bus*", "--no-legend",
                             check=False).stdout == ""
    assert manager.systemctl("list-units", "--failed", "--plain", "--no-legend").stdout == ""
    assert not [p for p in bus_host.units.rglob("*")
                if p.name in USER_UNITS or p.is_symlink()]
    assert (bus_host.home / ".config" / "agent-bus" / "spark.env").exists()
    assert (bus_host.spool / "bus.db").exists()
    assert "upgraded" in bus_host.inbox_log("dell")
    assert (venv / "bin" / "agent-bus").exists()
