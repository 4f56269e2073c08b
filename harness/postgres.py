"""PostgreSQL for tests and benchmarks: the machine's server, where each user gets a fresh
database (dropped after), and private servers of one test's own, for tests that stop
their database."""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

# The PostgreSQL server the tests use (a maintenance database on it); each user of
# it gets a database of its own, made fresh and dropped after.
POSTGRES_URL = os.environ.get("AGENT_BUS_TEST_POSTGRES",
                              "postgresql://postgres@127.0.0.1:5432/postgres")


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
