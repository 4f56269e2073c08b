"""The one place a --db value becomes a store: a PostgreSQL URL or a SQLite path.

Apart from the stores so that what needs only a store (the server, `agent-bus token`,
`migrate`) reaches it without the HTTP side, and a SQLite bus never loads psycopg.
"""
from __future__ import annotations

import asyncio

from .model import Limits, NewMessage, SendResult, check_message
from .store import Store, is_postgres
from .store_sqlite import SQLiteStore


def open_store(db: str, exclusive: bool = True) -> Store:
    """`exclusive`: the store of a serving server (it takes a SQLite file for itself,
    and listens for the commits of other servers sharing a PostgreSQL database);
    False for admin commands working beside a running server.
    """
    if is_postgres(db):
        from .store_pg import PostgresStore  # psycopg only for PostgreSQL
        return PostgresStore(db, listen=exclusive)
    return SQLiteStore(db, exclusive=exclusive)


def append_directly(db: str, message: NewMessage, limits: Limits | None = None) -> SendResult:
    """Store one message straight into the database, beside a server that may be serving
    it, through the store's own write path (`agent-bus send --db`): the same stamps in
    commit order, the same idempotency keys, the same rules as a /send on the message
    (sizes after `limits`, the defaults if None). A server on the database wakes the
    long-polls it concerns (SQLite: it watches the WAL; PostgreSQL: the commit notifies).

    Who may send as `message.sender`, and its signature, are the caller's to check first,
    as a /send's are (identity.Access).
    """
    checked = check_message(message, limits or Limits())

    async def append() -> SendResult:
        store = open_store(db, exclusive=False)
        await store.open()
        try:
            return await store.append(checked)
        finally:
            await store.close()

    return asyncio.run(append())
