#!/usr/bin/env python3
"""Benchmark the bus server: delivery latency, durable send throughput, exactly-once.

Starts a real `agent-bus serve` on loopback with a fresh SQLite file (durable
commits, the default), then measures:

  latency     send -> a receiver parked in a long-poll gets it (p50/p99 over N)
  throughput  durable sends/s with 1 and with 8 concurrent keep-alive clients
  integrity   the receivers got every acknowledged message once, in order

The load generator is a minimal keep-alive HTTP/1.1 client on asyncio, so the
figures measure the server, not a client library. Every loop is bounded.

    python bench/bench_server.py [--messages 500] [--rounds 3]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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
