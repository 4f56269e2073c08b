"""`agent-bus handoff`, `verify`, `fetch`: move files by fingerprint, never through the bus."""
from __future__ import annotations

import argparse
import os
import sys

from .. import handoff
from ..jqtext import dumps
from . import (EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE, CommandError, Env,
               channel_option, command, sender_option)

VERIFY_EXIT = {handoff.VERIFIED: EXIT_OK, handoff.MISMATCH: EXIT_REFUSED,
               handoff.UNREACHABLE: EXIT_UNREACHABLE}


def register(commands: argparse._SubParsersAction) -> None:
    give = command(commands, "handoff", _handoff)
    give.add_argument("--to", required=True, help="recipient name, or '*'")
    give.add_argument("files", nargs="+", metavar="FILE")
    give.add_argument("--note", default=None, help="a line of text to send along")
    channel_option(give)
    sender_option(give, "sender")

    check = command(commands, "verify", _verify)
    check.add_argument("target", help="an inbox message id, or a file path")
    check.add_argument("sha256", nargs="?", default=None, help="expected sha256 (with a FILE)")
    check.add_argument("--name", default=None, help="whose inbox (default $AGENT_NAME)")

    get = command(commands, "fetch", _fetch)
    get.add_argument("id", type=int, help="the handoff message's id in the inbox")
    get.add_argument("--to", dest="folder", required=True, metavar="DIR", help="where to put it")
    get.add_argument("--name", default=None, help="whose inbox (default $AGENT_NAME)")


def _handoff(args: argparse.Namespace, env: Env) -> int:
    """send files' sha256 and path to NAME, never their content

    Make each FILE private (chmod 0600), hash it, and send one message with each file's
    sha256, absolute path, host, size, line count and mtime (in meta, and one readable line
    per file). The content stays here."""
    ack = env.mailbox(args.sender, args.channel).handoff(args.to, args.files, args.note,
                                                         note_label="--note")
    print(dumps(ack), flush=True)
    return EXIT_OK


def _verify(args: argparse.Namespace, env: Env) -> int:
    """check a handed-off file: verified, mismatch or unreachable

    Recompute a handed-off file's sha256. Give an inbox message id (the handoff as the
    daemon filed it), or a FILE and the expected SHA256. Only a regular file is read,
    without blocking; with an id, a file whose size is not the one handed off is a mismatch
    without being read, and no more than that size is ever read. Exit 0 verified, 1
    mismatch, 3 unreachable."""
    if args.sha256 is not None:   # a file and its sha256: no inbox involved
        results = [(args.target, handoff.verify_file(args.target, args.sha256))]
    elif args.target.isdigit():
        results = env.mailbox(args.name).verify(int(args.target))
    else:
        raise CommandError("give an inbox message id, or a FILE and its SHA256", EXIT_USAGE)
    for path, result in results:
        print(f"{result}\t{path}")
    return VERIFY_EXIT[handoff.overall([r for _, r in results])]


def _fetch(args: argparse.Namespace, env: Env) -> int:
    """copy a handed-off file into DIR, keeping it only if its hash matches

    Copy the file(s) of handoff message ID (from NAME's inbox) into DIR when their path is
    reachable here (a shared filesystem), checking the sha256 before keeping anything. When
    the file lives on another host, prints the scp command that would fetch it and exits 3."""
    worst = EXIT_OK
    for facts, path, problem in env.mailbox(args.name).fetch(args.id, args.folder):
        if path is not None:
            print(path)
            continue
        print(f"agent-bus fetch: {problem}", file=sys.stderr)
        if not os.path.exists(facts.path):
            print(handoff.scp_command(facts, args.folder))
            worst = max(worst, EXIT_UNREACHABLE)
        else:
            worst = max(worst, EXIT_REFUSED)
    return worst
