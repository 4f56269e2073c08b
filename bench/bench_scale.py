#!/usr/bin/env python3
"""Benchmark: 10,000 parked long-polls on one server.

Opens N receivers (default 10,000), each a connection parked in
GET /recv?block=true, checks that the server stays responsive to another client
meanwhile, then sends one message to each receiver and reports how long each
took to arrive, and the server's resident memory. Bounded: every phase has a
deadline and the whole run stops by itself.

    python bench/bench_scale.py [--receivers 10000]
"""
from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.bus import BusServer, metric_value  # noqa: E402
from harness.load import KeepAliveClient, percentile  # noqa: E402


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def parked_count(url: str) -> int:
    async with KeepAliveClient(url) as client:
        _, body = await client.request("GET", "/metrics")
    return int(metric_value(body.decode(), "agent_bus_parked_waiters"))


async def receiver(url: str, name: str, since: float, arrived: dict, ready: asyncio.Event,
                   opened: list) -> None:
    client = KeepAliveClient(url)
    await client.__aenter__()
    opened.append(client)
    await ready.wait()
    body = await client.recv(name, since, block=True)
    arrived[name] = (time.perf_counter(), body["messages"])


async def probe(url: str, stop: asyncio.Event, samples: list) -> None:
    """Another client doing ordinary sends and polls while the crowd is parked."""
    async with KeepAliveClient(url) as client:
        while not stop.is_set():
            started = time.perf_counter()
            await client.send("probe", "probe-inbox", "still here?")
            await client.recv("probe-inbox", 0.0, block=False)
            samples.append(time.perf_counter() - started)
            await asyncio.sleep(0.05)


async def run(url: str, pid: int, receivers: int) -> int:
    since = 0.0  # the crowd's names are fresh: nothing older is waiting for them
    names = [f"crowd{i}" for i in range(receivers)]
    arrived: dict[str, tuple[float, list]] = {}
    ready, opened = asyncio.Event(), []
    tasks = [asyncio.create_task(receiver(url, n, since, arrived, ready, opened)) for n in names]
    deadline = time.monotonic() + 120
    while len(opened) < receivers and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    ready.set()
    parking_started = time.perf_counter()
    while await parked_count(url) < receivers and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    parked = await parked_count(url)
    parked_in = time.perf_counter() - parking_started

    stop, probe_samples = asyncio.Event(), []
    prober = asyncio.create_task(probe(url, stop, probe_samples))
    await asyncio.sleep(2)  # the crowd sits parked while the probe works
    rss_parked = rss_mb(pid)

    sent_at: dict[str, float] = {}

    async def sender(chunk: list[str]) -> None:
        async with KeepAliveClient(url) as client:
            for name in chunk:
                sent_at[name] = time.perf_counter()
                await client.send("bench", name, "one for you")

    send_started = time.perf_counter()
    await asyncio.gather(*(sender(names[i::8]) for i in range(8)))
    sending_took = time.perf_counter() - send_started
    done, pending = await asyncio.wait(tasks, timeout=60)
    last_arrival = max((t for t, _ in arrived.values()), default=send_started) - send_started
    stop.set()
    await prober
    rss_after = rss_mb(pid)
    for task in pending:
        task.cancel()
    for client in opened:
        await client.__aexit__(None, None, None)

    latencies = [arrived[n][0] - sent_at[n] for n in names if n in arrived and n in sent_at]
    right = sum(1 for n in names if n in arrived and [m["msg"] for m in arrived[n][1]] == ["one for you"])
    print(f"parked long-polls: {parked:,} of {receivers:,} (parked within {parked_in:.1f} s)")
    print(f"server RSS: {rss_parked:.0f} MB with all parked, {rss_after:.0f} MB after delivery "
          "(target <= 300 MB)")
    print(f"responsiveness while parked: send+poll p50 {percentile(probe_samples, .5) * 1e3:.1f} ms, "
          f"p99 {percentile(probe_samples, .99) * 1e3:.1f} ms over {len(probe_samples)} probes")
    print(f"delivery: {right:,} of {receivers:,} got exactly their one message; "
          f"per-message latency p50 {statistics.median(latencies) * 1e3:.0f} ms, "
          f"p99 {percentile(latencies, .99) * 1e3:.0f} ms, max {max(latencies) * 1e3:.0f} ms "
          "(target: each within 5 s)")
    print(f"sending all {receivers:,} took {sending_took:.2f} s; the last arrived "
          f"{last_arrival:.2f} s after the first send")
    ok = right == receivers and max(latencies) <= 5 and rss_parked <= 300
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--receivers", type=int, default=10_000)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.receivers + 100:
        print(f"the open-file limit ({hard}) is below {args.receivers + 100}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as folder:
        with BusServer(Path(folder) / "bus.db", "--hold", "30") as bus:
            code = asyncio.run(run(bus.url, bus.pid, args.receivers))
            bus.stop()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
