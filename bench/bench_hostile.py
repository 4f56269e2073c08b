#!/usr/bin/env python3
"""Benchmark: hostile clients must not starve a normal one.

Against one server, at once: slowloris connections (a request head trickled one
header a second), half-open connections (a body promised and never sent; requests
whose replies are never read), oversized headers, and a flood of 50 clients
sending as fast as they can. Meanwhile a normal client sends and polls every
20 ms. Reports whether all of its requests succeeded and their latency p50/p99.
Bounded: runs --seconds (default 10) and stops. The attack is harness/hostile.py.

    python bench/bench_hostile.py [--seconds 10] [--slowloris 300] [--flood 50]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.bus import BusServer  # noqa: E402
from harness.hostile import run  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--slowloris", type=int, default=300)
    parser.add_argument("--flood", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as folder:
        with BusServer(Path(folder) / "bus.db", "--body-timeout", "5") as bus:
            code = asyncio.run(run(bus.url, args.seconds, args.slowloris, args.flood))
            bus.stop()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
