"""Real components for tests and benchmarks: a bus server process, the tests' PostgreSQL,
send bursts, and waiting on what a server shows (its log, its /metrics)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from .processes import Child

REPO = Path(__file__).resolve().parent.parent

def repo_env(**extra: str) -> dict[str, str]:
    """The environment for a child process that must run this checkout's busd."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def agent_bus_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "busd", *args]


class BusServer(Child):
    """`agent-bus serve` as a child process on loopback, on a real SQLite file or
    PostgreSQL database (`db` is what --db gets)."""

    LISTENING = re.compile(r"listening on (https?://\S+)")

    def __init__(self, db: str | Path, *extra_args: str, port: int = 0,
                 command: list[str] | None = None, env: dict[str, str] | None = None):
        """`command` and `env` replace the usual `agent-bus serve --port --db` and its
        environment (a test of how serve finds its settings, or of an installed copy)."""
        super().__init__()
        self.db = str(db)
        self.extra_args = list(extra_args)
        self.port = port
        self.command = command
        self.env = env
        self.url = ""
        self.log: list[str] = []

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

        self._drains = [threading.Thread(target=drain, name="bus-server-stderr", daemon=True)]
        self._drains[0].start()
        if not started.wait(timeout) or not self.url:
            self.kill()
            raise RuntimeError("bus server did not start:\n" + "".join(self.log))
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

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

    def metric(self, sample: str, headers: dict | None = None, **labels: str) -> float:
        """A sample of the server's /metrics (see `metric_value`)."""
        response = self.get("/metrics", headers=headers)
        assert response.status_code == 200, response.text
        return metric_value(response.text, sample, **labels)

    def wait_parked(self, count: int = 1, timeout: float = 10.0) -> None:
        """Until at least `count` long-polls are parked on this server: its own gauge
        says so the moment a poll registers, before it looks for messages (a commit
        from then on wakes it)."""
        wait_until(lambda: self.metric("agent_bus_parked_waiters") >= count, timeout,
                   what=f"{count} long-poll(s) to park")


def metric_value(exposition: str, sample: str, **labels: str) -> float:
    """The sum of the samples named `sample` (the full name: `..._total`, `..._sum`)
    whose labels include `labels`; 0 when there is none yet (a counter with labels
    appears only once counted)."""
    return sum(found.value for family in text_string_to_metric_families(exposition)
               for found in family.samples
               if found.name == sample and labels.items() <= found.labels.items())


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
    """A long-poll (`path`) started in the background, returned once it is parked."""
    before = bus.metric("agent_bus_parked_waiters")
    poll = Parked(bus.url + path)
    poll.start()
    bus.wait_parked(int(before) + 1)
    return poll
