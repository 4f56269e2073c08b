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

The load generator is harness/load.py's minimal keep-alive HTTP/1.1 client, so the
figures measure the server, not a client library. Every loop is bounded.

    python bench/bench_server.py [--messages 500] [--rounds 3] [--against main]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.bus import BusServer  # noqa: E402
from harness.load import (drain, exactly_once_in_order, measure_latency,  # noqa: E402
                          measure_throughput, percentile)
from harness.revisions import REPO, probe, worktree  # noqa: E402


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
