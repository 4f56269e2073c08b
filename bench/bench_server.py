#!/usr/bin/env python3
"""Benchmark the bus server: delivery latency, durable send throughput, exactly-once.

Starts a real `agent-bus serve` on loopback with a fresh SQLite file (durable
commits, the default), then measures:

  latency     send -> a receiver parked in a long-poll gets it (p50/p99 over N)
  throughput  durable sends/s with 1 and with 8 concurrent keep-alive clients
  integrity   the receivers got every acknowledged message once, in order

The load generator is harness/load.py's minimal keep-alive HTTP/1.1 client, so the
figures measure the server, not a client library. Every loop is bounded.

    python bench/bench_server.py [--messages 500] [--rounds 3]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.bus import BusServer  # noqa: E402
from harness.load import (drain, exactly_once_in_order, measure_latency,  # noqa: E402
                          measure_throughput, percentile)


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=500, help="latency samples (>= 200)")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds per setting")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-bus-") as folder:
        with BusServer(Path(folder) / "bus.db") as bus:
            code = asyncio.run(run(bus.url, max(200, args.messages), args.rounds))
            bus.stop()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
