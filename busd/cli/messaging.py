"""`agent-bus send`, `status`, `undelivered`, `recv` and `read`: messages out, receipts,
messages in. `send`, `status` and `read` also work straight on the database (`--db`)."""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time

from ..framing import monitor_block
from ..jqtext import dumps
from ..receive import CursorFile, listen, stem
from . import (EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE, CommandError, Env, channel_option, command,
               db_option, name_argument, retry_report, sender_option)
from .discovery import ask, print_json


def register(commands: argparse._SubParsersAction) -> None:
    send = command(commands, "send", _send)
    send.add_argument("to", help="recipient name, or '*' for a channel broadcast")
    sender_option(send)
    channel_option(send)
    send.add_argument("--key", default=None,
                      help="idempotency key: sending the same key again stores nothing new")
    send.add_argument("--meta", default=None, metavar="JSON",
                      help="a flat JSON object of extra fields")
    send.add_argument("--allow-secret", action="store_true",
                      help="send even if the body looks like a key or credential")
    send.add_argument("--wait", choices=("delivered", "filed", "read"), default=None,
                      help="after the ack, wait until the recipient fetched (delivered), "
                           "filed or was shown (read) it; exit 4 if --timeout passes first")
    send.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                      help="how long --wait waits (default 60)")
    db_option(send, "store it")

    status = command(commands, "status", _status)
    status.add_argument("ids", nargs="+", type=int, metavar="ID")
    db_option(status, "look")

    read = command(commands, "read", _read)
    read.add_argument("channel", help="the channel to read")
    read.add_argument("agent", help="whose unread messages (the watermark that moves)")
    read.add_argument("--wait", action="store_true",
                      help="if nothing is unread, wait until a message comes (up to 25 s)")
    db_option(read, "read")

    undelivered = command(commands, "undelivered", _undelivered)
    undelivered.add_argument("--older", type=float, default=600.0, metavar="SECONDS",
                             help="queued at least this long (default 600)")

    recv = command(commands, "recv", _recv)
    name_argument(recv, "recipient name")
    channel_option(recv, "channel, or '*' for all (default $AGENT_BUS_CHANNEL or 'default')")
    recv.add_argument("--once", action="store_true",
                      help="wait for one batch (up to the hold time), print it, and exit")
    recv.add_argument("--since", type=float, default=None,
                      help="start after this ts instead of the saved cursor")
    recv.add_argument("--no-cursor", action="store_true",
                      help="keep no cursor file (also AGENT_BUS_NO_CURSOR=1); starts from now")


def _read_stdin_text() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CommandError(f"standard input is not UTF-8 text (byte {exc.start}); "
                           "send binary data as a handoff instead", EXIT_USAGE) from None


def _send(args: argparse.Namespace, env: Env) -> int:
    """send stdin as one message to TO

    Send standard input, byte for byte, as one message to TO ('*' for everyone on the
    channel). Prints the bus's JSON acknowledgement on one line."""
    meta = None
    if args.meta is not None:
        try:
            meta = json.loads(args.meta)
        except ValueError as exc:
            raise CommandError(f"--meta is not JSON: {exc}", EXIT_USAGE) from None
    mailbox = env.mailbox(args.sender, args.channel, db=args.db)
    try:
        ack = mailbox.send(args.to, _read_stdin_text(), key=args.key, meta=meta,
                           allow_secret=args.allow_secret)
        print(dumps(ack), flush=True)
        if args.wait is not None and mailbox.wait_for(int(ack["id"]), args.wait,
                                                      args.timeout) is None:
            print(f"agent-bus send: message {ack['id']} was not {args.wait} within "
                  f"{args.timeout:g} s", file=sys.stderr)
            return EXIT_TIMEOUT
    finally:
        mailbox.close()
    return EXIT_OK


def status_lines(states: list[dict]) -> str:
    """One line per recipient: id, state, recipient; bin/bus-status prints the same."""
    lines = []
    for state in states:
        recipients = state.get("recipients") or {}
        if not recipients:
            lines.append(f"{state['id']}\t{state['state']}\t{state.get('to', '-')}")
        for name, value in recipients.items():
            lines.append(f"{state['id']}\t{value}\t{name}")
    return "".join(line + "\n" for line in lines)


def _status(args: argparse.Namespace, env: Env) -> int:
    """where your messages are: queued, delivered, filed or read

    Print each message's receipt state, one line per recipient: id<TAB>state<TAB>recipient.
    queued: stored; delivered: the recipient fetched it; filed: its daemon's inbox file is
    durable; read: it was shown to the recipient's model (a hook, an MCP tool) or person. A broadcast has a line per agent known to read its channel. You see your own
    messages (admins: all); others show as unknown."""
    sys.stdout.write(status_lines(ask(args, env, lambda source: source.status(args.ids))))
    sys.stdout.flush()
    return EXIT_OK


def _read(args: argparse.Namespace, env: Env) -> int:
    """read AGENT's unread messages on CHANNEL (el-ipc's read)

    Print what AGENT has not read yet on CHANNEL, oldest first (at most 1,000; read again
    for the rest), as el-ipc's `read` does: a JSON list of {id, sender, content, timestamp,
    signed?}, indented by two ('[]' when there is nothing). AGENT's watermark on CHANNEL
    moves past them, as GET /messages moves it. --wait: if nothing is unread, wait until a
    message comes or the hold ends (then '[]')."""
    print_json(ask(args, env, lambda source: source.messages(args.channel, args.agent,
                                                             wait=args.wait),
                   listen=args.wait))
    return EXIT_OK


def _undelivered(args: argparse.Namespace, env: Env) -> int:
    """list dead letters: messages nobody fetched

    List addressed messages still not fetched after --older seconds, and any sent to a name
    that has never talked to the bus (admin once auth is on):
    id<TAB>time<TAB>from<TAB>to<TAB>channel<TAB>reason."""
    if args.older < 0:
        raise CommandError("--older must be 0 or more seconds", EXIT_USAGE)
    for entry in env.client().undelivered(args.older):
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry["ts"]))
        print(f"{entry['id']}\t{when}\t{entry['from']}\t{entry['to']}\t{entry['channel']}"
              f"\t{entry['reason']}")
    return EXIT_OK


def _recv(args: argparse.Namespace, env: Env) -> int:
    """print NAME's messages as Monitor blocks, following the bus

    Long-poll the bus for NAME's messages and print each as a block: '[HH:MM:SSZ] from
    SENDER:', the body, '---'. The cursor is kept in $AGENT_BUS_STATE_DIR so a restart
    neither skips nor repeats."""
    name = env.agent_name(args.name)
    channel = args.channel or env.channel
    client = env.client()
    cursor = None
    if not (args.no_cursor or env.no_cursor):
        cursor = CursorFile(stem(env.cursor_dir, name, channel) + ".cursor")
    since = args.since
    if since is None and cursor is not None:
        try:
            since = cursor.load(0.0)
        except ValueError as exc:
            raise CommandError(str(exc), EXIT_USAGE) from None
    elif since is None:
        since = float(client.healthz()["now"])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    for message in listen(client, name, channel=channel, cursor=cursor, since=since, stop=stop,
                          on_error=retry_report("recv"), once=args.once):
        sys.stdout.write(monitor_block(message))
        sys.stdout.flush()
    return EXIT_OK
