#!/usr/bin/env python3
"""Benchmark bus servers sharing one PostgreSQL database.

Makes a fresh database on the PostgreSQL server (dropped at the end), starts
real `agent-bus serve --db postgresql://...` replicas on loopback, and measures:

  throughput, 1 replica    durable sends/s, 8 keep-alive clients on one server
  cross-replica latency    send through A -> a receiver parked on B gets it (p50/p99)
  throughput, 2 replicas   durable sends/s, 8 clients: 4 on A, 4 on B
  integrity                every acknowledged message arrives once, in order, for a
                           receiver that alternates between the replicas

    python bench/bench_replicas.py [--postgres URL] [--messages 500] [--rounds 3]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests  # noqa: E402

from harness.bus import BusServer, metric_value  # noqa: E402
from harness.postgres import POSTGRES_URL, PostgresServer  # noqa: E402
from harness.load import (drain, exactly_once_in_order, measure_latency,  # noqa: E402
                          measure_throughput, percentile)


async def cross_replica_latency(sender_url: str, receiver_url: str,
                                count: int) -> tuple[list[float], list[dict], list[dict]]:
    """Send one message at a time through one replica to a receiver parked on the other."""
    return await measure_latency(sender_url, count, receiver_url, park_seconds=0.005)


def commits(urls: list[str]) -> tuple[float, float]:
    """Messages committed and commits made so far, summed over the replicas."""
    messages = count = 0.0
    for url in urls:
        text = requests.get(url + "/metrics", timeout=10).text
        messages += metric_value(text, "agent_bus_commit_batch_messages_sum")
        count += metric_value(text, "agent_bus_commit_batch_messages_count")
    return messages, count


def throughput_rounds(urls: list[str], rounds: int, label: str,
                      integrity: list) -> tuple[list[float], float]:
    """Rates of each round, and the mean messages per commit over them."""
    rates = []
    before = commits(urls)
    for number in range(rounds):
        recipient = f"tp-{label}-{number}"
        rate, sent = asyncio.run(measure_throughput(urls, 8, 750, recipient))
        rates.append(rate)
        integrity.append(exactly_once_in_order(
            sent, asyncio.run(drain(urls, recipient, len(sent)))))
    after = commits(urls)
    return rates, (after[0] - before[0]) / max(1.0, after[1] - before[1])


def show_rates(title: str, rates: list[float], per_commit: float) -> None:
    shown = ", ".join(f"{r:,.0f}" for r in rates)
    print(f"{title}: median {statistics.median(rates):,.0f} msg/s   (rounds: {shown}; "
          f"{per_commit:.1f} messages per commit)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", default=POSTGRES_URL,
                        help="a PostgreSQL URL whose server may get a scratch database "
                             f"(default {POSTGRES_URL})")
    parser.add_argument("--messages", type=int, default=500, help="latency samples (>= 200)")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds per setting")
    args = parser.parse_args()
    postgres = PostgresServer(args.postgres)
    problem = postgres.reachable()
    if problem is not None:
        print(f"bench_replicas: PostgreSQL is not reachable: {problem}", file=sys.stderr)
        return 2
    db = postgres.create_database()
    integrity: list = []
    try:
        with BusServer(db) as a:
            one = throughput_rounds([a.url], args.rounds, "one", integrity)
            with BusServer(db) as b:
                latencies, acks, received = asyncio.run(
                    cross_replica_latency(a.url, b.url, max(200, args.messages)))
                integrity.append(exactly_once_in_order(acks, received))
                two = throughput_rounds([a.url, b.url], args.rounds, "two", integrity)
                b.stop()
            a.stop()
    finally:
        postgres.drop_database(db)

    p50, p99 = percentile(latencies, 0.5) * 1e3, percentile(latencies, 0.99) * 1e3
    print(f"cross-replica delivery latency (send via A -> receiver parked on B), "
          f"{len(latencies)} messages:")
    print(f"  p50 {p50:.2f} ms   p99 {p99:.2f} ms   (target: p50 <= 10 ms)")
    show_rates("durable send throughput, 8 clients, 1 replica ", *one)
    show_rates("durable send throughput, 8 clients, 2 replicas", *two)
    lost, dup, reordered = (sum(i[k] for i in integrity) for k in range(3))
    total = len(latencies) + 2 * args.rounds * 8 * 750
    print(f"integrity: lost {lost}, duplicated {dup}, reordered {reordered} over {total} messages")
    return 0 if (lost, dup, reordered) == (0, 0, 0) else 1


if __name__ == "__main__":
    raise SystemExit(main())
