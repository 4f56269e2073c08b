"""Per-agent request budgets: a token bucket per name, refilled continuously."""
from __future__ import annotations

import time


class RateLimiter:
    """`rate` requests per second on average, bursts up to `burst`; rate 0 means no limit."""

    MAX_TRACKED = 100_000   # names tracked at once; the idlest are forgotten first

    def __init__(self, rate: float, burst: float):
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._buckets: dict[str, tuple[float, float]] = {}

    def retry_after(self, name: str, now: float | None = None) -> float | None:
        """Take one request from `name`'s budget: None if allowed, else seconds to wait."""
        if self.rate <= 0:
            return None
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(name, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[name] = (tokens - 1.0, now)
            allowed = None
        else:
            self._buckets[name] = (tokens, now)
            allowed = (1.0 - tokens) / self.rate
        if len(self._buckets) > self.MAX_TRACKED:
            # Dicts keep insertion order and every use re-inserts: the first is the idlest.
            del self._buckets[next(iter(self._buckets))]
        return allowed
