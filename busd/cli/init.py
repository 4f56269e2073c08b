"""`agent-bus init NAME`: the settings file and spool folder that `agent-bus@NAME` runs from."""
from __future__ import annotations

import argparse
import os
import re
import sys

from .. import model
from ..agent.spool import SpoolLayout
from ..fileio import write_atomically
from . import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, CommandError, Env, command
from .agent import SHARED_SEPARATOR, shared_roots

DEFAULT_URL = "http://127.0.0.1:9876"
# A value made only of these needs no quotes, in a systemd EnvironmentFile or in sh.
_BARE_VALUE = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


def register(commands: argparse._SubParsersAction) -> None:
    init = command(commands, "init", _init)
    init.add_argument("name", help="agent name")
    init.add_argument("--url", default=None,
                      help=f"the bus (default $AGENT_BUS_URL, else {DEFAULT_URL})")
    init.add_argument("--channel", default=None, metavar="C",
                      help="channel to receive on, '*' for all, and to send on "
                           "(default $AGENT_BUS_CHANNEL, else 'default')")
    init.add_argument("--token", default=None, metavar="T",
                      help="NAME's bearer token; '-' reads it from standard input, which keeps "
                           "it out of ps and your shell history (default: none)")
    init.add_argument("--shared", action="extend", nargs="+", default=[], metavar="DIR",
                      help="folders shared with the senders (a network or common filesystem): "
                           "handoffs of files under them are checked on arrival; every other "
                           "handoff is 'not checked' (default: none)")
    init.add_argument("--force", action="store_true",
                      help="replace an existing settings file")


def _quote(key: str, value: str) -> str:
    """KEY=value, quoted so systemd and sh both read back exactly `value`."""
    if _BARE_VALUE.fullmatch(value):
        return f"{key}={value}"
    if "'" in value or "\\" in value or "\n" in value or "\r" in value:
        # Single quotes keep everything literal in both readers, except these.
        raise CommandError(f"{key} {value!r} holds a quote, backslash or newline, which the "
                           "settings file cannot carry; choose another value", EXIT_USAGE)
    return f"{key}='{value}'"


def _settings(name: str, url: str, channel: str, token: str, spool_root: str,
              shared: tuple[str, ...]) -> str:
    lines = [
        f"# agent-bus settings for {name}: read by the systemd unit agent-bus@{name}",
        "# (EnvironmentFile=) and by a shell: set -a; . THIS_FILE; set +a",
        "# After a change: systemctl --user restart agent-bus@" + name,
        _quote("AGENT_NAME", name),
        _quote("AGENT_BUS_URL", url),
        _quote("AGENT_BUS_CHANNEL", channel),
        _quote("AGENT_BUS_SPOOL", spool_root),
    ]
    if token:
        lines.append(_quote("AGENT_BUS_TOKEN", token))
    else:
        lines.append("# AGENT_BUS_TOKEN=   the agent's bearer token, once the bus has tokens")
    if shared:
        lines.append("# Handoffs of files under these folders are checked on arrival:")
        lines.append(_quote("AGENT_BUS_SHARED", SHARED_SEPARATOR.join(shared)))
    else:
        lines.append("# AGENT_BUS_SHARED=  folders shared with the senders, ':'-separated: "
                     "handoffs under them are checked")
    lines += [
        "# AGENT_BUS_KEY=     the agent's Ed25519 private key file: every send is signed",
        "# AGENT_BUS_CA=      a CA certificate file to trust for an https:// bus",
    ]
    return "\n".join(lines) + "\n"


def _init(args: argparse.Namespace, env: Env) -> int:
    """write NAME's settings file and spool folder, for agent-bus@NAME

    Write $XDG_CONFIG_HOME/agent-bus/NAME.env (default ~/.config/agent-bus; mode 0600), the
    settings the systemd unit agent-bus@NAME starts NAME's daemon with, and make NAME's
    spool folder (0700). The file is also shell syntax: `set -a; .
    ~/.config/agent-bus/NAME.env` gives a shell the same settings. An existing file is left
    alone unless --force."""
    name = args.name
    if not model.is_valid_name(name):
        raise CommandError(f"invalid agent name {name!r}: use 1-64 characters of "
                           "A-Z a-z 0-9 . _ - (not only dots)", EXIT_USAGE)
    url = (args.url or env.url or DEFAULT_URL).rstrip("/")
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
        raise CommandError(f"--url {url!r} is not an http:// or https:// address, for "
                           f"example {DEFAULT_URL}", EXIT_USAGE)
    channel = args.channel or env.channel
    if channel != model.ALL_CHANNELS and not model.is_valid_name(channel):
        raise CommandError(f"invalid channel {channel!r}: use 1-64 characters of "
                           "A-Z a-z 0-9 . _ -, or '*' for all", EXIT_USAGE)
    token = args.token or ""
    if token == "-":
        token = sys.stdin.readline().strip()
        if not token:
            raise CommandError("--token -: standard input held no token", EXIT_USAGE)
    if any(c.isspace() for c in token):
        raise CommandError("--token holds a space or newline; a token is one word", EXIT_USAGE)

    shared = shared_roots(args.shared, "--shared", relative_ok=True)
    for root in shared:
        if not os.path.isdir(root):
            print(f"agent-bus init: note: {root} is not a folder here (yet); handoffs under "
                  "it are 'not checked' until it is", file=sys.stderr)

    spool_root = os.path.abspath(env.spool_root)
    layout = SpoolLayout.for_agent(spool_root, name)
    path = os.path.join(env.config_dir, f"{name}.env")
    text = _settings(name, url, channel, token, spool_root, shared)
    os.umask(0o077)
    try:
        os.makedirs(env.config_dir, mode=0o700, exist_ok=True)
        layout.create()
    except OSError as exc:
        raise CommandError(f"cannot make {exc.filename}: {exc.strerror}", EXIT_USAGE) from None
    try:
        write_atomically(path, text.encode("utf-8"), replace=args.force)
    except FileExistsError:
        raise CommandError(f"{path} already exists and was left as it is; edit it, or run "
                           "again with --force to replace it", EXIT_REFUSED) from None
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc.strerror}", EXIT_USAGE) from None
    print(f"wrote {path}: {name} at {url}, channel {channel}"
          + (", with a token" if token else "")
          + (f", checking handoffs under {', '.join(shared)}" if shared else ""))
    print(f"spool folder: {layout.root}/ (drop files in outbox/<to>/; tail -f inbox.log)")
    print(f"start it now and at every login: systemctl --user enable --now agent-bus@{name}")
    return EXIT_OK
