"""`agent-bus handoff`, `verify`, `fetch`: move files by fingerprint, never through the bus."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .. import handoff
from ..agent.inbox import list_inbox, parse_inbox_file
from ..agent.spool import SpoolLayout
from ..secretguard import refusal
from . import EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE, CommandError, Env

VERIFY_EXIT = {handoff.VERIFIED: EXIT_OK, handoff.MISMATCH: EXIT_REFUSED,
               handoff.UNREACHABLE: EXIT_UNREACHABLE}


def register(commands: argparse._SubParsersAction) -> None:
    give = commands.add_parser(
        "handoff", help="send files' sha256 and path to NAME, never their content",
        description="Make each FILE private (chmod 0600), hash it, and send one message "
                    "with each file's sha256, absolute path, host, size, line count and "
                    "mtime (in meta, and one readable line per file). The content stays here.")
    give.add_argument("--to", required=True, help="recipient name, or '*'")
    give.add_argument("files", nargs="+", metavar="FILE")
    give.add_argument("--note", default=None, help="a line of text to send along")
    give.add_argument("--channel", default=None, help="channel (default $AGENT_BUS_CHANNEL)")
    give.add_argument("--from", dest="sender", default=None, help="sender (default $AGENT_NAME)")
    give.set_defaults(func=_handoff)

    check = commands.add_parser(
        "verify", help="check a handed-off file: verified, mismatch or unreachable",
        description="Recompute a handed-off file's sha256. Give an inbox message id (the "
                    "handoff as the daemon filed it), or a FILE and the expected SHA256. "
                    "Only a regular file is read, without blocking; with an id, a file whose "
                    "size is not the one handed off is a mismatch without being read, and no "
                    "more than that size is ever read. "
                    "Exit 0 verified, 1 mismatch, 3 unreachable.")
    check.add_argument("target", help="an inbox message id, or a file path")
    check.add_argument("sha256", nargs="?", default=None, help="expected sha256 (with a FILE)")
    check.add_argument("--name", default=None, help="whose inbox (default $AGENT_NAME)")
    check.set_defaults(func=_verify)

    get = commands.add_parser(
        "fetch", help="copy a handed-off file into DIR, keeping it only if its hash matches",
        description="Copy the file(s) of handoff message ID (from NAME's inbox) into DIR when "
                    "their path is reachable here (a shared filesystem), checking the sha256 "
                    "before keeping anything. When the file lives on another host, prints the "
                    "scp command that would fetch it and exits 3.")
    get.add_argument("id", type=int, help="the handoff message's id in the inbox")
    get.add_argument("--to", dest="folder", required=True, metavar="DIR", help="where to put it")
    get.add_argument("--name", default=None, help="whose inbox (default $AGENT_NAME)")
    get.set_defaults(func=_fetch)


def _handoff(args: argparse.Namespace, env: Env) -> int:
    sender = env.agent_name(args.sender)
    try:
        described = [handoff.describe(path) for path in args.files]
    except handoff.HandoffError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    if args.note and (problem := refusal(args.note)):
        raise CommandError(f"--note: {problem}", EXIT_REFUSED)
    body, meta = handoff.message_for(described, args.note)
    ack = env.client().send(sender, args.to, body, channel=args.channel or env.channel, meta=meta)
    print(json.dumps(ack), flush=True)
    return EXIT_OK


def _handoff_meta(env: Env, name: str | None, message_id: int) -> dict:
    agent = env.agent_name(name)
    try:
        layout = SpoolLayout.for_agent(env.spool_root, agent)
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    for entry in list_inbox(layout):
        if entry.id == message_id:
            with open(entry.path, "rb") as handle:
                headers, _ = parse_inbox_file(handle.read())
            meta = headers.get("meta") or {}
            if meta.get("kind") != "handoff":
                raise CommandError(f"message {message_id} is not a handoff", EXIT_USAGE)
            return meta
    raise CommandError(f"no message {message_id} in {layout.inbox}", EXIT_USAGE)


def _files(env: Env, name: str | None, message_id: int) -> list[handoff.FileFacts]:
    try:
        return handoff.files_in(_handoff_meta(env, name, message_id))
    except handoff.HandoffError as exc:
        raise CommandError(f"message {message_id}: {exc}", EXIT_USAGE) from None


def _verify(args: argparse.Namespace, env: Env) -> int:
    if args.sha256 is not None:
        results = [(args.target, handoff.verify_file(args.target, args.sha256))]
    elif args.target.isdigit():
        files = _files(env, args.name, int(args.target))
        results = [(f.path, handoff.verify_file(f.path, f.sha256, f.bytes)) for f in files]
    else:
        raise CommandError("give an inbox message id, or a FILE and its SHA256", EXIT_USAGE)
    for path, result in results:
        print(f"{result}\t{path}")
    return VERIFY_EXIT[handoff.overall([r for _, r in results])]


def _fetch(args: argparse.Namespace, env: Env) -> int:
    if not os.path.isdir(args.folder):
        raise CommandError(f"{args.folder} is not a folder", EXIT_USAGE)
    files = _files(env, args.name, args.id)
    worst = EXIT_OK
    for facts in files:
        try:
            print(handoff.fetch(facts, args.folder))
        except handoff.HandoffError as exc:
            print(f"agent-bus fetch: {exc}", file=sys.stderr)
            if not os.path.exists(facts.path):
                print(handoff.scp_command(facts, args.folder))
                worst = max(worst, EXIT_UNREACHABLE)
            else:
                worst = max(worst, EXIT_REFUSED)
    return worst
