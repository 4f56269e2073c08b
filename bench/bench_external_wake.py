#!/usr/bin/env python3
"""Benchmark how fast a message written straight into the database by another process
(el-ipc's CLI mode, `agent-bus send --db`) reaches a long-poll parked on the server.

Starts a real `agent-bus serve` on loopback with a fresh SQLite file (and/or a fresh
PostgreSQL database), parks a rapid long-poll on it, and stores one message at a time:

  cli       the real `agent-bus send --db` command, one process per send (el-ipc's CLI
            mode as a user runs it): the bus's send flow on the store opened beside the
            server; the server hears the commit (SQLite: its WAL watch; PostgreSQL:
            NOTIFY). Besides send-start -> answer (which includes the process's start),
            commit -> wake: from the message's ts, stamped in the command's transaction
            just before its COMMIT, to the parked poll's answer (same machine, one clock)
  direct    from this process, through the ordinary store opened beside the server
            (store_factory.open_store(db, exclusive=False).append, the store call the
            command ends in), without the process start
  direct, server busy
            the same while another client keeps the server committing (a send every
            2 ms): on SQLite its watch is then off and its own transactions look
  http      POST /send to the server itself, in the same run, for comparison

Each figure is from the moment the send starts (so a direct write's own durable commit
is included) to the moment the parked poll's answer arrives; the direct writer's commit
time alone is printed beside it. Targets: cli commit -> wake p50 <= 50 ms, direct p50
<= 50 ms. Every loop is bounded.

    python bench/bench_external_wake.py [--sends 100] [--store sqlite|postgresql|both]
                                        [--paths all|cli]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from busd.model import NewMessage  # noqa: E402
from busd.store_factory import open_store  # noqa: E402
from harness.bus import BusServer, agent_bus_cmd, repo_env  # noqa: E402
from harness.load import KeepAliveClient, advanced, percentile  # noqa: E402
from harness.postgres import PostgresServer  # noqa: E402

RECIPIENT = "wake"


async def measure(url: str, sends: int, send_one, commit_to_wake: list[float] | None = None
                  ) -> tuple[list[float], list[float], int]:
    """Park a poll, send one message, time its answer; `sends` times. Returns the
    send-start -> answer latencies, the sends' own durations, and how many were missed.
    `send_one(i)` returns the stored message's id, or (id, ts); with `commit_to_wake`,
    the answer's wall-clock time minus that ts is appended to it."""
    latencies, durations, missed = [], [], 0
    async with KeepAliveClient(url) as receiver:
        since = json.loads((await receiver.request("GET", "/healthz"))[1])["now"]
        for i in range(sends):
            answered: list[float] = []

            async def poll() -> dict:
                body = await receiver.recv(RECIPIENT, since, block=True)
                answered.extend((time.perf_counter(), time.time()))
                return body

            parked = asyncio.create_task(poll())
            # Let the poll reach the server and park, and the server fall idle (its own
            # commit of the poll's receipt behind it), as before a send that comes
            # while nothing else happens.
            await asyncio.sleep(0.05)
            started = time.perf_counter()
            stamp = await send_one(i)
            durations.append(time.perf_counter() - started)
            body = await asyncio.wait_for(parked, 30)
            if isinstance(stamp, tuple):
                stamp, ts = stamp
                if commit_to_wake is not None:
                    commit_to_wake.append(answered[1] - ts)
            if [m["id"] for m in body["messages"]] != [stamp]:
                missed += 1  # answered by the hold running out, or with the wrong message
            latencies.append(answered[0] - started)
            since = advanced(since, body)
    return latencies, durations, missed


async def cli_send(db: str, i: int) -> tuple[int, float]:
    """One `agent-bus send --db` process; the stored message's id and ts (its ack)."""
    process = await asyncio.create_subprocess_exec(
        *agent_bus_cmd("send", RECIPIENT, "--db", db, "--from", "cli"),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=repo_env())
    out, err = await process.communicate(f"cli {i}".encode())
    if process.returncode != 0:
        raise RuntimeError(f"agent-bus send --db failed: {err.decode()}")
    ack = json.loads(out)
    return ack["id"], ack["ts"]


async def run(db: str, sends: int, paths: tuple[str, ...]) -> dict:
    results = {}
    with BusServer(db, "--hold", "10") as bus:
        if "cli" in paths:
            waking: list[float] = []
            results["cli"] = (*await measure(bus.url, sends, lambda i: cli_send(db, i),
                                             waking), waking)
        if paths == ("cli",):
            assert bus.stop() == 0, "".join(bus.log)
            return results
        store = open_store(db, exclusive=False)
        await store.open()
        try:
            async def direct(i: int) -> int:
                result = await store.append(NewMessage(
                    channel="default", sender="cli", to=RECIPIENT, body=f"direct {i}"))
                return result.message.id

            results["direct"] = await measure(bus.url, sends, direct)
            # The same while the server keeps committing sends of its own (a send every
            # 2 ms from another client), so its WAL watch is mostly off.
            stop = asyncio.Event()

            async def other_traffic() -> None:
                async with KeepAliveClient(bus.url) as other:
                    for i in range(100_000):
                        if stop.is_set():
                            return
                        await other.send("busy", "elsewhere", f"busy {i}")
                        await asyncio.sleep(0.002)

            traffic = asyncio.create_task(other_traffic())
            try:
                results["direct, server busy"] = await measure(bus.url, sends, direct)
            finally:
                stop.set()
                await traffic
        finally:
            await store.close()
        async with KeepAliveClient(bus.url) as sender:
            async def over_http(i: int) -> int:
                return (await sender.send("web", RECIPIENT, f"http {i}"))["id"]

            results["http"] = await measure(bus.url, sends, over_http)
        assert bus.stop() == 0, "".join(bus.log)
    return results


def report(store: str, results: dict) -> bool:
    ok = True
    for path, (latencies, durations, missed, *_) in results.items():
        p50, p99 = percentile(latencies, 0.5) * 1e3, percentile(latencies, 0.99) * 1e3
        own = percentile(durations, 0.5) * 1e3
        print(f"{store:<10} {path:<19} send -> parked poll answered: p50 {p50:6.2f} ms, "
              f"p99 {p99:6.2f} ms   (the send itself: p50 {own:5.2f} ms)   "
              f"missed {missed} of {len(latencies)}")
        ok = ok and missed == 0
    targets = [(path, results[path][0]) for path in ("direct", "direct, server busy")
               if path in results]
    if "cli" in results:
        waking = results["cli"][3]
        print(f"{store:<10} {'cli':<19} commit -> wake: p50 "
              f"{percentile(waking, 0.5) * 1e3:6.2f} ms, "
              f"p99 {percentile(waking, 0.99) * 1e3:6.2f} ms")
        targets.insert(0, ("cli commit -> wake", waking))
    for path, values in targets:
        p50 = percentile(values, 0.5) * 1e3
        print(f"{store:<10} {path}: p50 {p50:.2f} ms "
              f"{'meets' if p50 <= 50 else 'MISSES'} the 50 ms target")
        ok = ok and p50 <= 50
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sends", type=int, default=100, help="messages per path")
    parser.add_argument("--store", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--paths", choices=("all", "cli"), default="all",
                        help="cli: only the `agent-bus send --db` command (default: all paths)")
    args = parser.parse_args()
    paths = ("cli",) if args.paths == "cli" else ("cli", "direct", "http")
    ok = True
    if args.store in ("sqlite", "both"):
        with tempfile.TemporaryDirectory() as folder:
            ok &= report("sqlite", asyncio.run(run(str(Path(folder) / "bus.db"), args.sends,
                                                   paths)))
    if args.store in ("postgresql", "both"):
        postgres = PostgresServer()
        problem = postgres.reachable()
        if problem is not None:
            print(f"postgresql skipped: {problem}")
        else:
            url = postgres.create_database()
            try:
                ok &= report("postgresql", asyncio.run(run(url, args.sends, paths)))
            finally:
                postgres.drop_database(url)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
