"""Handoff checks on arrival, beside filing and never in its way, and their reports.

HandoffChecker: the inbox writer files a handoff at once, with `handoff: checking`
and a marker in checking/ (inbox.py); this thread of its own takes the markers,
oldest first, checks each handoff under the shared roots (handoff.check_shared:
regular files only, never blocking, at most the announced bytes, within a time
budget), and has the writer record the result. Markers are the queue: memory
stays bounded however many handoffs wait, and a crash or a stop loses none (the
next start checks what is left). A stop interrupts a check between two reads.

CheckReporter: what the daemon found goes to the bus (POST /handoff-checks), so
the operator's console and the sender's `status` see it: only verified, mismatch
or not checked, never why. A slow or unreachable bus never holds up filing: a
report that fails for a passing reason is tried again with backoff a few times,
then dropped with a log line; one the bus refuses (an older bus without the
route, a message it no longer has) is dropped at once. The inbox file keeps the
result either way.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Callable

from .. import handoff
from ..client import BusClient, BusClientError
from ..receive import Backoff
from .inbox import InboxWriter

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


CHECK_SECONDS = 60.0    # default time budget of one handoff's check (all its files)
MARKERS_AT_ONCE = 1000  # markers read per look into checking/
RETRY_SECONDS = 5.0     # after the disk refused to record a check


class HandoffChecker:
    """The thread that checks the handoffs marked in checking/, one at a time."""

    def __init__(self, writer: InboxWriter, roots: tuple[str, ...], stop: threading.Event,
                 reporter: CheckReporter | None = None, budget: float = CHECK_SECONDS):
        self.writer = writer
        self.roots = roots
        self.stop = stop
        self.reporter = reporter
        self.budget = budget
        self._wake = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="agent-handoff-checker",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """New markers are waiting: look into checking/ again."""
        self._wake.set()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 2.0) -> None:
        """Stop after the read in progress. A check cut short keeps its marker for the
        next start. A read that hangs in the kernel (a dead network mount) is left
        behind: the thread is a daemon thread and does not hold up the exit."""
        self._closing = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _done(self) -> bool:
        return self._closing or self.stop.is_set()

    def _run(self) -> None:
        try:
            # Hashing a big file must not slow filing: on Linux this lowers this thread's
            # CPU priority only (a thread id is a pid to setpriority).
            me = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, me, min(19, os.getpriority(os.PRIO_PROCESS, me) + 10))
        except (OSError, AttributeError):
            pass
        pending: list[str] = []
        while not self._done():
            if not pending:
                self._wake.clear()
                pending = self.writer.pending_checks(MARKERS_AT_ONCE)
                if not pending:
                    self._wake.wait()
                    continue
            name = pending.pop(0)
            try:
                self._check(name)
            except handoff.Stopped:
                return
            except OSError as exc:
                log.warning("cannot record the check of %s (%s); trying again in %gs", name,
                            exc, RETRY_SECONDS)
                pending = []
                self.stop.wait(RETRY_SECONDS)
            except Exception:  # noqa: BLE001 - one bad check must not end the others
                log.exception("the check of %s failed; it stays `checking` until the next "
                              "start", name)

    def _check(self, name: str) -> None:
        job = self.writer.files_to_check(name)
        if job is None:
            return
        check = job if isinstance(job, handoff.Check) else handoff.check_shared(
            job, self.roots, self.budget, self._done)
        message_id = self.writer.record_check(name, check)
        if message_id is not None and self.reporter is not None:
            self.reporter.report([(message_id, check.result)])
