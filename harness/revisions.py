"""Benchmarking a revision side by side with this checkout: each tree runs a probe script
with its own code (busd and harness), in a process of its own."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from .bus import REPO

# The top of every probe: this tree's harness (or, in a revision from before the harness
# package, the same things where they were then), and the server's CPU time.
PROBE_PRELUDE = r'''
import os, sys
sys.path.insert(0, os.getcwd())
try:
    from harness.bus import BusServer
    from harness.load import KeepAliveClient, measure_latency, measure_throughput, percentile
except ImportError:
    from tests.support import BusServer
    from bench.bench_server import KeepAliveClient, measure_latency, measure_throughput, percentile

def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
'''


@contextlib.contextmanager
def worktree(revision: str) -> Iterator[Path]:
    """`revision` checked out into a temporary git worktree, removed after."""
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as folder:
        tree = Path(folder) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(tree),
                        revision], check=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                           check=False)


def probe(tree: Path, script: str, *args: str) -> dict:
    """Run `script` (after PROBE_PRELUDE) in `tree`; the JSON object it prints last."""
    done = subprocess.run([sys.executable, "-c", PROBE_PRELUDE + script, *args], cwd=tree,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(tree)})
    if done.returncode != 0:
        raise SystemExit(f"{tree}: the probe failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
