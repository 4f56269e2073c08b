"""Load for benchmarks and tests: a bare keep-alive HTTP/1.1 client on asyncio, and the
latency, throughput and drain loops built on it. The client is minimal so that figures
measure the server, not a client library. Every loop is bounded."""
from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import urlsplit


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


def advanced(since: float, reply: dict) -> float:
    """The rapid protocol's cursor rule (PROTOCOLS.md §1): the next `since` after a
    /recv reply is the largest of the old one, the reply's `now` and its stamps."""
    return max([since, reply["now"], *(m["ts"] for m in reply["messages"])])


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
            # A pause, not an event: watching the parked gauge would put a request on
            # the measured server into every sample. A poll that has not parked yet
            # still gets the message; only that sample is not a wake-up.
            await asyncio.sleep(park_seconds)
            started = time.perf_counter()
            acks.append(await sender.send("bench", "lat", f"latency {i}"))
            body = await asyncio.wait_for(parked, 30)
            latencies.append(time.perf_counter() - started)
            received.extend(body["messages"])
            since = advanced(since, body)
    return latencies, acks, received


async def measure_throughput(urls: str | list[str], clients: int, per_client: int,
                             recipient: str) -> tuple[float, list[dict]]:
    """Durable sends/s of `clients` keep-alive senders, spread evenly over the servers'
    urls (several servers sharing one database), and their acknowledgements."""
    urls = [urls] if isinstance(urls, str) else urls
    acks: list[dict] = []

    async def one_client(number: int) -> None:
        async with KeepAliveClient(urls[number % len(urls)]) as client:
            for i in range(per_client):
                acks.append(await client.send(f"tp{number}", recipient, f"{number}:{i}"))

    started = time.perf_counter()
    await asyncio.gather(*(one_client(n) for n in range(clients)))
    return clients * per_client / (time.perf_counter() - started), acks


async def drain(urls: str | list[str], recipient: str, expected: int) -> list[dict]:
    """Follow the cursor rule with the default batch size, asking each server in turn,
    until a whole round of them had nothing left."""
    urls = [urls] if isinstance(urls, str) else urls
    got: list[dict] = []
    since, turn, empty_in_a_row = 0.0, 0, 0
    clients = [KeepAliveClient(url) for url in urls]
    for client in clients:
        await client.__aenter__()
    try:
        for _ in range(expected // 50 + 100 * len(urls)):
            body = await clients[turn].recv(recipient, since, block=False)
            got.extend(body["messages"])
            since = advanced(since, body)
            empty_in_a_row = 0 if body["messages"] else empty_in_a_row + 1
            if empty_in_a_row == len(urls):
                break
            turn = (turn + 1) % len(urls)
    finally:
        for client in clients:
            await client.__aexit__(None, None, None)
    return got


def exactly_once_in_order(acks: list[dict], received: list[dict]) -> tuple[int, int, int]:
    """(lost, duplicated, out of order) counts."""
    ids = [m["id"] for m in received]
    lost = len({a["id"] for a in acks} - set(ids))
    duplicated = len(ids) - len(set(ids))
    stamps = [m["ts"] for m in received]
    reordered = sum(1 for a, b in zip(stamps, stamps[1:]) if b <= a)
    return lost, duplicated, reordered


async def measure_followed_throughput(url: str, clients: int, per_client: int, recipient: str,
                                      settle_seconds: float = 30.0
                                      ) -> tuple[float, list[dict], list[dict]]:
    """Durable sends/s of `clients` keep-alive senders while a receiver parked in a
    long-poll follows the cursor (as a daemon does), and what it received: the sends'
    acknowledgements and the messages, for exactly_once_in_order. The receiver stops once
    it holds as many messages as were acknowledged, or `settle_seconds` after the last ack."""
    received: list[dict] = []
    expected = clients * per_client

    async def follow() -> None:
        async with KeepAliveClient(url) as receiver:
            since = (await receiver.recv(recipient, 0.0, block=False))["now"]
            ready.set()
            # Each poll returns at least one message or at the hold's end: bounded by
            # `expected` polls with messages, and the deadline below.
            for _ in range(expected + 10):
                if len(received) >= expected:
                    return
                body = await receiver.recv(recipient, since, block=True)
                received.extend(body["messages"])
                since = advanced(since, body)

    ready = asyncio.Event()
    follower = asyncio.create_task(follow())
    await asyncio.wait_for(ready.wait(), 10)
    rate, acks = await measure_throughput(url, clients, per_client, recipient)
    try:
        await asyncio.wait_for(follower, settle_seconds)
    except asyncio.TimeoutError:
        pass  # what it missed shows as lost
    return rate, acks, received
