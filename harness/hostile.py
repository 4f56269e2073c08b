"""Hostile clients against one server, and a normal client beside them (bench_hostile.py
and test_hostile.py run it).

At once: slowloris connections (a request head trickled one header a second),
half-open connections (a body promised and never sent; requests whose replies are
never read), oversized headers, and a flood of clients sending as fast as they can.
Meanwhile a normal client sends and polls every 20 ms. `run` reports whether all of
its requests succeeded and their latency p50/p99. Bounded: it runs `seconds` and stops.
"""
from __future__ import annotations

import asyncio
import time

from .load import KeepAliveClient, advanced, percentile


async def slowloris(host: str, port: int, stop: asyncio.Event) -> None:
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /recv?to=victim HTTP/1.1\r\nHost: localhost\r\n")
        while not stop.is_set():
            writer.write(b"X-Slow: 1\r\n")
            await writer.drain()
            await asyncio.sleep(1)
        writer.close()
    except (ConnectionError, OSError):
        pass  # the server hung up on us: fine


async def half_open(host: str, port: int, stop: asyncio.Event, promise_body: bool) -> None:
    try:
        reader, writer = await asyncio.open_connection(host, port)
        if promise_body:
            writer.write(b"POST /send HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n{")
        else:
            writer.write(b"GET /recv?to=x&block=true HTTP/1.1\r\nHost: localhost\r\n\r\n" * 50)
        await writer.drain()
        await stop.wait()  # never read a byte
        writer.close()
    except (ConnectionError, OSError):
        pass


async def oversized(host: str, port: int, stop: asyncio.Event, counts: dict) -> None:
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 30000
                         + b"\r\n\r\n")
            await writer.drain()
            await reader.read(4096)
            writer.close()
            counts["oversized"] = counts.get("oversized", 0) + 1
        except (ConnectionError, OSError):
            counts["oversized"] = counts.get("oversized", 0) + 1
        await asyncio.sleep(0.1)


async def flooder(url: str, number: int, stop: asyncio.Event, counts: dict) -> None:
    async with KeepAliveClient(url) as client:
        i = 0
        while not stop.is_set():
            await client.send(f"flood{number}", "flood-sink", f"{i}")
            counts["flood"] = counts.get("flood", 0) + 1
            i += 1


async def normal_client(url: str, stop: asyncio.Event, latencies: list, failures: list) -> None:
    async with KeepAliveClient(url) as client:
        since = 0.0
        while not stop.is_set():
            started = time.perf_counter()
            try:
                await client.send("normal-a", "normal-b", "hello")
                body = await client.recv("normal-b", since, block=False)
                since = advanced(since, body)
                latencies.append(time.perf_counter() - started)
            except Exception as exc:  # noqa: BLE001 - every failure counts, whatever it is
                failures.append(repr(exc))
            await asyncio.sleep(0.02)


async def run(url: str, seconds: float, slow: int, flood: int) -> int:
    host, port = url.split("//")[1].rsplit(":", 1)
    port = int(port)
    stop = asyncio.Event()
    counts: dict = {}
    latencies: list = []
    failures: list = []
    tasks = [asyncio.create_task(slowloris(host, port, stop)) for _ in range(slow)]
    tasks += [asyncio.create_task(half_open(host, port, stop, promise)) for promise in
              [True] * 50 + [False] * 50]
    tasks += [asyncio.create_task(oversized(host, port, stop, counts)) for _ in range(5)]
    tasks += [asyncio.create_task(flooder(url, n, stop, counts)) for n in range(flood)]
    await asyncio.sleep(1)  # the attack is under way before the normal client starts
    normal = asyncio.create_task(normal_client(url, stop, latencies, failures))
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.wait([normal, *tasks], timeout=30)
    for task in tasks:
        task.cancel()
    print(f"attack: {slow} slowloris, 100 half-open, 5 oversized-header loops "
          f"({counts.get('oversized', 0)} requests), {flood}-client flood "
          f"({counts.get('flood', 0) / (seconds + 1):,.0f} sends/s)")
    if latencies:
        print(f"normal client: {len(latencies)} ok, {len(failures)} failed; send+poll latency "
              f"p50 {percentile(latencies, .5) * 1e3:.1f} ms, p99 {percentile(latencies, .99) * 1e3:.1f} ms, "
              f"max {max(latencies) * 1e3:.1f} ms (target: all succeed, p99 < 1 s)")
    for failure in failures[:5]:
        print("  failure:", failure)
    return 0 if latencies and not failures and percentile(latencies, .99) < 1.0 else 1
