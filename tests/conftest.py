from __future__ import annotations

import contextlib
import itertools
import os
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from busd.store import shown_database  # noqa: E402
from harness.bus import BusServer  # noqa: E402
from harness.postgres import POSTGRES_URL, PostgresServer  # noqa: E402
from harness.processes import live_processes  # noqa: E402


def _child_pids() -> set[int]:
    me = os.getpid()
    return {pid for pid, fields in live_processes() if int(fields[1]) == me}


@pytest.fixture(autouse=True)
def no_leaks():
    """A test must not leave a thread or a child process running."""
    threads_before = set(threading.enumerate())
    children_before = _child_pids()
    yield
    deadline = time.monotonic() + 5
    while True:
        threads = {t for t in set(threading.enumerate()) - threads_before if t.is_alive()}
        children = _child_pids() - children_before
        if not threads and not children:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise AssertionError(f"leaked threads {sorted(t.name for t in threads)} "
                         f"and child processes {sorted(children)}")


@pytest.fixture(scope="session")
def postgres():
    """The PostgreSQL on 127.0.0.1:5432. Unreachable: under CI the run fails, else
    the PostgreSQL tests are skipped, saying why."""
    try:
        server = PostgresServer()
        problem = server.reachable()
    except ImportError as exc:
        problem = f"psycopg is not installed ({exc})"
    if problem is not None:
        message = (f"PostgreSQL is not reachable at {shown_database(POSTGRES_URL)}: {problem}. "
                   "Start it, or point AGENT_BUS_TEST_POSTGRES at one")
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set: the PostgreSQL tests must run)", pytrace=False)
        pytest.skip(message)
    return server


@pytest.fixture
def postgres_db(postgres):
    """A fresh PostgreSQL database for one test, dropped after it."""
    url = postgres.create_database()
    yield url
    postgres.drop_database(url)


@contextlib.contextmanager
def bus_on(store: str, request, folder: Path, *args: str) -> Iterator[BusServer]:
    """A real bus server on a fresh SQLite file in `folder`, or on a fresh PostgreSQL
    database (dropped after); it must stop cleanly, with no traceback in its log."""
    if store == "sqlite":
        db, postgres = str(folder / "bus.db"), None
    else:
        postgres = request.getfixturevalue("postgres")
        db = postgres.create_database()
    try:
        with BusServer(db, *args) as bus:
            yield bus
            assert bus.stop() == 0
            # A 500 hides behind a JSON reply; the log tells: none may have happened.
            assert not [line for line in bus.log if "Traceback" in line], "".join(bus.log)
    finally:
        if postgres is not None:
            postgres.drop_database(db)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory):
    """One real bus server per test module and store; tests keep apart by unique names.

    Every module that uses it runs once on SQLite and once on a fresh PostgreSQL
    database: the protocol is the same whichever store is behind it.
    """
    with bus_on(request.param, request, tmp_path_factory.mktemp("bus"), "--hold", "2") as bus:
        yield bus


@pytest.fixture(params=["sqlite", "postgresql"])
def own_server(request, tmp_path):
    """A bus server of one test's own (for a test that changes what every request sees,
    such as tokens), on SQLite and on PostgreSQL."""
    with bus_on(request.param, request, tmp_path, "--hold", "1") as bus:
        yield bus


_counter = itertools.count()


@pytest.fixture
def names():
    """Fresh agent/channel names for one test: names("a", "b") -> ("a-17", "b-17")."""
    number = next(_counter)
    return lambda *bases: tuple(f"{base}-{os.getpid()}-{number}" for base in bases)
