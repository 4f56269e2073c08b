"""Handoff checks reported to the bus: fire-and-forget, never in the way of filing.

The inbox writer checks a handoff as it files it (inbox.py) and records the result
in the inbox file; the receive loop then hands the result here, and a thread of
its own tells the bus (POST /handoff-checks), so the operator's console and the
sender's `status` see it. A slow or unreachable bus never holds up filing: a
report that fails for a passing reason is tried again with backoff a few times,
then dropped with a log line; one the bus refuses (an older bus without the
route, a message it no longer has) is dropped at once. The inbox file keeps the
result either way.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

from ..client import Backoff, BusClient, BusClientError

log = logging.getLogger("busd.agent.checks")

QUEUE_LIMIT = 1000      # reports waiting; past that the newest are dropped (and said so)
ATTEMPTS = 6            # per report: about half a minute of backoff in all
_CLOSE = object()


class CheckReporter:
    def __init__(self, make_client: Callable[[], BusClient], name: str,
                 stop: threading.Event, backoff: Backoff | None = None):
        self.make_client = make_client
        self.name = name
        self.stop = stop
        self.backoff = backoff or Backoff(0.5, 10.0)
        self._queue: queue.Queue = queue.Queue(QUEUE_LIMIT)
        self._thread = threading.Thread(target=self._run, name="agent-handoff-checks",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def report(self, checks: list[tuple[int, str]]) -> None:
        """Queue (message id, result) pairs; returns at once."""
        for message_id, result in checks:
            try:
                self._queue.put_nowait((message_id, result))
            except queue.Full:
                log.warning("not reporting the check of handoff %d (%s) to the bus: %d reports "
                            "are already waiting; its inbox file has it", message_id, result,
                            QUEUE_LIMIT)

    def close(self, timeout: float = 2.0) -> None:
        """Stop once the reports already queued had a try each (`stop` cuts retries short)."""
        if not self._thread.is_alive():
            return
        try:
            self._queue.put_nowait(_CLOSE)
        except queue.Full:
            pass  # `stop` is set by now: the thread ends at its next look
        self._thread.join(timeout)

    def _run(self) -> None:
        client = self.make_client()
        try:
            while True:
                item = self._queue.get()
                if item is _CLOSE:
                    return
                self._send(client, *item)
        except Exception:  # noqa: BLE001 - a bug here must not take the daemon down
            log.exception("handoff-check reports stopped; checks stay in the inbox files")
        finally:
            client.close()

    def _send(self, client: BusClient, message_id: int, result: str) -> None:
        self.backoff.reset()
        for attempt in range(1, ATTEMPTS + 1):
            try:
                client.report_handoff_check(message_id, self.name, result)
                return
            except BusClientError as exc:
                if not exc.transient:
                    log.warning("the bus refused the check of handoff %d (%s): %s; not "
                                "reported (its inbox file has it)", message_id, result, exc)
                    return
                if attempt == ATTEMPTS or self.stop.is_set():
                    log.warning("could not report the check of handoff %d (%s) to the bus: "
                                "%s; dropped after %d tries (its inbox file has it)",
                                message_id, result, exc, attempt)
                    return
                if self.stop.wait(self.backoff.delay(exc.retry_after)):
                    return
