from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import BusServer  # noqa: E402


def _child_pids() -> set[int]:
    me = os.getpid()
    children = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is the state, fields[1] the parent pid; zombies are already dead.
        if int(fields[1]) == me and fields[0] != "Z":
            children.add(int(entry))
    return children


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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One real bus server per test module; tests keep apart by unique names."""
    folder = tmp_path_factory.mktemp("bus")
    with BusServer(folder / "bus.db", "--hold", "2") as bus:
        yield bus
        assert bus.stop() == 0
        # A 500 hides behind a JSON reply; the log tells: none may have happened.
        assert not [line for line in bus.log if "Traceback" in line], "".join(bus.log)


_counter = itertools.count()


@pytest.fixture
def names():
    """Fresh agent/channel names for one test: names("a", "b") -> ("a-17", "b-17")."""
    number = next(_counter)
    return lambda *bases: tuple(f"{base}-{os.getpid()}-{number}" for base in bases)
