#!/usr/bin/env python3
"""Benchmark: what delivery receipts cost, against the commit before they existed.

Runs this checkout and a baseline revision (default 6a8afd7, the last commit
without receipts) side by side, alternating, --rounds times each:

  - 8 keep-alive clients send 8,000 messages while a daemon-like receiver follows
    with filed=true (so every poll writes a receipt): server CPU per message and
    the send rate;
  - delivery latency p50 to a parked receiver that polls again after each message.

Server CPU per message is the steadiest figure on a shared machine (it barely moves
with other load); wall-clock rates are printed too. Bounded: every phase has a
deadline. The baseline is checked out into a temporary git worktree and removed.

    python bench/bench_receipts.py [--baseline REV] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.revisions import REPO, probe, worktree  # noqa: E402

# Runs inside one tree, with that tree's harness (PROBE_PRELUDE), prints one JSON line.
PROBE = r'''
import asyncio, json, tempfile
from pathlib import Path

async def follow(url, expected):
    since, got = 0.0, 0
    async with KeepAliveClient(url) as client:
        while got < expected:
            _, body = await client.request(
                "GET", f"/recv?to=tp&since={since!r}&block=true&filed=true&max=1000")
            data = json.loads(body)
            got += len(data["messages"])
            since = max([since, data["now"], *(m["ts"] for m in data["messages"])])
    return got

async def run(url, pid):
    await measure_throughput(url, 8, 200, "warm")
    follower = asyncio.create_task(follow(url, 8000))
    before = cpu_seconds(pid)
    rate, _ = await measure_throughput(url, 8, 1000, "tp")
    got = await asyncio.wait_for(follower, 120)
    used = cpu_seconds(pid) - before
    latencies, _, _ = await measure_latency(url, 200)
    return {"cpu_us": used / 8000 * 1e6, "rate": rate, "received": got,
            "p50_ms": percentile(latencies, 0.5) * 1e3}

with tempfile.TemporaryDirectory() as folder:
    with BusServer(Path(folder) / "bus.db") as bus:
        print(json.dumps(asyncio.run(run(bus.url, bus.pid))))
        bus.stop()
'''


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="6a8afd7", help="revision without receipts")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"without receipts": [], "with receipts": []}
    with worktree(args.baseline) as baseline:
        for _ in range(args.rounds):
            results["without receipts"].append(probe(baseline, PROBE))
            results["with receipts"].append(probe(REPO, PROBE))
    medians = {}
    for name, runs in results.items():
        medians[name] = {k: statistics.median(r[k] for r in runs)
                         for k in ("cpu_us", "rate", "p50_ms")}
        assert all(r["received"] == 8000 for r in runs), f"{name}: a message went missing"
        m = medians[name]
        print(f"{name:17}: server CPU {m['cpu_us']:.0f} us/msg, send rate {m['rate']:,.0f} "
              f"msg/s, delivery p50 {m['p50_ms']:.2f} ms  (medians of {args.rounds})")
    base, new = medians["without receipts"], medians["with receipts"]
    print(f"with/without: CPU per message {new['cpu_us'] / base['cpu_us']:.2f}x, send rate "
          f"{new['rate'] / base['rate']:.2f}x, delivery p50 {new['p50_ms'] / base['p50_ms']:.2f}x "
          "(target: within 10%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
