"""The bus straight on its database, with no server: what `agent-bus ... --db` talks to
(el-ipc's CLI mode: "local agents read and write the database directly").

`DirectBus` answers the calls the HTTP client (busd/client.py BusClient) answers, with
the same shapes, by running the bus's own flows (busd/service.py) in this process on
the store opened beside any server that serves the database (never exclusively: it
stays one server per database file). So a send here is checked, signed, stored and
acknowledged as a /send is, a read moves the el-ipc watermark as GET /messages does,
and a server on the same database wakes the long-polls a commit here concerns (SQLite:
its WAL watch; PostgreSQL: the commit's NOTIFY, as a replica's).

Who calls here has the database itself, which is what an operator has: tokens do not
apply (a token's limits guard the server's door, and the file's owner can make tokens),
every other rule does -- above all secure mode: once an operator exists, a send must
be signed by its sender's registered key. Errors are BusError, as the flows raise them.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Callable

from . import __version__, errors, model, service
from .errors import BusError, replayed_ack
from .identity import OPEN, Access
from .service import Bus, BusSettings
from .store_factory import open_store

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


class DirectBus:
    """The bus in database `db` (a SQLite path or a postgresql:// URL). The store is
    opened on the first call and kept until `close()`; `listen`: hear other processes'
    commits, which a waiting read needs."""

    def __init__(self, db: str, *, settings: BusSettings | None = None,
                 signing_key: Ed25519PrivateKey | None = None, url: str = "",
                 listen: bool = False):
        self.db = db
        self.settings = settings or BusSettings()
        self.signing_key = signing_key
        self.url = url            # where a server on this database is reached (the card's url)
        self.listen = listen
        self._runner: asyncio.Runner | None = None
        self._bus: Bus | None = None

    def _run(self, flow: Callable[[Bus], Any]) -> Any:
        if self._runner is None:
            self._runner = asyncio.Runner()
        return self._runner.run(self._call(flow))

    async def _call(self, flow: Callable[[Bus], Any]) -> Any:
        if self._bus is None:
            store = open_store(self.db, exclusive=False, listen=self.listen)
            await store.open()
            bus = Bus(store=store, settings=self.settings, access=Access(store))
            bus.hear_commits()
            self._bus = bus
        return await flow(self._bus)

    def close(self) -> None:
        """Finish every write already accepted (receipts, contacts), release the database."""
        if self._runner is None:
            return
        try:
            if self._bus is not None:
                self._runner.run(self._bus.store.close())
        finally:
            self._bus = None
            self._runner.close()
            self._runner = None

    def __enter__(self) -> "DirectBus":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the calls BusClient answers ------------------------------------------------

    def send(self, sender: str, to: str, msg: str, *, channel: str = model.DEFAULT_CHANNEL,
             key: str | None = None, meta: dict | None = None) -> dict:
        """Store one message as a rapid /send does (signed when a key is held); its ack."""
        signed: dict = {}
        if self.signing_key is not None:
            from . import signing
            try:
                signed = signing.sign_send(self.signing_key, channel, sender, to, msg, meta, key)
            except signing.SigningError as exc:
                raise BusError(errors.BAD_SIGNATURE_FORMAT,
                               f"cannot sign this message: {exc}") from None
            key = signed["key"]
        message = model.check_message(model.NewMessage(
            channel=channel, sender=sender, to=to, body=msg, meta=meta, key=key,
            signature=signed.get("signature")), self.settings.limits)

        async def flow(bus: Bus) -> dict:
            try:
                return service.send_ack(await service.send(
                    bus, OPEN, message, signed_at=signed.get("signed_at")))
            except BusError as exc:
                if exc.kind is errors.REPLAY:
                    return replayed_ack(channel, exc.fields)  # our own earlier send: stored
                raise
        return self._run(flow)

    def messages(self, channel: str, agent: str, wait: bool = False) -> list[dict]:
        """el-ipc's read (GET /messages): `agent`'s unread messages on `channel`, its
        watermark moved past them; `wait` holds until one comes or the hold ends."""
        model.check_channel(channel)
        model.check_name(agent, "agent")

        async def flow(bus: Bus) -> list[dict]:
            found = await service.read_unread(bus, OPEN, channel, agent, wait)
            return [m.as_elipc() for m in found]
        return self._run(flow)

    def channels(self) -> list[dict]:
        return self._run(lambda bus: service.channels(bus, OPEN))

    def agents(self) -> list[dict]:
        return self._run(lambda bus: service.agents(bus, OPEN))

    def status(self, ids: list[int]) -> list[dict]:
        return self._run(lambda bus: service.states(bus, OPEN, ids))

    def agent_card(self) -> dict:
        return self._run(lambda bus: service.card(bus, self.url, __version__))
