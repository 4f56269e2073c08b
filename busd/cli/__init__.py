"""The `agent-bus` command: a thin layer that reads the environment and arguments,
then calls the library. Each submodule registers one group of commands."""
from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
from dataclasses import dataclass

from .. import __version__, model
from ..errors import BusError

# Only for the annotations: importing `typing` costs `agent-bus drop` and `inbox` milliseconds.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Mapping, NoReturn

    from ..client import BusClient, BusClientError
    from ..direct import DirectBus
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
    ua_setting: str     # AGENT_BUS_UA as set ("": unset); `user_agent` is the one sent
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
            ua_setting=environ.get("AGENT_BUS_UA", ""),
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

    @property
    def user_agent(self) -> str:
        """AGENT_BUS_UA, else the client's own. The client module is imported only when
        asked: commands that never talk to the bus start without it."""
        from ..client import DEFAULT_UA

        return self.ua_setting or DEFAULT_UA

    def client(self, timeout: float = 15.0) -> BusClient:
        """The bus client; `timeout`: seconds a request may take (a long-poll takes longer)."""
        from ..client import BusClient

        if not self.url:
            raise CommandError("AGENT_BUS_URL is not set; export it, for example "
                               "AGENT_BUS_URL=http://127.0.0.1:9876", EXIT_USAGE)
        return BusClient(self.url, token=self.token or None,
                         user_agent=self.user_agent,
                         ca=self.ca or None, signing_key=self._signing_key(), timeout=timeout)

    def _signing_key(self):
        """AGENT_BUS_KEY's private key, or None when it is unset."""
        if not self.key_path:
            return None
        from ..signing import SigningError, read_private_file
        try:
            return read_private_file(self.key_path)
        except SigningError as exc:
            raise CommandError(f"AGENT_BUS_KEY: {exc}", EXIT_USAGE) from None

    def direct(self, db: str, *, listen: bool = False, create: bool = False) -> DirectBus:
        """The bus straight on database `db`, with no server (a `--db` command); sends are
        signed with AGENT_BUS_KEY, as over HTTP. A SQLite file that does not exist is made
        only when `create` (a send, as el-ipc's CLI does); otherwise it is an error, so a
        mistyped path does not wait on a new, empty bus."""
        from ..direct import DirectBus
        from ..service import BusSettings
        from ..store import is_postgres

        if not create and not is_postgres(db) and not os.path.exists(db):
            raise CommandError(f"no bus database at {db}; start the server once (agent-bus "
                               "serve), or send a first message with --db", EXIT_USAGE)
        os.umask(0o077)  # a database made here is the bus's, private like the server's
        return DirectBus(db, settings=BusSettings(**self.card_settings()), listen=listen,
                         signing_key=self._signing_key(),
                         url=f"http://127.0.0.1:{self.serve_port()}")

    def bus(self, db: str | None, *, listen: bool = False, create: bool = False
            ) -> BusClient | DirectBus:
        """The bus a command talks to: straight on database `db` if given, else over HTTP
        (AGENT_BUS_URL). Both answer the same calls with the same shapes."""
        return self.direct(db, listen=listen, create=create) if db else self.client()

    def serve_port(self) -> int:
        """serve's default port: IPC_PORT, el-ipc's setting; 9876 (both seeds' port)."""
        if not self.port:
            return 9876
        try:
            port = int(self.port)
        except ValueError:
            port = -1
        if not 0 <= port <= 65535:
            raise CommandError(f"IPC_PORT must be a port number (0-65535), got "
                               f"{self.port[:40]!r}", EXIT_USAGE)
        return port

    def card_settings(self, name: str | None = None, description: str | None = None,
                      url: str | None = None) -> dict[str, str]:
        """What the agent card says (BusSettings' card fields): the values given, else
        el-ipc's IPC_AGENT_NAME, IPC_AGENT_DESC and IPC_AGENT_URL, else the defaults."""
        from .. import agent_card

        url = url if url is not None else self.card_url
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        if url and not (parts.scheme in ("http", "https") and parts.netloc):
            raise CommandError(f"--card-url / IPC_AGENT_URL must be an absolute http:// or "
                               f"https:// URL, got {url!r}", EXIT_USAGE)
        return {"card_name": name or self.card_name or agent_card.DEFAULT_NAME,
                "card_description": (description or self.card_description
                                     or agent_card.DEFAULT_DESCRIPTION),
                "public_url": url}

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

    def mailbox(self, name: str | None = None, channel: str | None = None,
                db: str | None = None) -> Mailbox:
        """The agent's mailbox (its spool folder; the bus once a flow needs it: straight
        on database `db` if given, else over HTTP)."""
        from ..mailbox import Mailbox

        return Mailbox(self.agent_name(name), self.spool_root, channel or self.channel,
                       connect=lambda: self.bus(db, create=True))


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


def db_option(parser: argparse.ArgumentParser, what: str = "work") -> None:
    parser.add_argument("--db", default=None, metavar="PATH|URL",
                        help=f"{what} straight on this bus database (a SQLite path or a "
                             "postgresql:// URL), with no server, as el-ipc's CLI does; "
                             "without it, over HTTP ($AGENT_BUS_URL)")


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


# The module that registers each command, in the order `agent-bus -h` lists them. A
# command imports only its own module, and that module what the command uses, so the
# commands agents and hooks run often (drop, inbox) start fast; help and an unknown
# command import them all. tests/fast/test_cli_start.py keeps this table whole.
COMMAND_MODULES = {
    "serve": "serve", "migrate": "serve",
    "send": "messaging", "status": "messaging", "read": "messaging", "undelivered": "messaging",
    "recv": "messaging",
    "listen": "listen",
    "agents": "directory", "health": "directory",
    "channels": "discovery", "agent-card": "discovery",
    "agent": "agent",
    "drop": "spool", "inbox": "spool",
    "token": "security", "keygen": "security", "operator": "security", "seed": "security",
    "register": "security",
    "handoff": "handoff", "verify": "handoff", "fetch": "handoff",
    "init": "init",
    "mcp": "mcp",
}


class _BuildingParser(argparse.ArgumentParser):
    """argparse's parser, built without asking the terminal's width.

    argparse makes a help formatter for every add_argument, only to check the argument's
    metavar, and its formatter asks the terminal's width when made: that imports shutil
    (with zlib, bz2 and lzma), ~3 ms at every start of `drop` and `inbox`. While the
    parsers are built, their formatter is given a width (wide: the one text formatted
    then, a subcommand's "agent-bus COMMAND" prefix, is never wrapped); build_parser
    then gives every parser argparse's own, which asks when help or an error is shown."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", functools.partial(argparse.HelpFormatter,
                                                               width=_BUILD_WIDTH))
        super().__init__(*args, **kwargs)


_BUILD_WIDTH = 1000


def _with_terminal_width(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`parser` and its subcommands' parsers, formatting help at the terminal's width."""
    parser.formatter_class = argparse.HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                _with_terminal_width(subparser)
    return parser


def build_parser(command_name: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or (given a known `command_name`) of that one's module."""
    parser = _BuildingParser(
        prog="agent-bus",
        description="A shell-first message bus for agents. See README.md for the everyday uses.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    if command_name in COMMAND_MODULES:
        modules = [COMMAND_MODULES[command_name]]
    else:
        modules = list(dict.fromkeys(COMMAND_MODULES.values()))
    for module in modules:
        importlib.import_module(f"{__name__}.{module}").register(commands)
    return _with_terminal_width(parser)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--version"]:
        # Before the commands are imported: a launcher asks this to find the program.
        print(f"agent-bus {__version__}")
        return EXIT_OK
    parser = build_parser(argv[0] if argv and not argv[0].startswith("-") else None)
    args = parser.parse_args(argv)
    env = Env.from_environ(os.environ)
    try:
        return args.func(args, env)
    except CommandError as exc:
        print(f"agent-bus {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except BusError as exc:
        # From a --db command, which runs the bus's own flows: the bus refused (4xx) or
        # its database failed (5xx), as over HTTP.
        db = getattr(args, "db", None)
        if db:
            from ..store import shown_database
        where = f"{shown_database(db)}: " if db else ""
        print(f"agent-bus {args.command}: {where}{exc.message}", file=sys.stderr)
        return EXIT_UNREACHABLE if exc.http_status >= 500 else EXIT_REFUSED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (| head); that is not an error of ours.
        sys.stderr.close()
        return EXIT_OK
    except Exception as exc:
        code = _exit_code_of(exc)
        if code is None:
            raise
        print(f"agent-bus {args.command}: {exc}", file=sys.stderr)
        return code


def _exit_code_of(exc: Exception) -> int | None:
    """The exit code of a client, mailbox or store error; None for anything else. An error
    of a module the command never imported cannot have happened, so none is imported here
    (`drop` and `inbox` start without the client and the store)."""
    package = __name__.rpartition(".")[0]
    client = sys.modules.get(f"{package}.client")
    if client is not None and isinstance(exc, client.BusClientError):
        return exit_code_for(exc)
    mailbox = sys.modules.get(f"{package}.mailbox")
    if mailbox is not None and isinstance(exc, mailbox.MailboxError):
        return EXIT_USAGE if exc.kind == mailbox.USAGE else EXIT_REFUSED
    store = sys.modules.get(f"{package}.store")
    if store is not None and isinstance(exc, store.StoreError):
        return EXIT_USAGE
    return None


def die(message: str, code: int = EXIT_USAGE) -> NoReturn:
    raise CommandError(message, code)
