"""`agent-bus drop`, `agent-bus inbox`: an agent's spool folder from the shell.

Kept apart from the daemon's command (cli/agent.py) so that these two, which agents and
hooks run often, import only the spool: they start in a few tens of milliseconds."""
from __future__ import annotations

import argparse
import os
import sys

from ..agent import spool
from ..agent.spool import BadDrop, SpoolLayout
from . import (EXIT_OK, EXIT_USAGE, CommandError, Env, channel_option, command, name_argument,
               sender_option)


def register(commands: argparse._SubParsersAction) -> None:
    drop = command(commands, "drop", _drop)
    drop.add_argument("to", help="recipient name, or '*' for everyone on the channel")
    channel_option(drop, "channel (default: the daemon's channel)")
    sender_option(drop, "whose outbox")

    inbox = command(commands, "inbox", _inbox)
    name_argument(inbox)
    inbox.add_argument("--read", type=int, default=None, metavar="ID",
                       help="print the message with this id, and tell the bus it was read")
    inbox.add_argument("--body", action="store_true",
                       help="with --read: print only the body, byte for byte")


def _drop(args: argparse.Namespace, env: Env) -> int:
    """drop stdin into the outbox, for the daemon to send to TO

    Write standard input, byte for byte, into $AGENT_NAME's outbox as one file addressed to
    TO ('*' for everyone on the channel), atomically. Prints the file's path. The daemon
    (agent-bus agent) sends it; it need not be running yet."""
    # The spool folder alone: a drop needs no mailbox (nor its imports).
    try:
        layout = SpoolLayout.for_agent(env.spool_root, env.agent_name(args.sender))
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    body = sys.stdin.buffer.read()
    os.umask(0o077)
    try:
        # The size limit is the daemon's to apply (it may be raised there).
        path = spool.drop(layout, args.to, body, args.channel, max_msg_bytes=sys.maxsize)
    except BadDrop as exc:
        raise CommandError(f"not dropped: {exc}", EXIT_USAGE) from None
    except OSError as exc:
        raise CommandError(f"not dropped: cannot write into {layout.outbox}: {exc}",
                           EXIT_USAGE) from None
    print(path, flush=True)
    return EXIT_OK


def _inbox(args: argparse.Namespace, env: Env) -> int:
    """list NAME's inbox, or print one message

    List the messages in NAME's inbox/, oldest first, one line each:
    id<TAB>time<TAB>from<TAB>first 120 characters (newlines shown as ' | ', other control
    characters as spaces). With --read ID, print that message's file: headers, a blank line,
    the body; its sender then sees it `read` (told to the bus at once, or with the next
    read if the bus cannot be reached now)."""
    from ..mailbox import inbox_line

    mailbox = env.mailbox(args.name)
    if args.read is None:
        if args.body:
            raise CommandError("--body goes with --read ID", EXIT_USAGE)
        for entry in mailbox.entries():
            try:
                body = mailbox.read(entry)[1]
            except FileNotFoundError:
                continue  # deleted while we listed
            sys.stdout.write(inbox_line(entry, body))
        sys.stdout.flush()
        return EXIT_OK
    entry = mailbox.find(args.read)
    with open(entry.path, "rb") as handle:
        data = handle.read()
    sys.stdout.buffer.write(spool.parse_inbox_file(data)[1] if args.body else data)
    sys.stdout.buffer.flush()
    try:
        with mailbox.showing():
            told = mailbox.report_read([entry.id])
    except CommandError as exc:   # no bus configured: the message was still shown
        told, exc_text = False, str(exc)
    else:
        exc_text = "the bus cannot be reached now; it is told with the next read"
    if not told:
        print(f"agent-bus inbox: message {entry.id} is not reported read yet: {exc_text}",
              file=sys.stderr)
    return EXIT_OK
