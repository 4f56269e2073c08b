"""Real components for tests and benchmarks: a bus server process, waiting on events."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import requests

REPO = Path(__file__).resolve().parent.parent

# The PostgreSQL server the tests use (a maintenance database on it); each user of
# it gets a database of its own, made fresh and dropped after.
POSTGRES_URL = os.environ.get("AGENT_BUS_TEST_POSTGRES",
                              "postgresql://postgres@127.0.0.1:5432/postgres")


def repo_env(**extra: str) -> dict[str, str]:
    """The environment for a child process that must run this checkout's busd."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def agent_bus_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "busd", *args]


class BusServer:
    """`agent-bus serve` as a child process on loopback, on a real SQLite file or
    PostgreSQL database (`db` is what --db gets)."""

    LISTENING = re.compile(r"listening on (https?://\S+)")

    def __init__(self, db: str | Path, *extra_args: str, port: int = 0,
                 command: list[str] | None = None, env: dict[str, str] | None = None):
        """`command` and `env` replace the usual `agent-bus serve --port --db` and its
        environment (a test of how serve finds its settings, or of an installed copy)."""
        self.db = str(db)
        self.extra_args = list(extra_args)
        self.port = port
        self.command = command
        self.env = env
        self.url = ""
        self.proc: subprocess.Popen | None = None
        self.log: list[str] = []
        self._drain: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> "BusServer":
        cmd = self.command or agent_bus_cmd("serve", "--port", str(self.port), "--db", self.db,
                                            *self.extra_args)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env=self.env or repo_env(),
                                     start_new_session=True)
        started = threading.Event()

        def drain() -> None:
            for line in self.proc.stderr:
                self.log.append(line)
                match = self.LISTENING.search(line)
                if match and not started.is_set():
                    self.url = match.group(1)
                    started.set()
            started.set()

        self._drain = threading.Thread(target=drain, name="bus-server-stderr", daemon=True)
        self._drain.start()
        if not started.wait(timeout) or not self.url:
            self.kill()
            raise RuntimeError("bus server did not start:\n" + "".join(self.log))
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _reap(self, timeout: float) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        if self._drain is not None:
            self._drain.join(timeout)
        self.proc.stderr.close()
        self.proc = None
        return code

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, and the exit code."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        return self._reap(timeout)

    def kill(self) -> None:
        """kill -9, as a crash would."""
        if self.proc is None:
            return
        self.proc.kill()
        self._reap(10)

    def restart(self) -> "BusServer":
        self.stop()
        return self.start()

    def __enter__(self) -> "BusServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()

    # conveniences for tests --------------------------------------------------

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=kw.pop("timeout", 40), **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return requests.post(self.url + path, timeout=kw.pop("timeout", 40), **kw)

    def send(self, sender: str, to: str, msg: str, **fields) -> dict:
        response = self.post("/send", json={"from": sender, "to": to, "msg": msg, **fields})
        assert response.status_code == 200, response.text
        return response.json()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.01, what: str = "condition"):
    """Poll a cheap predicate until it holds; for outside state with no event to wait on."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class PostgresServer:
    """The tests' PostgreSQL: hands out fresh databases with unique names, drops them."""

    def __init__(self, url: str = POSTGRES_URL):
        import psycopg  # only the PostgreSQL tests need it
        self._psycopg = psycopg
        self.url = url
        self.prefix = f"agent_bus_test_{os.getpid()}_{int(time.time())}"
        self._count = 0

    def reachable(self) -> str | None:
        """None if it answers, else why not."""
        try:
            with self._psycopg.connect(self.url, connect_timeout=3):
                return None
        except self._psycopg.Error as exc:
            return str(exc).strip().splitlines()[0]

    def _admin(self, sql: str) -> None:
        with self._psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql)

    def create_database(self) -> str:
        """A new, empty database; returns its URL."""
        self._count += 1
        name = f"{self.prefix}_{self._count}"
        self._admin(f'CREATE DATABASE "{name}"')
        return urlsplit(self.url)._replace(path="/" + name).geturl()

    def drop_database(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def run_sql(self, url: str, sql: str, params: tuple = ()) -> list[tuple]:
        with self._psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            cursor = conn.execute(sql, params)
            return cursor.fetchall() if cursor.description else []


class SendBurst:
    """Sender threads posting as fast as they can until stopped or the server dies.

    `acked` holds the reply of every send the server acknowledged (200); a send whose
    connection broke was not acknowledged and is not counted. Used by the kill -9 tests.
    """

    def __init__(self, url_for_sender, to: str, senders: list[str], timeout: float = 5,
                 limit: int = 5000):
        self.acked: list[dict] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._hammer, name=f"burst-{sender}",
                                          args=(url_for_sender(sender), to, sender, timeout,
                                                limit))
                         for sender in senders]

    def _hammer(self, url: str, to: str, sender: str, timeout: float, limit: int) -> None:
        with requests.Session() as session:
            for i in range(limit):
                if self._stop.is_set():
                    return
                try:
                    reply = session.post(f"{url}/send", json={
                        "from": sender, "to": to, "msg": f"{sender}:{i}"}, timeout=timeout)
                except requests.RequestException:
                    return  # the server died under us: this one was not acknowledged
                if reply.status_code == 200:
                    with self._lock:
                        self.acked.append(reply.json())

    def start(self) -> "SendBurst":
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)


import pwd  # noqa: E402  (PrivatePostgres's own; kept beside it)
import shutil  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402


class PrivatePostgres:
    """A PostgreSQL of one test's own: initdb and pg_ctl in a temporary folder, on a free
    loopback port. For tests that stop and start a database: never the machine's.

    Run as root (as CI may), the server cannot run as root: the folder is given to the
    `postgres` user and its commands run as that user.
    """

    def __init__(self) -> None:
        self.bindir = self.find_bindir()
        if self.bindir is None:
            raise RuntimeError(self.problem())
        self.folder = Path(tempfile.mkdtemp(prefix="agent-bus-pg-"))
        self.data = self.folder / "data"
        self.port = 0
        self._account: tuple[int, int] | None = None
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            self._account = (account.pw_uid, account.pw_gid)
            os.chown(self.folder, *self._account)

    @staticmethod
    def find_bindir() -> Path | None:
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                          key=lambda path: int(path.parent.parent.name)
                          if path.parent.parent.name.isdigit() else 0)
        return versions[-1].parent if versions else None

    @classmethod
    def problem(cls) -> str | None:
        """None if one can be made here, else why not."""
        if cls.find_bindir() is None:
            return "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin (initdb)"
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                return "running as root, and there is no postgres user to run PostgreSQL as"
        return None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *command: str, timeout: float = 60) -> None:
        account = {} if self._account is None else {
            "user": self._account[0], "group": self._account[1], "extra_groups": []}
        done = subprocess.run([str(self.bindir / command[0]), *command[1:]], cwd=self.folder,
                              capture_output=True, text=True, timeout=timeout,
                              env={"PATH": os.environ.get("PATH", ""), "LC_ALL": "C"}, **account)
        if done.returncode != 0:
            raise RuntimeError(f"{command[0]} failed ({done.returncode}): "
                               f"{done.stderr.strip() or done.stdout.strip()}")

    def start(self) -> "PrivatePostgres":
        """Start it (made on the first start, on a port that stays the same after)."""
        if not self.data.exists():
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                      "-E", "UTF8", "--locale=C", "--no-sync")
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                self.port = probe.getsockname()[1]
        self._run("pg_ctl", "start", "-w", "-t", "30", "-D", str(self.data),
                  "-l", str(self.folder / "server.log"), "-o",
                  f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off")
        return self

    def stop(self) -> None:
        self._run("pg_ctl", "stop", "-w", "-t", "30", "-m", "fast", "-D", str(self.data))

    def remove(self) -> None:
        """Stop it if it runs, and delete its folder."""
        if (self.data / "postmaster.pid").exists():
            self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "PrivatePostgres":
        try:
            return self.start()
        except BaseException:
            self.remove()
            raise

    def __exit__(self, *exc) -> None:
        self.remove()


def parked(bus: BusServer) -> float:
    """How many long-polls are parked on this server right now (its own gauge)."""
    from prometheus_client.parser import text_string_to_metric_families
    for family in text_string_to_metric_families(bus.get("/metrics").text):
        if family.name == "agent_bus_parked_waiters":
            return family.samples[0].value
    raise AssertionError("no agent_bus_parked_waiters in /metrics")


class Parked(threading.Thread):
    """One blocking request in the background; its reply and when it came."""

    def __init__(self, url: str):
        super().__init__(name="parked-poll")
        self.url = url
        self.body = None
        self.answered_at = 0.0

    def run(self) -> None:
        reply = requests.get(self.url, timeout=40)
        self.answered_at = time.monotonic()
        assert reply.status_code == 200, reply.text
        self.body = reply.json()


def park(bus: BusServer, path: str) -> Parked:
    before = parked(bus)
    poll = Parked(bus.url + path)
    poll.start()
    wait_until(lambda: parked(bus) > before, what="the long-poll to park")
    return poll
