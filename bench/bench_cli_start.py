#!/usr/bin/env python3
"""Benchmark how fast the `agent-bus` command starts: whole-process wall times.

Runs, as fresh processes, the installed entry point's own two lines (`from busd.cli import
main`) on this checkout, and `python -c pass` as the floor (the interpreter alone, with
the same site-packages):

  --version   what a launcher asks to find the program
  drop        a 200-byte body from stdin into an agent's outbox (a fresh spool folder)
  inbox       list an inbox holding 20 messages

Each is run --runs times (alternating, after one warm-up each, which also writes this
checkout's bytecode, as pip does for an installed copy); prints medians and p90.
The goal (issue 19): each at most 50 ms.

    python bench/bench_cli_start.py [--runs 10]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from busd.agent.inbox import Filing  # noqa: E402
from busd.agent.spool import SpoolLayout  # noqa: E402
from busd.fileio import write_atomically  # noqa: E402

ENTRY_POINT = "import sys; from busd.cli import main; sys.exit(main())"
GOAL_MS = 50.0


def fill_inbox(spool_root: str, name: str, count: int) -> None:
    """`count` messages in `name`'s inbox, named and written as the daemon files them."""
    layout = SpoolLayout.for_agent(spool_root, name)
    os.makedirs(layout.inbox, mode=0o700, exist_ok=True)
    for number in range(1, count + 1):
        filing = Filing(id=number, ts=1.7e9 + number, sender="peer", body="hello " * 30,
                        head=[f"id: {number}", "from: peer", f"to: {name}", "channel: default"])
        write_atomically(os.path.join(layout.inbox, filing.name), filing.file_bytes())


def timed(cmd: list[str], env: dict[str, str], stdin: bytes) -> float:
    started = time.perf_counter()
    # cwd: `python -c` puts the working folder first on sys.path.
    done = subprocess.run(cmd, input=stdin, capture_output=True, env=env, timeout=30, cwd=REPO)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{cmd[-2:]} failed ({done.returncode}): {done.stderr.decode()[-500:]}")
    return elapsed * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as spool:
        fill_inbox(spool, "reader", 20)
        env = {**os.environ, "PYTHONPATH": str(REPO), "AGENT_BUS_SPOOL": spool,
               "AGENT_NAME": "reader", "AGENT_BUS_URL": "http://127.0.0.1:9"}
        # As on an installed copy, whose modules pip compiled: the warm-up run writes this
        # checkout's bytecode (__pycache__), which the measured runs read.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        agent_bus = [sys.executable, "-c", ENTRY_POINT]
        cases = {
            "python -c pass (floor)": ([sys.executable, "-c", "pass"], b""),
            "agent-bus --version": ([*agent_bus, "--version"], b""),
            "agent-bus drop": ([*agent_bus, "drop", "peer"], b"x" * 200),
            "agent-bus inbox": ([*agent_bus, "inbox"], b""),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for name, (cmd, stdin) in cases.items():
            timed(cmd, env, stdin)  # warm the page cache, write the bytecode
        for _ in range(args.runs):
            for name, (cmd, stdin) in cases.items():
                times[name].append(timed(cmd, env, stdin))
    floor = statistics.median(times["python -c pass (floor)"])
    print(f"whole-process wall time, median of {args.runs} (p90):")
    met = True
    for name, values in times.items():
        median = statistics.median(values)
        p90 = sorted(values)[min(len(values) - 1, round(0.9 * (len(values) - 1)))]
        goal = ""
        if name != "python -c pass (floor)":
            ok = median <= GOAL_MS
            met &= ok
            goal = f"   +{median - floor:.1f} ms over the floor; goal <= {GOAL_MS:.0f} ms " \
                   f"{'met' if ok else 'MISSED'}"
        print(f"  {name:24} {median:6.1f} ms ({p90:.1f}){goal}")
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
