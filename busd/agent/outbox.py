"""The outbox: every file dropped in outbox/ is sent exactly once.

A file's life: outbox/ -> claimed/ -> sent/ (or failed/ with a .error file).

- The watcher reacts only to a finished file: close-after-write (`echo hi > f`) or
  moved-in (`mv f outbox/dell/`), never to a bare create. A folder that appears in
  outbox/ is scanned, since files can land in it before its watch exists.
- The claim gives the file a unique, stable name in claimed/ (same subfolder as in
  outbox/). The idempotency key comes from that name, so a resend after any crash is
  a no-op on the bus.
- The claim is a hard link into claimed/ and an unlink from outbox/, not rename():
  a rename out of a watched folder reaches watchdog as an unpaired IN_MOVED_FROM, and
  watchdog holds back every later event for 0.5 s while it waits for the other half.
  Two steps open one crash window (both names exist); at start, an outbox file that
  is the same inode as a claimed one is only unlinked, never sent again.
- Transient failures (network, 5xx, 429, and credential or routing errors that are
  not the file's fault) are retried with capped backoff for as long as it takes;
  the bus refusing the message itself (400, 413) moves the file to failed/.
"""
from __future__ import annotations

import errno
import logging
import os
import queue
import stat
import threading
import time
from dataclasses import dataclass
from typing import Callable

from watchdog.events import (DirCreatedEvent, DirMovedEvent, FileClosedEvent, FileMovedEvent,
                             FileSystemEvent, FileSystemEventHandler)

from ..client import BusClient, BusClientError
from ..fileio import fsync_dir, write_atomically
from ..receive import Backoff
from .spool import (BadDrop, SpoolLayout, claimed_name, fit_name, idempotency_key,
                    is_being_written, new_token, outbox_place, parse_drop, read_drop_file,
                    shown_path, split_claimed_name)

log = logging.getLogger("busd.agent.outbox")

# Statuses by which the bus refuses the message itself; anything else is retried.
REFUSES_THE_MESSAGE = frozenset({400, 409, 413, 422})

WATCHED_EVENTS = [FileClosedEvent, FileMovedEvent, DirCreatedEvent, DirMovedEvent]


@dataclass(frozen=True)
class OutboxSettings:
    sender: str                      # our agent name: the `from` of every message
    channel: str                     # the channel when a drop names none
    max_msg_bytes: int
    settle_seconds: float = 1.0      # a file found by a scan must be this still before it goes
    rescan_seconds: float = 30.0     # safety scan for events the kernel dropped
    senders: int = 8                 # sends in flight at once


def start_observer(layout: SpoolLayout, work: "queue.Queue") -> object:
    """A running watchdog observer that feeds `work` with ("file"|"dir", path) items."""
    try:
        from watchdog.observers.inotify import InotifyObserver
        # Full events: a file moved in from outside arrives as a move, not as a create.
        observer = InotifyObserver(generate_full_events=True)
    except ImportError:  # not Linux
        from watchdog.observers import Observer
        observer = Observer()
    observer.schedule(OutboxEvents(layout.outbox, work), layout.outbox, recursive=True,
                      event_filter=WATCHED_EVENTS)
    observer.start()
    return observer


class OutboxEvents(FileSystemEventHandler):
    """Watchdog's thread calls this; it only queues work for the sender thread."""

    def __init__(self, outbox: str, work: "queue.Queue"):
        self.outbox = outbox
        self.work = work

    def on_closed(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.work.put(("file", os.fsdecode(event.src_path)))

    def on_moved(self, event: FileSystemEvent) -> None:
        dest = os.fsdecode(event.dest_path)
        if dest and _is_under(dest, self.outbox):
            self.work.put(("dir" if event.is_directory else "file", dest))

    def on_created(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            self.work.put(("dir", os.fsdecode(event.src_path)))


def _walk(folder: str):
    """Every file below `folder`, dotfiles and dot-folders left out."""
    for parent, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith("."):
                yield os.path.join(parent, name)


def _is_under(path: str, folder: str) -> bool:
    return path.startswith(folder + os.sep)


class OutboxSender:
    """Claims and sends; owns claimed/, sent/ and failed/.

    One dispatcher thread turns events and scans into claims, in drop order, and
    hands each claimed file to one of `senders` threads. Several sends in flight let
    the bus commit them together; the price is that files dropped at the same moment
    may reach the bus in a different order (each still exactly once).
    """

    def __init__(self, layout: SpoolLayout, make_client: Callable[[], BusClient],
                 settings: OutboxSettings, work: "queue.Queue", stop: threading.Event,
                 backoff_factory: Callable[[], Backoff] = lambda: Backoff(0.25, 5.0)):
        self.layout = layout
        self.make_client = make_client
        self.settings = settings
        self.work = work
        self.stop = stop
        self.backoff_factory = backoff_factory
        self.started = threading.Event()
        self._deferred: dict[str, tuple[float, int]] = {}   # path -> (deadline, mtime_ns)
        self._claimed_folders: set[str] = set()
        # Small, so a bus that is down stops the claiming: files wait in outbox/.
        self._to_send: queue.Queue = queue.Queue(maxsize=settings.senders)
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._dispatch, name="agent-outbox",
                                          daemon=True)]
        self._threads += [threading.Thread(target=self._send_loop, args=(self.make_client(),),
                                           name=f"agent-send-{n}", daemon=True)
                          for n in range(1, self.settings.senders + 1)]
        for thread in self._threads:
            thread.start()

    def dead_threads(self) -> list[str]:
        return [t.name for t in self._threads if not t.is_alive()]

    def join(self) -> None:
        """After `stop`: the files in flight are finished (or left claimed) when this returns."""
        self.work.put(None)
        for thread in self._threads:
            thread.join()

    # -- the dispatcher ----------------------------------------------------

    def _dispatch(self) -> None:
        self._complete_half_done_claims()
        self.started.set()
        # Token names start with the claim time, so this is claim order.
        for path in sorted(_walk(self.layout.claimed), key=os.path.basename):
            log.info("finishing %s, claimed before a restart", shown_path(self.layout, path))
            self._hand_over(path)
        self._scan(self.layout.outbox, quiet_for=self.settings.settle_seconds)
        next_rescan = time.monotonic() + self.settings.rescan_seconds
        while not self.stop.is_set():
            now = time.monotonic()
            wake = min([next_rescan] + [deadline for deadline, _ in self._deferred.values()])
            try:
                item = self.work.get(timeout=max(0.0, wake - now))
            except queue.Empty:
                item = None
            try:
                if item is not None:
                    kind, path = item
                    if kind == "file":
                        self._take(path)
                    else:
                        self._scan(path, quiet_for=self.settings.settle_seconds)
                self._take_deferred()
                if time.monotonic() >= next_rescan:
                    next_rescan = time.monotonic() + self.settings.rescan_seconds
                    self._scan(self.layout.outbox, quiet_for=self.settings.rescan_seconds)
            except Exception:  # noqa: BLE001
                # Never die on one file: whatever it was stays in outbox/ or claimed/
                # and is tried again by the next scan or start.
                log.exception("unexpected error while handling %s; carrying on", item)

    def _hand_over(self, claimed: str) -> None:
        while not self.stop.is_set():
            try:
                self._to_send.put(claimed, timeout=0.2)
                return
            except queue.Full:
                continue
        # Stopping: it stays in claimed/ and is sent at the next start.

    def _send_loop(self, client: BusClient) -> None:
        try:
            while not self.stop.is_set():
                try:
                    claimed = self._to_send.get(timeout=0.2)
                except queue.Empty:
                    continue
                try:
                    self._deliver(client, claimed)
                except Exception:  # noqa: BLE001
                    log.exception("unexpected error while sending %s; it stays claimed and is "
                                  "tried again at the next start",
                                  shown_path(self.layout, claimed))
        finally:
            client.close()

    def _complete_half_done_claims(self) -> None:
        """Unlink outbox files that a crash left linked into claimed/ (or failed/) too,
        and the temp file of a .error that was being written."""
        for name in os.listdir(self.layout.failed):
            if name.startswith(".") and name.endswith(".tmp"):
                os.unlink(os.path.join(self.layout.failed, name))
        taken = set()
        for folder in (self.layout.claimed, self.layout.failed):
            for path in _walk(folder):
                info = os.lstat(path)
                taken.add((info.st_dev, info.st_ino))
        for path in _walk(self.layout.outbox):
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                continue
            if (info.st_dev, info.st_ino) in taken:
                os.unlink(path)

    def _scan(self, folder: str, quiet_for: float) -> None:
        """Take the files in `folder` that no event announced: at start, in a new folder,
        and as a safety net for events the kernel dropped.

        No close event vouches for these, so each is checked for a writer first (see
        is_being_written). Where the system cannot tell, a file is taken only once it has
        not changed for `quiet_for` seconds.
        """
        found = []
        for path in _walk(folder):
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                continue
            found.append((info.st_mtime_ns, path))
        for mtime_ns, path in sorted(found):
            if path in self._deferred:
                continue
            age = (time.time_ns() - mtime_ns) / 1e9
            if is_being_written(path) is None and age < quiet_for:
                self._defer(path, mtime_ns, quiet_for - max(age, 0.0))
            else:
                self._take(path)

    def _defer(self, path: str, mtime_ns: int, delay: float) -> None:
        self._deferred[path] = (time.monotonic() + delay, mtime_ns)

    def _take_deferred(self) -> None:
        now = time.monotonic()
        for path, (deadline, mtime_ns) in sorted(self._deferred.items(), key=lambda kv: kv[1]):
            if deadline > now or self.stop.is_set():
                continue
            del self._deferred[path]
            try:
                current = os.lstat(path).st_mtime_ns
            except FileNotFoundError:
                continue  # taken through its event meanwhile, or removed
            if current != mtime_ns and is_being_written(path) is None:
                self._defer(path, current, self.settings.settle_seconds)
            else:
                self._take(path)

    # -- one file ----------------------------------------------------------

    def _take(self, path: str) -> None:
        """Claim and send one file of the outbox, unless it is not ready or not a drop."""
        self._deferred.pop(path, None)
        if self.stop.is_set():
            return  # stopping: claim nothing new; it is sent at the next start
        try:
            place = outbox_place(self.layout.outbox, path)
        except BadDrop as exc:
            self._fail_unclaimed(path, str(exc))
            return
        if place is None:
            return
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return  # an event and a scan both saw it, and it is already taken
        if stat.S_ISDIR(info.st_mode):
            return
        if is_being_written(path):
            # Someone still holds it open for writing: its close event will come.
            # Checked again after a while too, in case that event was lost.
            self._defer(path, info.st_mtime_ns, self.settings.settle_seconds)
            return
        claimed = self._claim(path, place)
        if claimed is not None:
            self._hand_over(claimed)

    def _claim(self, path: str, place: tuple[str | None, str]) -> str | None:
        folder, name = place
        target_folder = self.layout.claimed if folder is None else os.path.join(
            self.layout.claimed, folder)
        if target_folder not in self._claimed_folders:
            os.makedirs(target_folder, mode=0o700, exist_ok=True)
            self._claimed_folders.add(target_folder)
        target = os.path.join(target_folder, claimed_name(new_token(), name))
        if not self._link_then_unlink(path, target):
            return None
        return target

    @staticmethod
    def _link_then_unlink(path: str, target: str) -> bool:
        """Move `path` to `target` as link + unlink (see the module docstring); False if gone."""
        try:
            os.link(path, target, follow_symlinks=False)
        except FileNotFoundError:
            return False  # already taken (an event and a scan both saw it), or removed
        except IsADirectoryError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
                raise
            # No hard links here (some FUSE filesystems): a plain rename still claims.
            try:
                os.rename(path, target)
            except FileNotFoundError:
                return False
            return True
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return True

    # -- the senders -------------------------------------------------------

    def _deliver(self, client: BusClient, claimed: str) -> None:
        """Send one claimed file; it ends in sent/ or failed/, or stays claimed if we stop.

        The first attempt is made even when stopping: that is the file in flight.
        """
        backoff = self.backoff_factory()
        while True:
            try:
                self._deliver_once(client, claimed, backoff)
                return
            except OSError as exc:
                # Our own disk trouble (full, read-only): not the file's fault; retry it.
                if self.stop.is_set():
                    return
                delay = backoff.delay()
                log.error("cannot finish %s: %s; retrying in %gs",
                          shown_path(self.layout, claimed), exc, delay)
                self.stop.wait(delay)

    def _deliver_once(self, client: BusClient, claimed: str, backoff: Backoff) -> None:
        if not os.path.lexists(claimed):
            return
        folder = os.path.relpath(os.path.dirname(claimed), self.layout.claimed)
        folder = None if folder == "." else folder
        token, original = split_claimed_name(os.path.basename(claimed)) or (None, None)
        if token is None:
            self._fail(claimed, "not a claim this daemon made (the name has no claim "
                                "token); drop it in outbox/ instead of claimed/")
            return
        try:
            data = read_drop_file(claimed, self.settings.max_msg_bytes)
            drop = parse_drop(data, folder, self.settings.channel, self.settings.max_msg_bytes)
        except BadDrop as exc:
            self._fail(claimed, str(exc))
            return
        key = drop.key or idempotency_key(token)
        while True:
            try:
                ack = client.send(self.settings.sender, drop.to, drop.body,
                                  channel=drop.channel, key=key, meta=drop.meta)
                break
            except BusClientError as exc:
                if exc.status in REFUSES_THE_MESSAGE:
                    self._fail(claimed, f"the bus refused it: {exc}")
                    return
                if self.stop.is_set():
                    log.info("stopping: %s stays claimed and is sent at the next start",
                             shown_path(self.layout, claimed))
                    return
                delay = backoff.delay(exc.retry_after)
                hint = ""
                if exc.status in (401, 403):
                    hint = " (check AGENT_BUS_TOKEN and the agent name)"
                log.warning("cannot send %s yet: %s%s; retrying in %gs",
                            shown_path(self.layout, claimed), exc, hint, delay)
                if self.stop.wait(delay):
                    log.info("stopping: %s stays claimed and is sent at the next start",
                             shown_path(self.layout, claimed))
                    return
        self._mark_sent(claimed, ack, drop.to, token, original)

    def _mark_sent(self, claimed: str, ack: dict, to: str, token: str, original: str) -> None:
        # An older rapid server answers no id; the name still records its ts.
        ts, message_id = float(ack["ts"]), ack.get("id", "x")
        prefix = f"{ts:.6f}-{message_id}-{to}-"
        target = os.path.join(self.layout.sent, fit_name(prefix, original))
        if os.path.lexists(target):
            # Same id and ts from the bus for a different claim: two drops with one `key:`.
            target = os.path.join(self.layout.sent, fit_name(prefix, original, "." + token))
        os.rename(claimed, target)
        duplicate = " (a duplicate of an earlier send: the bus kept the first)" \
            if ack.get("duplicate") else ""
        log.info("sent %s to %s as id %s%s", original, to, message_id, duplicate)

    def _fail(self, claimed: str, reason: str) -> None:
        name = os.path.basename(claimed)
        folder = os.path.relpath(os.path.dirname(claimed), self.layout.claimed)
        split = split_claimed_name(name)
        original = split[1] if split else name
        dropped_as = os.path.normpath(os.path.join("outbox", folder, original))
        self._write_error(name, dropped_as, reason)
        os.rename(claimed, os.path.join(self.layout.failed, name))
        fsync_dir(self.layout.failed)
        log.warning("not sent, moved to failed/%s: %s", name, reason)

    def _fail_unclaimed(self, path: str, reason: str) -> None:
        name = claimed_name(new_token(), os.path.basename(path))
        self._write_error(name, shown_path(self.layout, path), reason)
        if self._link_then_unlink(path, os.path.join(self.layout.failed, name)):
            log.warning("not sent, moved to failed/%s: %s", name, reason)
        else:
            os.unlink(os.path.join(self.layout.failed, name + ".error"))

    def _write_error(self, name: str, dropped_as: str, reason: str) -> None:
        text = (f"{reason}\n"
                f"\n"
                f"dropped as: {dropped_as}\n"
                f"failed at:  {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n"
                f"To send it after all, fix it and move it back into outbox/<to>/.\n")
        # A file name need not be UTF-8; its bytes are shown escaped.
        write_atomically(os.path.join(self.layout.failed, name + ".error"),
                         text.encode("utf-8", "backslashreplace"))
