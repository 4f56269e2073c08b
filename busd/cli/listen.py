"""`agent-bus listen`: the unattended poller that logs every message to files."""
from __future__ import annotations

import argparse
import os
import signal

from .. import listener
from . import (EXIT_OK, EXIT_USAGE, CommandError, Env, channel_option, command, name_argument,
               retry_report)


def register(commands: argparse._SubParsersAction) -> None:
    listen = command(commands, "listen", _listen)
    name_argument(listen, "recipient name")
    channel_option(listen, "channel, or '*' for all (default $AGENT_BUS_CHANNEL or 'default')")
    listen.add_argument("--dir", default=None,
                        help="folder for the logs, heartbeat and cursor (default "
                             "$AGENT_BUS_LISTEN_DIR or ~/.local/state/agent-bus/listen)")
    listen.add_argument("--full", default=None, metavar="FILE",
                        help="the full log (default <dir>/NAME@CHANNEL.jsonl)")
    listen.add_argument("--summary", default=None, metavar="FILE",
                        help="the summary log (default <dir>/NAME@CHANNEL.tsv)")
    listen.add_argument("--heartbeat", default=None, metavar="FILE",
                        help="the heartbeat file (default <dir>/NAME@CHANNEL.heartbeat)")
    listen.add_argument("--since", type=float, default=None,
                        help="start after this ts instead of the saved cursor")
    listen.add_argument("--once", action="store_true",
                        help="one poll (waiting up to the hold time), then exit")


def _listen(args: argparse.Namespace, env: Env) -> int:
    """log NAME's messages to files, unattended

    Long-poll the bus for NAME's messages and append each, exactly once, as one JSON line to
    the full log and as 'ts<TAB>from<TAB>first 120 characters' (newlines shown as ' | ') to
    the summary log; touch the heartbeat file after every poll. The files are
    <dir>/NAME@CHANNEL.jsonl, .tsv, .heartbeat and .cursor. Prints nothing; errors go to
    stderr and are retried."""
    name = env.agent_name(args.name)
    channel = args.channel or env.channel
    client = env.client()
    os.umask(0o077)
    paths = listener.ListenPaths.for_agent(args.dir or env.listen_dir, name, channel,
                                           full=args.full, summary=args.summary,
                                           heartbeat=args.heartbeat)
    # Stop at once, even inside a long-poll: the cursor moves only after a batch is
    # logged, and a restart resumes from the log's last line, so nothing is lost.
    signal.signal(signal.SIGTERM, _exit_quietly)

    log = listener.ListenLog(paths)
    since = args.since
    if since is None:
        log.prepare()
        try:
            since = log.resume_point()
        except ValueError as exc:  # a cursor file that holds no number
            raise CommandError(str(exc), EXIT_USAGE) from None
    listener.run(client, log, name, channel=channel, since=since, once=args.once,
                 on_error=retry_report("listen"))
    return EXIT_OK


def _exit_quietly(*_: object) -> None:
    raise SystemExit(EXIT_OK)
