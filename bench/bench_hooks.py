#!/usr/bin/env python3
"""Benchmark: how long a Claude Code hook takes, as Claude Code runs it.

Each run is the plugin's UserPromptSubmit command from claude-code/hooks/hooks.json
(its launcher, then Python), with the hook's JSON on stdin and the plugin's options in
the environment (harness/claude.py), timed from spawn to exit:

  - empty inbox, a daemon filing for the agent: the common case, every prompt and
    tool call (the target: p50 <= 50 ms);
  - empty inbox, no daemon: the hook asks the bus one question over a plain socket
    (client.nothing_waits; the same target);
  - 100 messages waiting (filed by the daemon): the hook shows the first 8 KB, reports
    them read, and the rest waits (the inbox is refilled before each run).

Bounded: a fixed number of runs, each with a timeout.

    python bench/bench_hooks.py [--runs 40]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from busd.agent.spool import SpoolLayout  # noqa: E402
from busd.mailbox import Mailbox  # noqa: E402
from harness.agents import AgentProcess, inbox_files  # noqa: E402
from harness.bus import BusServer, wait_until  # noqa: E402
from harness.claude import run_hook  # noqa: E402


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return (f"p50 {statistics.median(ordered) * 1000:6.1f} ms   p99 {p99 * 1000:6.1f} ms   "
            f"({len(ordered)} runs)")


def timed(options: dict, cwd: str, spool: Path, expect_context: bool) -> float:
    started = time.perf_counter()
    result = run_hook("UserPromptSubmit", options, cwd=cwd, spool=spool)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    assert (result.reply is not None) == expect_context, result.stdout
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spool = root / "spool"
        with BusServer(root / "bus.db", "--hold", "5") as bus:
            options = {"bus_url": bus.url, "agent_name": "dell"}
            with AgentProcess("dell", spool, bus.url) as daemon:
                timed(options, tmp, spool, False)   # the first look, then the fast path
                empty = [timed(options, tmp, spool, False) for _ in range(args.runs)]
                print(f"empty inbox, daemon running:  {percentiles(empty)}")

                waiting = []
                layout = SpoolLayout.for_agent(str(spool), "dell")
                for _ in range(max(5, args.runs // 4)):
                    before = len(inbox_files(layout))
                    unread = len(Mailbox("dell", str(spool)).unread())
                    for n in range(100 - unread):
                        bus.send("spark", "dell", f"message {n}: " + "z" * 200)
                    wait_until(lambda: len(inbox_files(layout)) >= before + 100 - unread, 30,
                               what="the daemon to file the messages")
                    waiting.append(timed(options, tmp, spool, True))
                print(f"100 waiting, daemon running:  {percentiles(waiting)}")
                assert daemon.stop() == 0

            # No daemon: each hook asks the bus (and would file what it finds).
            for _ in range(50):   # show what the daemon left unread first
                if run_hook("UserPromptSubmit", options, cwd=tmp, spool=spool).reply is None:
                    break
            no_daemon = [timed(options, tmp, spool, False) for _ in range(args.runs)]
            print(f"empty inbox, no daemon:       {percentiles(no_daemon)}")
            assert bus.stop() == 0


if __name__ == "__main__":
    main()
