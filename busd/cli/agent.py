"""`agent-bus agent`: an agent's daemon, which turns its spool folder into its mailbox."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from .. import logs, model
from ..agent.checks import CHECK_SECONDS
from ..agent.daemon import AgentConfig, AgentDaemon
from ..agent.spool import AgentLocked
from ..notify import Notifier
from . import EXIT_USAGE, CommandError, Env, bounded, channel_option, command, name_argument

SHARED_SEPARATOR = ":"   # AGENT_BUS_SHARED lists folders as PATH lists them


def register(commands: argparse._SubParsersAction) -> None:
    agent = command(commands, "agent", _agent)
    name_argument(agent)
    channel_option(agent, "channel to receive on, '*' for all, and to send on when a drop "
                          "names none (default $AGENT_BUS_CHANNEL or 'default')", "C")
    agent.add_argument("--max-msg-bytes", type=bounded(int, 1), default=model.DEFAULT_MAX_MSG_BYTES,
                       metavar="N", help="a drop whose body is larger goes to failed/ (default 65536)")
    agent.add_argument("--senders", type=bounded(int, 1, 64), default=8, metavar="N",
                       help="files sent at once (default 8); 1 keeps strict drop order even "
                            "within a burst, at a lower rate")
    agent.add_argument("--shared", action="append", default=None, metavar="DIR",
                       help="a folder shared with the senders (repeat for more): handoffs of "
                            "files under it are checked on arrival; every other handoff is "
                            "'not checked' (default $AGENT_BUS_SHARED, ':'-separated; none)")
    agent.add_argument("--check-seconds", type=bounded(float, 0, 86400, low_ok=False),
                       default=CHECK_SECONDS, metavar="S",
                       help="the most time one handoff's check may take (default "
                            f"{CHECK_SECONDS:g}); a slower one is 'not checked'")


def shared_roots(folders: list[str], source: str, relative_ok: bool) -> tuple[str, ...]:
    """The shared roots as the daemon takes them: absolute, normalized, each once."""
    roots: list[str] = []
    for folder in folders:
        if not folder:
            continue
        if SHARED_SEPARATOR in folder or any(c in folder for c in "\n\r\0"):
            raise CommandError(f"{source}: {folder!r} holds a ':' or a line break, which "
                               "AGENT_BUS_SHARED cannot carry; share it under another path",
                               EXIT_USAGE)
        if not os.path.isabs(folder) and not relative_ok:
            raise CommandError(f"{source}: {folder!r} is not an absolute path; write the "
                               "shared folders as /abs/path:/other/path", EXIT_USAGE)
        root = os.path.normpath(os.path.abspath(folder))
        if root not in roots:
            roots.append(root)
    return tuple(roots)


def _agent(args: argparse.Namespace, env: Env) -> int:
    """run NAME's daemon: send the outbox, fill the inbox

    Turn NAME's spool folder ($AGENT_BUS_SPOOL/NAME, see spool/README.md) into its mailbox:
    every file dropped in outbox/ is sent exactly once, every message for NAME becomes a
    0600 file in inbox/ and a block in inbox.log, also printed on stdout. Logs go to stderr.
    The first SIGTERM finishes the file in flight and exits 0."""
    name = env.agent_name(args.name)
    channel = env.reading_channel(args.channel)
    if args.shared is not None:
        shared = shared_roots(args.shared, "--shared", relative_ok=True)
    else:
        shared = shared_roots(env.shared.split(SHARED_SEPARATOR), "AGENT_BUS_SHARED",
                              relative_ok=False)
    env.client().close()  # fails early, with the usual message, if AGENT_BUS_URL is unset
    env.mailbox(name).layout   # a name no folder can have fails here
    os.umask(0o077)
    logs.setup(f"agent-bus agent {name}")
    logging.getLogger("busd.agent").info(
        "handoffs are checked under: %s", ", ".join(shared) if shared else
        "no folder (none is shared: every handoff is 'not checked')")
    config = AgentConfig(name=name, spool_root=env.spool_root, channel=channel,
                         max_msg_bytes=args.max_msg_bytes, senders=args.senders,
                         shared=shared, check_seconds=args.check_seconds)
    daemon = AgentDaemon(config, env.client,
                         Notifier(env.notify_socket, env.watchdog_usec, env.watchdog_pid),
                         out=sys.stdout)

    def on_signal(signum: int, _frame: object) -> None:
        if daemon.stop.is_set():
            # Asked twice: leave now. The spool is consistent at every instant.
            os._exit(128 + signum)
        daemon.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return daemon.run()
    except AgentLocked as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    except OSError as exc:
        # Before the loops run: the spool folder cannot be made or opened.
        raise CommandError(f"cannot use the spool folder {daemon.layout.root}: {exc}",
                           EXIT_USAGE) from None
