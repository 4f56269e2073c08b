#!/usr/bin/env python3
"""Benchmark the bus server: delivery latency, durable send throughput, exactly-once.

Starts a real `agent-bus serve` on loopback with a fresh SQLite file (durable
commits, the default), then measures:

  latency     send -> a receiver parked in a long-poll gets it (p50/p99 over N)
  throughput  durable sends/s with 1 and with 8 concurrent keep-alive clients
  integrity   the receivers got every acknowledged message once, in order
  floor       the same throughput loops against a bare aiohttp handler (parse the JSON,
              answer an id): what this machine allows right now

With --against REV, this checkout and revision REV (checked out into a temporary git
worktree, removed after) run side by side instead, in alternating rounds, each measured
by its own tree's server; the floor is measured in every round too.

The load generator is a minimal keep-alive HTTP/1.1 client on asyncio, so the
figures measure the server, not a client library. Every loop is bounded.

    python bench/bench_server.py [--messages 500] [--rounds 3] [--against main]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

from tests.support import BusServer  # noqa: E402


class KeepAliveClient:
    """One persistent HTTP/1.1 connection; requests go one at a time."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> "KeepAliveClient":
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc) -> None:
        self.writer.close()
        await self.writer.wait_closed()

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readuntil(b"\r\n")
        status = int(status_line.split()[1])
        length = 0
        while True:
            line = await self.reader.readuntil(b"\r\n")
            if line == b"\r\n":
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    async def send(self, sender: str, to: str, msg: str) -> dict:
        status, body = await self.request(
            "POST", "/send", json.dumps({"from": sender, "to": to, "msg": msg}).encode())
        if status != 200:
            raise RuntimeError(f"send answered {status}: {body[:200]!r}")
        return json.loads(body)

    async def recv(self, to: str, since: float, block: bool) -> dict:
        status, body = await self.request(
            "GET", f"/recv?to={to}&since={since!r}&block={'true' if block else 'false'}")
        if status != 200:
            raise RuntimeError(f"recv answered {status}: {body[:200]!r}")
        return json.loads(body)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


async def measure_latency(url: str, count: int, receiver_url: str | None = None,
                          park_seconds: float = 0.003
                          ) -> tuple[list[float], list[dict], list[dict]]:
    """Send one message at a time to a receiver already parked in a long-poll (on another
    server sharing the database, when `receiver_url` is given)."""
    latencies, acks, received = [], [], []
    async with KeepAliveClient(url) as sender, \
            KeepAliveClient(receiver_url or url) as receiver:
        since = (await receiver.recv("lat", 0.0, block=False))["now"]
        for i in range(count):
            parked = asyncio.create_task(receiver.recv("lat", since, block=True))
            await asyncio.sleep(park_seconds)  # let the poll reach the server and park
            started = time.perf_counter()
            acks.append(await sender.send("bench", "lat", f"latency {i}"))
            body = await asyncio.wait_for(parked, 30)
            latencies.append(time.perf_counter() - started)
            received.extend(body["messages"])
            since = max([since, body["now"], *(m["ts"] for m in body["messages"])])
    return latencies, acks, received


async def measure_throughput(url: str, clients: int, per_client: int,
                             recipient: str) -> tuple[float, list[dict]]:
    acks: list[dict] = []

    async def one_client(number: int) -> None:
        async with KeepAliveClient(url) as client:
            for i in range(per_client):
                acks.append(await client.send(f"tp{number}", recipient, f"{number}:{i}"))

    started = time.perf_counter()
    await asyncio.gather(*(one_client(n) for n in range(clients)))
    elapsed = time.perf_counter() - started
    return clients * per_client / elapsed, acks


async def drain(url: str, recipient: str, expected: int) -> list[dict]:
    """Follow the since-cursor rule with the default batch size until all arrived."""
    got: list[dict] = []
    since = 0.0
    async with KeepAliveClient(url) as client:
        for _ in range(expected // 50 + 100):
            body = await client.recv(recipient, since, block=False)
            got.extend(body["messages"])
            since = max([since, body["now"], *(m["ts"] for m in body["messages"])])
            if not body["messages"]:
                break
    return got


def exactly_once_in_order(acks: list[dict], received: list[dict]) -> tuple[int, int, int]:
    """(lost, duplicated, out of order) counts."""
    ids = [m["id"] for m in received]
    lost = len({a["id"] for a in acks} - set(ids))
    duplicated = len(ids) - len(set(ids))
    stamps = [m["ts"] for m in received]
    reordered = sum(1 for a, b in zip(stamps, stamps[1:]) if b <= a)
    return lost, duplicated, reordered


async def run(url: str, messages: int, rounds: int) -> int:
    latencies, acks, received = await measure_latency(url, messages)
    lat_integrity = exactly_once_in_order(acks, received)
    p50, p99 = percentile(latencies, 0.5) * 1e3, percentile(latencies, 0.99) * 1e3

    results = {}
    integrity = [lat_integrity]
    for clients, per_client in ((1, 2000), (8, 750)):
        rates = []
        for round_number in range(rounds):
            recipient = f"tp-{clients}-{round_number}"
            rate, sent = await measure_throughput(url, clients, per_client, recipient)
            rates.append(rate)
            got = await drain(url, recipient, len(sent))
            integrity.append(exactly_once_in_order(sent, got))
        results[clients] = rates

    lost = sum(i[0] for i in integrity)
    dup = sum(i[1] for i in integrity)
    reordered = sum(i[2] for i in integrity)
    print(f"delivery latency (send -> parked receiver), {messages} messages, durable commits:")
    print(f"  p50 {p50:.2f} ms   p99 {p99:.2f} ms   (targets: p50 <= 2 ms, p99 <= 5 ms)")
    for clients, rates in results.items():
        shown = ", ".join(f"{r:,.0f}" for r in rates)
        print(f"durable send throughput, {clients} keep-alive client{'s' if clients > 1 else ''}: "
              f"median {statistics.median(rates):,.0f} msg/s   (rounds: {shown})")
    print("  (target: 8 clients >= 6,000 msg/s)")
    print(f"integrity: lost {lost}, duplicated {dup}, reordered {reordered} "
          f"over {messages + sum(c * p * rounds for c, p in ((1, 2000), (8, 750)))} messages")
    return 0 if (lost, dup, reordered) == (0, 0, 0) else 1


# A bare aiohttp server: one handler that reads the JSON body and answers an id.
FLOOR_SERVER = r'''
import asyncio, itertools, sys, time
from aiohttp import web
ids = itertools.count(1)
async def send(request):
    await request.json()
    return web.json_response({"id": next(ids), "ts": time.time()})
async def main():
    app = web.Application()
    app.router.add_post("/send", send)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    print(f"http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
'''


async def floor_rates() -> dict[int, float]:
    """The throughput loops' message rates against the bare aiohttp handler."""
    proc = subprocess.Popen([sys.executable, "-c", FLOOR_SERVER], stdout=subprocess.PIPE,
                            text=True)
    try:
        url = proc.stdout.readline().strip()
        if not url:
            raise RuntimeError("the bare aiohttp server did not start")
        return {clients: (await measure_throughput(url, clients, per_client, "floor"))[0]
                for clients, per_client in ((1, 2000), (8, 750))}
    finally:
        proc.kill()
        proc.wait(10)


# Runs inside one tree (its own tests.support and bench.bench_server), prints one JSON line.
TREE_PROBE = r'''
import asyncio, json, os, sys, tempfile
from pathlib import Path
sys.path.insert(0, os.getcwd())
from tests.support import BusServer
from bench.bench_server import measure_latency, measure_throughput, percentile

def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

async def run(url, pid, messages):
    before = cpu_seconds(pid)
    latencies, _, _ = await measure_latency(url, messages)
    latency_cpu = cpu_seconds(pid) - before
    one, _ = await measure_throughput(url, 1, 2000, "tp-1")
    before = cpu_seconds(pid)
    eight, _ = await measure_throughput(url, 8, 750, "tp-8")
    return {"p50_ms": percentile(latencies, 0.5) * 1e3,
            "p99_ms": percentile(latencies, 0.99) * 1e3, "1": one, "8": eight,
            "cpu_us": (cpu_seconds(pid) - before) / 6000 * 1e6,
            "latency_cpu_us": latency_cpu / messages * 1e6}

with tempfile.TemporaryDirectory() as folder:
    with BusServer(Path(folder) / "bus.db") as bus:
        print(json.dumps(asyncio.run(run(bus.url, bus.pid, int(sys.argv[1])))))
        bus.stop()
'''


def probe(tree: Path, messages: int) -> dict:
    done = subprocess.run([sys.executable, "-c", TREE_PROBE, str(messages)], cwd=tree,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(tree)})
    if done.returncode != 0:
        raise SystemExit(f"{tree}: the probe failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def worktree(revision: str):
    """`revision` checked out into a temporary git worktree, removed after."""
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as folder:
        tree = Path(folder) / "tree"
        subprocess.run(["git", "-C", str(HERE), "worktree", "add", "-q", "--detach", str(tree),
                        revision], check=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(HERE), "worktree", "remove", "--force", str(tree)],
                           check=False)


def side_by_side(revision: str, messages: int, rounds: int) -> int:
    names = (revision, "this checkout", "bare aiohttp")
    results: dict[str, list[dict]] = {name: [] for name in names}
    with worktree(revision) as baseline:
        for _ in range(rounds):
            results[revision].append(probe(baseline, messages))
            results["this checkout"].append(probe(HERE, messages))
            results["bare aiohttp"].append(
                {str(k): v for k, v in asyncio.run(floor_rates()).items()})
    print(f"side by side, medians of {rounds} alternating rounds ({messages} latency samples):")
    for name, runs in results.items():
        median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        server = (f"latency p50 {median['p50_ms']:.2f} ms, p99 {median['p99_ms']:.2f} ms; "
                  f"server CPU {median['latency_cpu_us']:.0f} us/delivery, "
                  f"{median['cpu_us']:.0f} us/msg with 8 clients; "
                  if "p50_ms" in median else "")
        eights = ", ".join(f"{run['8']:,.0f}" for run in runs)
        print(f"  {name:14} {server}1 client {median['1']:,.0f} msg/s, 8 clients "
              f"{median['8']:,.0f} msg/s (8-client rounds: {eights})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=500, help="latency samples (>= 200)")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds per setting")
    parser.add_argument("--against", metavar="REV",
                        help="run revision REV's server side by side with this checkout's")
    args = parser.parse_args()
    if args.against:
        return side_by_side(args.against, max(200, args.messages), args.rounds)
    with tempfile.TemporaryDirectory(prefix="bench-bus-") as folder:
        with BusServer(Path(folder) / "bus.db") as bus:
            code = asyncio.run(run(bus.url, max(200, args.messages), args.rounds))
            bus.stop()
    floor = asyncio.run(floor_rates())
    print(f"floor, a bare aiohttp handler: 1 client {floor[1]:,.0f} msg/s, "
          f"8 clients {floor[8]:,.0f} msg/s")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
