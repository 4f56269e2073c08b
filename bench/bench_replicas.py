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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench.bench_server import (KeepAliveClient, exactly_once_in_order, measure_latency,  # noqa: E402
                                percentile)
from tests.support import POSTGRES_URL, BusServer, PostgresServer  # noqa: E402


async def cross_replica_latency(sender_url: str, receiver_url: str,
                                count: int) -> tuple[list[float], list[dict], list[dict]]:
    """Send one message at a time through one replica to a receiver parked on the other."""
    return await measure_latency(sender_url, count, receiver_url, park_seconds=0.005)


async def throughput(urls: list[str], clients: int, per_client: int,
                     recipient: str) -> tuple[float, list[dict]]:
    """`clients` keep-alive senders spread evenly over the replicas' urls."""
    acks: list[dict] = []

    async def one_client(number: int) -> None:
        async with KeepAliveClient(urls[number % len(urls)]) as client:
            for i in range(per_client):
                acks.append(await client.send(f"tp{number}", recipient, f"{number}:{i}"))

    started = time.perf_counter()
    await asyncio.gather(*(one_client(n) for n in range(clients)))
    return clients * per_client / (time.perf_counter() - started), acks


async def drain_alternating(urls: list[str], recipient: str) -> list[dict]:
    """The rapid cursor rule, asking each replica in turn, until nothing is left."""
    got: list[dict] = []
    since, turn, empty_in_a_row = 0.0, 0, 0
    clients = [KeepAliveClient(url) for url in urls]
    for client in clients:
        await client.__aenter__()
    try:
        while empty_in_a_row < len(urls):
            body = await clients[turn].recv(recipient, since, block=False)
            got.extend(body["messages"])
            since = max([since, body["now"], *(m["ts"] for m in body["messages"])])
            empty_in_a_row = 0 if body["messages"] else empty_in_a_row + 1
            turn = (turn + 1) % len(urls)
    finally:
        for client in clients:
            await client.__aexit__(None, None, None)
    return got


def commits(urls: list[str]) -> tuple[float, float]:
    """Messages committed and commits made so far, summed over the replicas."""
    messages = count = 0.0
    for url in urls:
        text = requests.get(url + "/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            if family.name == "agent_bus_commit_batch_messages":
                for sample in family.samples:
                    if sample.name.endswith("_sum"):
                        messages += sample.value
                    elif sample.name.endswith("_count"):
                        count += sample.value
    return messages, count


def throughput_rounds(urls: list[str], rounds: int, label: str,
                      integrity: list) -> tuple[list[float], float]:
    """Rates of each round, and the mean messages per commit over them."""
    rates = []
    before = commits(urls)
    for number in range(rounds):
        recipient = f"tp-{label}-{number}"
        rate, sent = asyncio.run(throughput(urls, 8, 750, recipient))
        rates.append(rate)
        integrity.append(exactly_once_in_order(
            sent, asyncio.run(drain_alternating(urls, recipient))))
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
