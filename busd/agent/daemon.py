"""`agent-bus agent NAME`: the outbox and inbox loops of one agent, run together.

Threads: watchdog's observer feeds the outbox's dispatcher, which hands claimed
files to its sender threads; the receive thread long-polls and files; the checker
checks handoffs beside it and the reporter tells the bus; the calling thread
supervises. It reports READY=1 once both loops run, WATCHDOG=1 only while every
thread is alive, and on `stop` it lets the sends in flight and the batch being
filed finish. A parked long-poll is simply abandoned: nothing has been filed from
it, and the cursor says where to pick up.
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, TextIO

from .. import model
from ..client import BusClient
from .checks import CHECK_SECONDS, CheckReporter, HandoffChecker
from .inbox import InboxWriter, ReceiveLoop
from ..notify import Notifier
from .outbox import OutboxSender, OutboxSettings, start_observer
from .spool import AgentLock, SpoolLayout

log = logging.getLogger("busd.agent")

EXIT_OK = 0
EXIT_TROUBLE = 1


@dataclass(frozen=True)
class AgentConfig:
    name: str
    spool_root: str
    channel: str = model.DEFAULT_CHANNEL   # read from; '*' = every channel
    max_msg_bytes: int = model.DEFAULT_MAX_MSG_BYTES
    settle_seconds: float = 1.0
    rescan_seconds: float = 30.0
    senders: int = 8
    # Handoffs are checked only under these folders (absolute, normalized); none: never.
    shared: tuple[str, ...] = ()
    check_seconds: float = CHECK_SECONDS

    @property
    def send_channel(self) -> str:
        """Where a drop that names no channel goes."""
        return model.DEFAULT_CHANNEL if self.channel == model.ALL_CHANNELS else self.channel


class AgentDaemon:
    def __init__(self, config: AgentConfig, make_client: Callable[[], BusClient],
                 notifier: Notifier | None = None, out: TextIO | None = None):
        self.config = config
        self.layout = SpoolLayout.for_agent(config.spool_root, config.name)
        self.make_client = make_client
        self.notifier = notifier or Notifier()
        self.out = out
        self.stop = threading.Event()

    def run(self) -> int:
        """Serve until `stop` is set (or something breaks); the exit code."""
        if hasattr(signal, "SIGIO") and threading.current_thread() is threading.main_thread():
            # spool.is_being_written holds a read lease for an instant; a writer opening
            # the file then makes the kernel send SIGIO, whose default is to end us.
            signal.signal(signal.SIGIO, signal.SIG_IGN)
        self.layout.create()
        lock = AgentLock(self.layout)
        lock.acquire()
        observer = None
        reporter = checker = None
        writer = InboxWriter(self.layout, self.config.channel, self.out,
                             roots=self.config.shared)
        try:
            writer.open()
            work: queue.Queue = queue.Queue()
            outbox = OutboxSender(self.layout, self.make_client, OutboxSettings(
                sender=self.config.name, channel=self.config.send_channel,
                max_msg_bytes=self.config.max_msg_bytes,
                settle_seconds=self.config.settle_seconds,
                rescan_seconds=self.config.rescan_seconds,
                senders=self.config.senders), work, self.stop)
            receive_client = self.make_client()
            reporter = CheckReporter(self.make_client, self.config.name, self.stop)
            checker = HandoffChecker(writer, self.config.shared, self.stop, reporter,
                                     self.config.check_seconds)
            writer.on_marked = checker.wake
            receiver = ReceiveLoop(writer, receive_client, self.config.name,
                                   self.config.channel, self.stop, reporter=reporter)
            receive_thread = threading.Thread(target=receiver.run, name="agent-inbox",
                                              daemon=True)
            # Watch before the first scan, so a file dropped in between is not missed.
            observer = start_observer(self.layout, work)
            outbox.start()
            reporter.start()
            checker.start()  # first the checks a stop or crash left in checking/
            receive_thread.start()
            while not outbox.started.wait(0.1) and not outbox.dead_threads():
                pass
            where = f"{self.layout.root} <-> {receive_client.url} (channel {self.config.channel})"
            log.info("ready: %s", where)
            self.notifier.ready(f"serving {where}")

            code = self._supervise(lambda: self._trouble(outbox, receive_thread, checker))

            log.info("stopping: finishing the files in flight")
            self.notifier.stopping()
            observer.stop()
            observer.join()
            observer = None
            outbox.join()
            # Not released: the receive thread must not start another batch as we exit.
            # A long-poll it has parked is abandoned; the cursor says where to resume.
            receiver.busy.acquire()
            log.info("stopped")
            return code
        finally:
            if checker is not None:
                checker.close()
            if reporter is not None:
                reporter.close()
            if observer is not None:
                observer.stop()
                observer.join()
            writer.close()
            lock.release()
            self.notifier.close()

    def _trouble(self, outbox: OutboxSender, receive_thread: threading.Thread,
                 checker: HandoffChecker) -> str | None:
        """What makes this daemon unfit to go on, if anything."""
        dead = outbox.dead_threads() + ([] if receive_thread.is_alive() else [receive_thread.name])
        if not checker.is_alive() and not self.stop.is_set():
            dead.append("handoff checker")
        if dead:
            return f"the {' and '.join(dead)} thread stopped unexpectedly"
        if not os.path.isdir(self.layout.outbox):
            return f"{self.layout.outbox} was removed, and its watch with it"
        return None

    def _supervise(self, trouble: Callable[[], str | None]) -> int:
        """Wait for `stop`, pinging the watchdog while all is well; exit 1 if it is not."""
        interval = self.notifier.watchdog_interval
        tick = min(1.0, interval) if interval else 1.0
        next_ping = time.monotonic()
        while not self.stop.wait(tick):
            problem = trouble()
            if problem:
                log.error("%s; exiting so that the daemon is started again (nothing is lost: "
                          "the spool is the state)", problem)
                self.stop.set()
                return EXIT_TROUBLE
            if interval and time.monotonic() >= next_ping:
                self.notifier.watchdog()
                next_ping = time.monotonic() + interval
        return EXIT_OK
