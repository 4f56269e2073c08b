"""Logging set-up for the long-running commands: one line per record on stderr, each
starting with who says it (`agent-bus agent spark: ...`), as journald shows them."""
from __future__ import annotations

import logging
import sys


def setup(prefix: str, level: int = logging.INFO,
          filters: dict[str, logging.Filter] | None = None) -> None:
    """Send records at `level` and above to stderr; `filters`: logger name -> filter."""
    logging.basicConfig(level=level, stream=sys.stderr, format=f"{prefix}: %(message)s")
    logging.getLogger("watchdog").setLevel(logging.WARNING)   # its own chatter at INFO
    for name, log_filter in (filters or {}).items():
        logging.getLogger(name).addFilter(log_filter)
