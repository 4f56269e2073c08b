#!/usr/bin/env python3
"""Profile the bus server with py-spy while bench_server's load runs against it.

Starts `agent-bus serve` on a fresh SQLite file, attaches `py-spy record` (a sampling
profiler; PyPI py-spy, in the dev extras) to it, runs the latency loop and the 8-client
burst with a parked receiver, and prints the functions that hold the most samples
(inclusive, and where the samples fall: self). With --out FILE, also writes py-spy's
collapsed stacks there (for a flame graph: speedscope, inferno).

    python bench/profile_server.py [--top 40] [--out stacks.txt]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_server import CLIENTS, PER_CLIENT, bus_server  # noqa: E402
from harness.load import measure_followed_throughput, measure_latency  # noqa: E402


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.path.exists(found):
        raise SystemExit("py-spy is not installed: pip install py-spy (the dev extras)")
    return found


def summary(stacks: Path, top: int) -> None:
    inclusive: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    total = 0
    for line in stacks.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        samples = int(count)
        total += samples
        for frame in set(frames):
            inclusive[frame] += samples
        own[frames[-1]] += samples
    for title, counter in (("inclusive", inclusive), ("self", own)):
        print(f"\n{title} (of {total} samples):")
        for frame, samples in counter.most_common(top):
            print(f"  {samples / total:6.1%}  {frame}")


async def load(url: str) -> None:
    await measure_latency(url, 300)
    await measure_followed_throughput(url, CLIENTS, PER_CLIENT, "tp")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="profile-bus-") as folder:
        stacks = args.out or Path(folder) / "stacks.txt"
        with bus_server() as (url, pid):
            recorder = subprocess.Popen(
                [py_spy(), "record", "--pid", str(pid), "--rate", "500", "--format", "raw",
                 "--threads", "--gil", "--output", str(stacks)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                asyncio.run(load(url))
            finally:
                recorder.send_signal(signal.SIGINT)
                _, errors = recorder.communicate(timeout=60)
        if not stacks.exists():
            raise SystemExit(f"py-spy wrote nothing:\n{errors[-2000:]}")
        summary(stacks, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
