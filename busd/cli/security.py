"""Credentials: `agent-bus token`, `keygen`, `operator seed`, `register`.

`token` and `operator seed` are the bus operator's commands: they work on the
server's database directly, a SQLite file or a PostgreSQL URL (beside running
servers, which see the change at once). `keygen` only writes files. `register`
signs on this machine and sends only the signature.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

from .. import signing
from ..identity import hash_token, new_token
from ..model import check_channel, check_name
from ..errors import BusError
from ..store import StoreError, shown_database
from . import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, CommandError, Env, command


DB_HELP = ("the server's database: a SQLite path or a postgresql:// URL (default: the "
           "server's default SQLite path)")


def register(commands: argparse._SubParsersAction) -> None:
    actions = group(commands, "token", "create, list or revoke bearer tokens (on the server's "
                    "database)", "Manage per-agent bearer tokens. Once any token exists, every "
                    "request needs one. The database keeps only a hash: a token is shown once.")
    create = command(actions, "create", _token_create)
    create.add_argument("name", help="the agent the token is bound to")
    create.add_argument("--channels", default=None,
                        help="comma-separated channels it may use (default: every channel)")
    create.add_argument("--admin", action="store_true",
                        help="may also read /inbox, /channels and agent details")
    create.add_argument("--db", default=None, help=DB_HELP)
    revoke = command(actions, "revoke", _token_revoke)
    revoke.add_argument("name", nargs="?", default=None, help="revoke every token of this agent")
    revoke.add_argument("--id", type=int, default=None, help="revoke only the token with this id")
    revoke.add_argument("--db", default=None, help=DB_HELP)
    listing = command(actions, "list", _token_list)
    listing.add_argument("--db", default=None, help=DB_HELP)

    keygen = command(commands, "keygen", _keygen)
    keygen.add_argument("--out", required=True, metavar="PREFIX", help="write PREFIX.key and PREFIX.pub")

    op_actions = group(commands, "operator", "seed an operator key (turns on secure mode)",
                       "Operators authorise agents' keys. The first one turns on secure mode: "
                       "from then on every send must be signed.")
    seed = command(op_actions, "seed", _operator_seed)
    seed.add_argument("name", help="the operator's name")
    seed.add_argument("--out", default=None, metavar="PREFIX",
                      help="write PREFIX.key and PREFIX.pub instead of printing the private key")
    seed.add_argument("--db", default=None, help=DB_HELP)

    elipc_seed = command(commands, "seed", _seed)
    elipc_seed.add_argument("name", help="the operator's name")
    elipc_seed.add_argument("--db", default=None, help=DB_HELP)
    elipc_seed.set_defaults(out=None)

    reg = command(commands, "register", _register)
    reg.add_argument("name", help="the agent to register")
    reg.add_argument("--pubkey", required=True, help="the agent's public key file (PEM)")
    reg.add_argument("--as", dest="operator", required=True, help="the operator's name")
    reg.add_argument("--key", required=True, help="the operator's private key file")
    reg.add_argument("--identity", default="", help="a secondary identifier (UUID, description)")


def group(commands: argparse._SubParsersAction, name: str, help: str,
          description: str) -> argparse._SubParsersAction:
    """A command made of actions (`agent-bus token create`): their subparsers."""
    parser = commands.add_parser(name, help=help, description=description)
    return parser.add_subparsers(dest="action", metavar="ACTION", required=True)


def _db(args: argparse.Namespace, env: Env) -> str:
    path = args.db or env.db
    if not path.startswith(("postgresql://", "postgres://")) and not os.path.exists(path):
        raise CommandError(f"no bus database at {path}; start the server once (agent-bus serve) "
                           "or pass --db", EXIT_USAGE)
    return path


def _with_store(db: str, work):
    # Imported here: only these commands need a store.
    from ..store_factory import open_store

    async def run():
        store = open_store(db, exclusive=False)
        await store.open()
        try:
            return await work(store)
        finally:
            await store.close()
    try:
        return asyncio.run(run())
    except StoreError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    except BusError as exc:
        raise CommandError(f"{shown_database(db)}: {exc.message}", EXIT_REFUSED) from None


def _valid(check, value, what: str) -> str:
    try:
        return check(value, what)
    except BusError as exc:
        raise CommandError(exc.message, EXIT_USAGE) from None


def _token_create(args: argparse.Namespace, env: Env) -> int:
    """create a token for NAME and print it once"""
    name = _valid(check_name, args.name, "name")
    channels = None
    if args.channels:
        channels = tuple(_valid(check_channel, c.strip(), "channel")
                         for c in args.channels.split(",") if c.strip())
    token = new_token()
    _with_store(_db(args, env), lambda store: store.create_token(
        hash_token(token), name, channels, args.admin))
    print(token)
    print(f"agent-bus token: created for {name}; it is shown only now. Give it to the agent "
          f"as AGENT_BUS_TOKEN.", file=sys.stderr)
    return EXIT_OK


def _token_revoke(args: argparse.Namespace, env: Env) -> int:
    """revoke NAME's tokens (or one, with --id)"""
    if (args.name is None) == (args.id is None):
        raise CommandError("name an agent, or give --id (not both)", EXIT_USAGE)
    count = _with_store(_db(args, env), lambda store: store.revoke_tokens(args.name, args.id))
    if not count:
        raise CommandError("no active token matched; nothing revoked", EXIT_REFUSED)
    print(f"revoked {count} token{'s' if count != 1 else ''}")
    return EXIT_OK


def _token_list(args: argparse.Namespace, env: Env) -> int:
    """list tokens (never their secret)"""
    for row in _with_store(_db(args, env), lambda store: store.list_tokens()):
        print(json.dumps(row))
    return EXIT_OK


def _keygen(args: argparse.Namespace, env: Env) -> int:
    """make an Ed25519 keypair: PREFIX.key (0600) and PREFIX.pub

    Make an Ed25519 keypair as PEM files (PKCS8 private, SubjectPublicKeyInfo public),
    interchangeable with the el-ipc tool's."""
    try:
        key_path, pub_path = signing.write_keypair(args.out)
    except signing.SigningError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    print(f"private key: {key_path} (0600, keep it here)\npublic key:  {pub_path}")
    return EXIT_OK


def _operator_seed(args: argparse.Namespace, env: Env) -> int:
    """make operator NAME's keypair; store the public key"""
    name = _valid(check_name, args.name, "name")
    path = _db(args, env)

    async def seed(store):
        if await store.public_key(name) is not None:
            raise CommandError(f"{name} already exists on this bus", EXIT_REFUSED)
        if args.out:
            key_path, pub_path = signing.write_keypair(args.out)
            with open(pub_path, encoding="ascii") as handle:
                public = handle.read()
            private = None
        else:
            private, public = signing.generate()
        await store.register_agent(name, "", public, "operator", None)
        return private

    try:
        private = _with_store(path, seed)
    except signing.SigningError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    print(f"agent-bus operator: {name} seeded; secure mode is on (every send must be signed).",
          file=sys.stderr)
    if private is not None:
        print("agent-bus operator: save the private key below; it is not stored anywhere.",
              file=sys.stderr)
        sys.stdout.write(private)
    return EXIT_OK


def _seed(args: argparse.Namespace, env: Env) -> int:
    """make operator NAME's keypair: store the public key, print the private one (el-ipc's seed)

    el-ipc's `seed NAME > operator.key`: make an Ed25519 keypair for operator NAME, store
    its public half in the bus's database (which turns on secure mode: every send must be
    signed from then on) and print the private key PEM on standard output, once; it is
    stored nowhere. The same as `agent-bus operator seed NAME`."""
    return _operator_seed(args, env)


def _register(args: argparse.Namespace, env: Env) -> int:
    """register agent NAME's public key, signed by an operator

    Sign NAME's registration with the operator's private key here, and send the bus only the
    signature."""
    try:
        with open(args.pubkey, encoding="ascii") as handle:
            public = handle.read().strip() + "\n"
        signing.load_public(public, args.pubkey)
        operator_key = signing.read_private_file(args.key)
    except (OSError, UnicodeDecodeError, signing.SigningError) as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    signed_at = int(time.time() * 1000)
    signature = signing.sign(operator_key, signing.register_payload(
        args.name, args.identity, public, signed_at))
    reply = env.client().request("POST", "/register", body={
        "name": args.name, "public_key": public, "identity": args.identity,
        "operator": args.operator, "signature": signature, "signed_at": signed_at})
    print(json.dumps(reply))
    return EXIT_OK
