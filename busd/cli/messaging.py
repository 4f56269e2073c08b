"""`agent-bus send` and `agent-bus recv`: one message out, a stream of messages in."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

from ..client import BusClientError, CursorFile, listen, monitor_block
from ..secretguard import refusal
from . import EXIT_OK, EXIT_REFUSED, EXIT_TIMEOUT, EXIT_USAGE, CommandError, Env


def register(commands: argparse._SubParsersAction) -> None:
    send = commands.add_parser(
        "send", help="send stdin as one message to TO",
        description="Send standard input, byte for byte, as one message to TO ('*' for "
                    "everyone on the channel). Prints the bus's JSON acknowledgement.")
    send.add_argument("to", help="recipient name, or '*' for a channel broadcast")
    send.add_argument("--from", dest="sender", default=None,
                      help="sender name (default $AGENT_NAME)")
    send.add_argument("--channel", default=None,
                      help="channel (default $AGENT_BUS_CHANNEL or 'default')")
    send.add_argument("--key", default=None,
                      help="idempotency key: sending the same key again stores nothing new")
    send.add_argument("--meta", default=None, metavar="JSON",
                      help="a flat JSON object of extra fields")
    send.add_argument("--allow-secret", action="store_true",
                      help="send even if the body looks like a key or credential")
    send.add_argument("--wait", choices=("delivered", "filed"), default=None,
                      help="after the ack, wait until the recipient fetched (delivered) or "
                           "filed it; exit 4 if --timeout passes first")
    send.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                      help="how long --wait waits (default 60)")

    status = commands.add_parser(
        "status", help="where your messages are: queued, delivered or filed",
        description="Print each message's receipt state, one line per recipient: "
                    "id<TAB>state<TAB>recipient. queued: stored; delivered: the recipient "
                    "fetched it; filed: its daemon's inbox file is durable. A broadcast has a "
                    "line per agent known to read its channel. You see your own messages "
                    "(admins: all); others show as unknown.")
    status.add_argument("ids", nargs="+", type=int, metavar="ID")
    status.set_defaults(func=_status)

    undelivered = commands.add_parser(
        "undelivered", help="list dead letters: messages nobody fetched",
        description="List addressed messages still not fetched after --older seconds, and any "
                    "sent to a name that has never talked to the bus (admin once auth is on): "
                    "id<TAB>time<TAB>from<TAB>to<TAB>channel<TAB>reason.")
    undelivered.add_argument("--older", type=float, default=600.0, metavar="SECONDS",
                             help="queued at least this long (default 600)")
    undelivered.set_defaults(func=_undelivered)
    send.set_defaults(func=_send)

    recv = commands.add_parser(
        "recv", help="print NAME's messages as Monitor blocks, following the bus",
        description="Long-poll the bus for NAME's messages and print each as a block: "
                    "'[HH:MM:SSZ] from SENDER:', the body, '---'. The cursor is kept in "
                    "$AGENT_BUS_STATE_DIR so a restart neither skips nor repeats.")
    recv.add_argument("name", nargs="?", default=None, help="recipient name (default $AGENT_NAME)")
    recv.add_argument("--channel", default=None,
                      help="channel, or '*' for all (default $AGENT_BUS_CHANNEL or 'default')")
    recv.add_argument("--once", action="store_true",
                      help="wait for one batch (up to the hold time), print it, and exit")
    recv.add_argument("--since", type=float, default=None,
                      help="start after this ts instead of the saved cursor")
    recv.add_argument("--no-cursor", action="store_true",
                      help="keep no cursor file (also AGENT_BUS_NO_CURSOR=1); starts from now")
    recv.set_defaults(func=_recv)


def _read_stdin_text() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CommandError(f"standard input is not UTF-8 text (byte {exc.start}); "
                           "send binary data as a handoff instead", EXIT_USAGE) from None


def _send(args: argparse.Namespace, env: Env) -> int:
    meta = None
    if args.meta is not None:
        try:
            meta = json.loads(args.meta)
        except ValueError as exc:
            raise CommandError(f"--meta is not JSON: {exc}", EXIT_USAGE) from None
    sender = env.agent_name(args.sender)
    body = _read_stdin_text()
    if not args.allow_secret and (problem := refusal(body)):
        raise CommandError(f"not sent: {problem}", EXIT_REFUSED)
    client = env.client()
    ack = client.send(sender, args.to, body, channel=args.channel or env.channel,
                      key=args.key, meta=meta)
    print(json.dumps(ack), flush=True)
    if args.wait is None:
        return EXIT_OK
    if client.wait_for_state(int(ack["id"]), args.wait, args.timeout) is None:
        print(f"agent-bus send: message {ack['id']} was not {args.wait} within "
              f"{args.timeout:g} s", file=sys.stderr)
        return EXIT_TIMEOUT
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
    sys.stdout.write(status_lines(env.client().status(args.ids)))
    sys.stdout.flush()
    return EXIT_OK


def _undelivered(args: argparse.Namespace, env: Env) -> int:
    if args.older < 0:
        raise CommandError("--older must be 0 or more seconds", EXIT_USAGE)
    for entry in env.client().undelivered(args.older):
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry["ts"]))
        print(f"{entry['id']}\t{when}\t{entry['from']}\t{entry['to']}\t{entry['channel']}"
              f"\t{entry['reason']}")
    return EXIT_OK


def cursor_path(cursor_dir: str, name: str, channel: str) -> str:
    # '@' and '%' never occur in names, so every (name, channel) has its own file.
    return os.path.join(cursor_dir, f"{name}@{channel.replace('*', '%2A')}.cursor")


def _recv(args: argparse.Namespace, env: Env) -> int:
    name = env.agent_name(args.name)
    channel = args.channel or env.channel
    client = env.client()
    keep_cursor = not (args.no_cursor or env.no_cursor)
    cursor = CursorFile(cursor_path(env.cursor_dir, name, channel)) if keep_cursor else None
    if args.since is not None:
        since = args.since
    elif cursor is not None:
        try:
            since = cursor.load(0.0)
        except ValueError as exc:
            raise CommandError(str(exc), EXIT_USAGE) from None
    else:
        since = float(client.healthz()["now"])

    if args.once:
        data = client.recv(name, since=since, block=True, channel=channel)
        for message in data.get("messages") or []:
            sys.stdout.write(monitor_block(message))
        sys.stdout.flush()
        if cursor is not None:
            last = max([since] + [float(m["ts"]) for m in data.get("messages") or []])
            cursor.save(max(last, float(data.get("now") or 0)))
        return EXIT_OK

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def report(exc: BusClientError, delay: float) -> None:
        print(f"agent-bus recv: {exc}; retrying in {delay:g}s", file=sys.stderr, flush=True)

    for message in listen(client, name, channel=channel, cursor=cursor, since=since,
                          stop=stop, on_error=report):
        sys.stdout.write(monitor_block(message))
        sys.stdout.flush()
    return EXIT_OK
