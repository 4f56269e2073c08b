"""The one place a --db value becomes a store: a PostgreSQL URL or a SQLite path.

Apart from the stores so that what needs only a store (the server, `agent-bus token`,
`migrate`) reaches it without the HTTP side, and a SQLite bus never loads psycopg.
"""
from __future__ import annotations

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
