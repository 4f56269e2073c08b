#!/usr/bin/env python3
"""Benchmark the agent spool end to end: a file dropped in spark's outbox -> dell's inbox.

Starts a real `agent-bus serve` on loopback (fresh SQLite file, durable commits) and
two real daemons, `agent-bus agent spark` and `agent-bus agent dell`, then measures:

  latency  one drop at a time (written beside the outbox, renamed in) until dell's
           daemon has filed it: inbox file durable, inbox.log block written, and the
           block printed on its stdout, which is where we see it. p50/p99 over N.
  burst    M files dropped as fast as they can be written; the rate at which dell's
           inbox fills, from the first drop to the last filed message.
  integrity  every drop arrives exactly once (bodies counted in dell's inbox files),
           spark's outbox and claimed/ are empty, sent/ holds them all.

    python bench/bench_spool.py [--drops 200] [--burst 2000] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.agents import AgentProcess, files_under, inbox_messages  # noqa: E402
from harness.bus import BusServer  # noqa: E402
from harness.load import percentile  # noqa: E402


class ArrivalWatch:
    """Reads dell's stdout blocks as they come: body line -> arrival time."""

    def __init__(self, agent: AgentProcess):
        self.agent = agent
        self.seen = 0
        self.arrived: dict[str, float] = {}

    def wait_for(self, bodies: set[str], timeout: float) -> float:
        """Wait until every body has arrived; the time the last one did."""
        deadline = time.monotonic() + timeout
        with self.agent.changed:
            while True:
                lines = self.agent.stdout
                now = time.perf_counter()
                for line in lines[self.seen:]:
                    self.arrived.setdefault(line.rstrip("\n"), now)
                self.seen = len(lines)
                if bodies.issubset(self.arrived):
                    return max(self.arrived[b] for b in bodies)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = len(bodies - set(self.arrived))
                    raise SystemExit(f"bench: {missing} drops did not arrive in {timeout}s")
                self.agent.changed.wait(remaining)


def drop(spark: AgentProcess, folder: str, name: str, body: str) -> None:
    temp = os.path.join(spark.layout.root, f".bench-{name}")
    with open(temp, "w", encoding="utf-8") as handle:
        handle.write(body)
    os.rename(temp, os.path.join(folder, name))


def latency_round(spark: AgentProcess, folder: str, watch: ArrivalWatch, label: str,
                  drops: int) -> tuple[float, float]:
    samples = []
    for i in range(drops):
        body = f"{label}-{i}"
        started = time.perf_counter()
        drop(spark, folder, body, body)
        samples.append(watch.wait_for({body}, timeout=30) - started)
        time.sleep(0.005)  # each drop starts from an idle spool
    return percentile(samples, 0.5) * 1000, percentile(samples, 0.99) * 1000


def burst_round(spark: AgentProcess, folder: str, watch: ArrivalWatch, label: str,
                count: int) -> tuple[float, float]:
    bodies = [f"{label}-{i}" for i in range(count)]
    started = time.perf_counter()
    for body in bodies:
        drop(spark, folder, body, body)
    dropped = time.perf_counter() - started
    last = watch.wait_for(set(bodies), timeout=120)
    return count / (last - started), count / dropped


def check_integrity(spark: AgentProcess, dell: AgentProcess, expected: list[str]) -> None:
    deadline = time.monotonic() + 30
    while len(files_under(spark.layout.sent)) < len(expected) and time.monotonic() < deadline:
        time.sleep(0.05)
    got = [body.decode() for _, body in inbox_messages(dell.layout)]
    lost = set(expected) - set(got)
    duplicated = len(got) - len(set(got))
    problems = []
    if lost or duplicated or len(got) != len(expected):
        problems.append(f"{len(lost)} lost, {duplicated} duplicated, {len(got)} filed")
    if files_under(spark.layout.outbox) or files_under(spark.layout.claimed):
        problems.append("spark's outbox/claimed not empty")
    if len(files_under(spark.layout.sent)) != len(expected):
        problems.append(f"sent/ holds {len(files_under(spark.layout.sent))}")
    if problems:
        raise SystemExit("bench: integrity check failed: " + "; ".join(problems))
    print(f"  integrity: {len(expected)} drops, 0 lost, 0 duplicated, outbox empty, "
          f"sent/ holds {len(expected)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drops", type=int, default=200, help="latency drops per round")
    parser.add_argument("--burst", type=int, default=2000, help="files per burst")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    print(f"bench_spool: {os.cpu_count()} CPUs, python {sys.version.split()[0]}, "
          f"{args.rounds} rounds of {args.drops} single drops and a {args.burst}-file burst")
    latencies, rates = [], []
    expected: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-spool-") as folder:
        with BusServer(Path(folder) / "bus.db") as bus:
            spool = Path(folder) / "spool"
            with AgentProcess("spark", spool, bus.url) as spark, \
                    AgentProcess("dell", spool, bus.url) as dell:
                outbox = os.path.join(spark.layout.outbox, "dell")
                os.makedirs(outbox)
                watch = ArrivalWatch(dell)
                for number in range(1, args.rounds + 1):
                    p50, p99 = latency_round(spark, outbox, watch, f"lat{number}", args.drops)
                    latencies.append((p50, p99))
                    expected += [f"lat{number}-{i}" for i in range(args.drops)]
                    print(f"round {number}: latency drop -> dell's inbox file: "
                          f"p50 {p50:.1f} ms, p99 {p99:.1f} ms")
                    rate, drop_rate = burst_round(spark, outbox, watch, f"burst{number}",
                                                  args.burst)
                    rates.append(rate)
                    expected += [f"burst{number}-{i}" for i in range(args.burst)]
                    print(f"round {number}: burst of {args.burst}: drained at {rate:.0f} "
                          f"files/s (written at {drop_rate:.0f} files/s)")
                check_integrity(spark, dell, expected)
                spark.stop()
                dell.stop()
            bus.stop()
    p50 = statistics.median(p for p, _ in latencies)
    p99 = statistics.median(p for _, p in latencies)
    rate = statistics.median(rates)
    verdict = "OK" if p50 <= 25 and p99 <= 100 and rate >= 500 else "BELOW TARGET"
    print(f"median of {args.rounds} rounds: latency p50 {p50:.1f} ms (target <= 25), "
          f"p99 {p99:.1f} ms (target <= 100); burst {rate:.0f} files/s (target >= 500): "
          f"{verdict}")
    return 0 if verdict == "OK" else 1


if __name__ == "__main__":
    raise SystemExit(main())
