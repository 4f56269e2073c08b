"""The `agent-bus` command: a thin layer that reads the environment and arguments,
then calls the library. Each submodule registers one group of commands."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, NoReturn

from .. import __version__, model
from ..client import DEFAULT_UA, BusClient, BusClientError

if TYPE_CHECKING:
    from ..mailbox import Mailbox

# Exit codes, shared with the bin/ shell mirrors (README, "Exit codes").
EXIT_OK = 0
EXIT_REFUSED = 1       # the bus refused the request (4xx), or a check failed
EXIT_USAGE = 2         # wrong arguments or configuration
EXIT_UNREACHABLE = 3   # the bus could not be reached or failed (network, 5xx)
EXIT_TIMEOUT = 4       # send --wait: the message did not reach the state in time


class CommandError(Exception):
    def __init__(self, message: str, exit_code: int = EXIT_REFUSED):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Env:
    """Every environment variable agent-bus reads, read in one place."""
    url: str
    name: str
    channel: str
    token: str
    key_path: str       # AGENT_BUS_KEY: the agent's Ed25519 private key; sends get signed
    user_agent: str
    ca: str
    state_dir: str      # ${XDG_STATE_HOME:-~/.local/state}/agent-bus: the default DB lives here
    cursor_dir: str     # AGENT_BUS_STATE_DIR, else <state_dir>/cursors
    no_cursor: bool
    listen_dir: str     # AGENT_BUS_LISTEN_DIR, else <state_dir>/listen: `listen`'s logs
    spool_root: str     # AGENT_BUS_SPOOL, else <state_dir>: the agents' spool folders
    shared: str         # AGENT_BUS_SHARED: folders whose handoffs the daemon checks, ':'-separated
    config_dir: str     # ${XDG_CONFIG_HOME:-~/.config}/agent-bus: `init` writes NAME.env here
    notify_socket: str  # NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID: set by systemd
    watchdog_usec: str
    watchdog_pid: str
    # el-ipc's settings, honoured where they mean the same here (README, "From el-ipc").
    db: str             # IPC_DB_PATH, else <state_dir>/bus.db: the server's database
    port: str           # IPC_PORT: serve's port
    card_name: str      # IPC_AGENT_NAME, IPC_AGENT_DESC, IPC_AGENT_URL: the agent card
    card_description: str
    card_url: str
    ipc_api_key: bool   # IPC_API_KEY is set: el-ipc's shared key, which serve refuses

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> "Env":
        state_home = environ.get("XDG_STATE_HOME") or os.path.join(
            os.path.expanduser("~"), ".local", "state")
        return cls(
            url=environ.get("AGENT_BUS_URL", ""),
            name=environ.get("AGENT_NAME", ""),
            channel=environ.get("AGENT_BUS_CHANNEL") or "default",
            token=environ.get("AGENT_BUS_TOKEN", ""),
            key_path=environ.get("AGENT_BUS_KEY", ""),
            user_agent=environ.get("AGENT_BUS_UA") or DEFAULT_UA,
            ca=environ.get("AGENT_BUS_CA", ""),
            state_dir=os.path.join(state_home, "agent-bus"),
            cursor_dir=environ.get("AGENT_BUS_STATE_DIR") or os.path.join(
                state_home, "agent-bus", "cursors"),
            no_cursor=environ.get("AGENT_BUS_NO_CURSOR", "") not in ("", "0"),
            listen_dir=environ.get("AGENT_BUS_LISTEN_DIR") or os.path.join(
                state_home, "agent-bus", "listen"),
            spool_root=environ.get("AGENT_BUS_SPOOL") or os.path.join(state_home, "agent-bus"),
            shared=environ.get("AGENT_BUS_SHARED", ""),
            config_dir=os.path.join(environ.get("XDG_CONFIG_HOME") or os.path.join(
                os.path.expanduser("~"), ".config"), "agent-bus"),
            notify_socket=environ.get("NOTIFY_SOCKET", ""),
            watchdog_usec=environ.get("WATCHDOG_USEC", ""),
            watchdog_pid=environ.get("WATCHDOG_PID", ""),
            db=environ.get("IPC_DB_PATH") or os.path.join(state_home, "agent-bus", "bus.db"),
            port=environ.get("IPC_PORT", ""),
            card_name=environ.get("IPC_AGENT_NAME", ""),
            card_description=environ.get("IPC_AGENT_DESC", ""),
            card_url=environ.get("IPC_AGENT_URL", ""),
            ipc_api_key=bool(environ.get("IPC_API_KEY")),
        )

    def client(self, timeout: float = 15.0) -> BusClient:
        """The bus client; `timeout`: seconds a request may take (a long-poll takes longer)."""
        if not self.url:
            raise CommandError("AGENT_BUS_URL is not set; export it, for example "
                               "AGENT_BUS_URL=http://127.0.0.1:9876", EXIT_USAGE)
        signing_key = None
        if self.key_path:
            from ..signing import SigningError, read_private_file
            try:
                signing_key = read_private_file(self.key_path)
            except SigningError as exc:
                raise CommandError(f"AGENT_BUS_KEY: {exc}", EXIT_USAGE) from None
        return BusClient(self.url, token=self.token or None, user_agent=self.user_agent,
                         ca=self.ca or None, signing_key=signing_key, timeout=timeout)

    def agent_name(self, given: str | None = None) -> str:
        name = given or self.name
        if not name:
            raise CommandError("no agent name: set AGENT_NAME or pass --from NAME", EXIT_USAGE)
        return name

    def reading_channel(self, given: str | None) -> str:
        """The channel a reader follows: a name, or '*' for all."""
        channel = given or self.channel
        if channel != "*" and not model.is_valid_name(channel):
            raise CommandError(f"invalid channel {channel!r}: use 1-64 characters of "
                               "A-Z a-z 0-9 . _ -, or '*' for all", EXIT_USAGE)
        return channel

    def mailbox(self, name: str | None = None, channel: str | None = None) -> Mailbox:
        """The agent's mailbox (its spool folder; the bus once a flow needs it)."""
        from ..mailbox import Mailbox

        return Mailbox(self.agent_name(name), self.spool_root, channel or self.channel,
                       connect=self.client)


# -- the arguments several commands take ---------------------------------------------

def command(commands: argparse._SubParsersAction, name: str, func) -> argparse.ArgumentParser:
    """Add command `name`, run by `func(args, env)`: its docstring's first line is the
    command's one-line help, the rest its description (`-h`)."""
    summary, _, details = (func.__doc__ or "").strip().partition("\n")
    parser = commands.add_parser(name, help=summary, description=" ".join(details.split()))
    parser.set_defaults(func=func)
    return parser


def name_argument(parser: argparse.ArgumentParser, what: str = "agent name") -> None:
    parser.add_argument("name", nargs="?", default=None, help=f"{what} (default $AGENT_NAME)")


def channel_option(parser: argparse.ArgumentParser, help: str = "channel (default "
                   "$AGENT_BUS_CHANNEL or 'default')", metavar: str | None = None) -> None:
    parser.add_argument("--channel", default=None, help=help, metavar=metavar)


def sender_option(parser: argparse.ArgumentParser, help: str = "sender name") -> None:
    parser.add_argument("--from", dest="sender", default=None, help=f"{help} (default $AGENT_NAME)")


def bounded(kind: type, low: float, high: float | None = None, *, low_ok: bool = True):
    """An argparse type: a number of `kind` from `low` (above it, with `low_ok=False`) up to
    `high`; argparse answers anything else with a usage error (exit 2)."""
    def parse(text: str):
        value = kind(text)
        if value < low or (value == low and not low_ok) or (high is not None and value > high):
            bounds = f"{'at least' if low_ok else 'more than'} {low:g}"
            raise argparse.ArgumentTypeError(
                f"{text} is not {bounds}" + (f" and at most {high:g}" if high is not None else ""))
        return value
    parse.__name__ = kind.__name__   # argparse names the type in "invalid float value"
    return parse


def retry_report(command_name: str):
    """How a follower says it will retry: one line on stderr, the delay in milliseconds
    (bin/lib/agent-bus.sh prints the same)."""
    def report(exc: Exception, delay: float) -> None:
        print(f"agent-bus {command_name}: {exc}; retrying in {round(delay * 1000)} ms",
              file=sys.stderr, flush=True)
    return report


def exit_code_for(exc: BusClientError) -> int:
    return EXIT_UNREACHABLE if exc.transient else EXIT_REFUSED


def build_parser() -> argparse.ArgumentParser:
    from . import (agent, directory, discovery, handoff, init, listen, mcp, messaging, security,
                   serve)

    parser = argparse.ArgumentParser(
        prog="agent-bus",
        description="A shell-first message bus for agents. See README.md for the everyday uses.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (serve, messaging, listen, directory, discovery, agent, security, handoff, init,
                   mcp):
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv) == ["--version"]:
        # Before the commands are imported: a launcher asks this to find the program.
        print(f"agent-bus {__version__}")
        return EXIT_OK
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..mailbox import USAGE, MailboxError
    env = Env.from_environ(os.environ)
    try:
        return args.func(args, env)
    except CommandError as exc:
        print(f"agent-bus {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except MailboxError as exc:
        print(f"agent-bus {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE if exc.kind == USAGE else EXIT_REFUSED
    except BusClientError as exc:
        print(f"agent-bus {args.command}: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (| head); that is not an error of ours.
        sys.stderr.close()
        return EXIT_OK


def die(message: str, code: int = EXIT_USAGE) -> NoReturn:
    raise CommandError(message, code)
