#!/usr/bin/env python3
"""Benchmark the bus server against the floor of its stack, side by side in one run.

The floor is a bare aiohttp server for the rapid protocol: /send and /recv (with the
long-poll and the since-cursor) in memory, no validation, no disk. Each round starts
the floor and a real `agent-bus serve` on a fresh SQLite file (durable commits, the
default), in alternating order, and measures on each:

  latency     send -> a receiver parked in a long-poll gets it (p50/p99 over N)
  throughput  durable sends/s of 8 keep-alive clients x 2,000 sends, while a receiver
              parked in a long-poll follows the cursor
  CPU         the server process's CPU time per message over that burst (/proc)
  integrity   the receivers got every acknowledged message once, in order

It prints the medians over the rounds and each figure's ratio to the floor's, beside
the goals of issue 19. With --against REV, this checkout and revision REV (checked out
into a temporary git worktree, removed after) run side by side instead.

The load generator is harness/load.py's minimal keep-alive HTTP/1.1 client, so the
figures measure the server, not a client library. Every loop is bounded.

    python bench/bench_server.py [--messages 500] [--rounds 3] [--against main]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.bus import BusServer  # noqa: E402
from harness.load import (exactly_once_in_order, measure_followed_throughput,  # noqa: E402
                          measure_latency, measure_throughput, percentile)
from harness.revisions import REPO, probe, worktree  # noqa: E402

CLIENTS, PER_CLIENT = 8, 2000

# The floor: the rapid protocol's two routes in memory, as little as aiohttp allows.
FLOOR_SERVER = r'''
import asyncio, bisect, itertools, time
from aiohttp import web
ids = itertools.count(1)
queues, stamps, waiters = {}, {}, {}
last = [0.0]
async def send(request):
    body = await request.json()
    ts = last[0] = max(time.time(), last[0] + 1e-6)
    message = {"id": next(ids), "ts": ts, "channel": "default", "from": body["from"],
               "to": body["to"], "msg": body["msg"]}
    queues.setdefault(body["to"], []).append(message)
    stamps.setdefault(body["to"], []).append(ts)
    for waiter in waiters.pop(body["to"], ()):
        if not waiter.done():
            waiter.set_result(None)
    return web.json_response({"ok": True, "ts": ts, "channel": "default", "id": message["id"]})
def fetch(to, since):
    start = bisect.bisect_right(stamps.get(to, ()), since)
    return queues.get(to, [])[start:start + 100]
async def recv(request):
    to, since = request.query["to"], float(request.query.get("since", 0))
    found = fetch(to, since)
    if not found and request.query.get("block") == "true":
        waiter = asyncio.get_running_loop().create_future()
        waiters.setdefault(to, []).append(waiter)
        try:
            await asyncio.wait_for(waiter, 25)
        except asyncio.TimeoutError:
            pass
        found = fetch(to, since)
    now = found[-1]["ts"] if len(found) >= 100 else last[0]
    return web.json_response({"messages": found, "now": now})
async def main():
    app = web.Application()
    app.router.add_post("/send", send)
    app.router.add_get("/recv", recv)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    print(f"http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
'''


@contextlib.contextmanager
def floor_server() -> Iterator[tuple[str, int]]:
    """The bare aiohttp floor as a child process: (url, pid)."""
    proc = subprocess.Popen([sys.executable, "-c", FLOOR_SERVER], stdout=subprocess.PIPE,
                            text=True)
    try:
        url = proc.stdout.readline().strip()
        if not url:
            raise RuntimeError("the bare aiohttp server did not start")
        yield url, proc.pid
    finally:
        proc.kill()
        proc.wait(10)


@contextlib.contextmanager
def bus_server() -> Iterator[tuple[str, int]]:
    """This checkout's `agent-bus serve` on a fresh SQLite file: (url, pid)."""
    with tempfile.TemporaryDirectory(prefix="bench-bus-") as folder:
        with BusServer(Path(folder) / "bus.db") as bus:
            yield bus.url, bus.pid
            bus.stop()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(url: str, pid: int, messages: int) -> dict:
    """One server's figures: latency, followed 8-client throughput, CPU per message."""
    latencies, acks, received = await measure_latency(url, messages)
    integrity = [exactly_once_in_order(acks, received)]
    before = cpu_seconds(pid)
    rate, acks, received = await measure_followed_throughput(url, CLIENTS, PER_CLIENT, "tp")
    cpu = cpu_seconds(pid) - before
    integrity.append(exactly_once_in_order(acks, received))
    return {"p50_ms": percentile(latencies, 0.5) * 1e3,
            "p99_ms": percentile(latencies, 0.99) * 1e3,
            "rate": rate, "cpu_ms": cpu / (CLIENTS * PER_CLIENT) * 1e3,
            "integrity": [sum(column) for column in zip(*integrity)]}


# (key, label, format, goal as a ratio to the floor, True: the ratio must be at most it)
FIGURES = (
    ("p50_ms", "delivery latency p50", "{:.2f} ms", 1.5, True),
    ("p99_ms", "delivery latency p99", "{:.2f} ms", 2.0, True),
    ("rate", f"{CLIENTS}-client durable throughput, receiver parked", "{:,.0f} msg/s", 0.6, False),
    ("cpu_ms", "server CPU per message", "{:.3f} ms", 2.0, True),
)


def paired(messages: int, rounds: int) -> int:
    runs: dict[str, list[dict]] = {"floor": [], "bus": []}
    starts = {"floor": floor_server, "bus": bus_server}
    for number in range(rounds):
        # Alternating which goes first, so a drift in the machine's load hits both.
        for name in (("floor", "bus") if number % 2 == 0 else ("bus", "floor")):
            with starts[name]() as (url, pid):
                runs[name].append(asyncio.run(measure(url, pid, messages)))
        print(f"round {number + 1}: " + "; ".join(
            f"{name} p50 {run[-1]['p50_ms']:.2f} ms, p99 {run[-1]['p99_ms']:.2f} ms, "
            f"{run[-1]['rate']:,.0f} msg/s, {run[-1]['cpu_ms']:.3f} ms CPU/msg"
            for name, run in runs.items()), flush=True)
    print(f"\nmedians of {rounds} paired rounds ({messages} latency samples; "
          f"{CLIENTS} clients x {PER_CLIENT} sends):")
    print("| figure | floor | agent-bus | ratio | goal |")
    print("|---|---|---|---|---|")
    met = True
    for key, label, shape, goal, at_most in FIGURES:
        floor = statistics.median(run[key] for run in runs["floor"])
        bus = statistics.median(run[key] for run in runs["bus"])
        ratio = bus / floor
        ok = ratio <= goal if at_most else ratio >= goal
        met &= ok
        print(f"| {label} | {shape.format(floor)} | {shape.format(bus)} | {ratio:.2f}x | "
              f"{'<=' if at_most else '>='} {goal}x {'met' if ok else 'MISSED'} |")
    lost, duplicated, reordered = (sum(column) for column in
                                   zip(*(run["integrity"] for run in runs["bus"])))
    total = rounds * (messages + CLIENTS * PER_CLIENT)
    print(f"integrity (agent-bus): lost {lost}, duplicated {duplicated}, reordered {reordered} "
          f"over {total} messages; every goal {'met' if met else 'NOT met'}")
    return 0 if (lost, duplicated, reordered) == (0, 0, 0) else 1


async def floor_rates() -> dict[int, float]:
    """The throughput loops' message rates against the bare aiohttp floor."""
    with floor_server() as (url, _pid):
        return {clients: (await measure_throughput(url, clients, per_client, "floor"))[0]
                for clients, per_client in ((1, 2000), (8, 750))}


# Runs inside one tree, with that tree's harness (PROBE_PRELUDE), prints one JSON line.
TREE_PROBE = r'''
import asyncio, json, tempfile
from pathlib import Path

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


def side_by_side(revision: str, messages: int, rounds: int) -> int:
    names = (revision, "this checkout", "bare aiohttp")
    results: dict[str, list[dict]] = {name: [] for name in names}
    with worktree(revision) as baseline:
        for _ in range(rounds):
            results[revision].append(probe(baseline, TREE_PROBE, str(messages)))
            results["this checkout"].append(probe(REPO, TREE_PROBE, str(messages)))
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
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds")
    parser.add_argument("--against", metavar="REV",
                        help="run revision REV's server side by side with this checkout's")
    args = parser.parse_args()
    if args.against:
        return side_by_side(args.against, max(200, args.messages), args.rounds)
    return paired(max(200, args.messages), args.rounds)


if __name__ == "__main__":
    raise SystemExit(main())
