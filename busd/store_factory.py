"""The one place a --db value becomes a store: a PostgreSQL URL or a SQLite path.

Apart from the stores so that what needs only a store (the server, `agent-bus token`,
`migrate`, the `--db` commands) reaches it without the HTTP side, and a SQLite bus
never loads psycopg.
"""
from __future__ import annotations

from .store import Store, is_postgres
from .store_sqlite import SQLiteStore


def open_store(db: str, exclusive: bool = True, listen: bool | None = None) -> Store:
    """`exclusive`: the store of a serving server (it takes a SQLite file for itself);
    False for commands working beside a running server (busd/direct.py, the admin
    commands). `listen`: hear the commits of other processes sharing the database (to
    wake long-polls); by default a serving store does and others do not.
    """
    listen = exclusive if listen is None else listen
    if is_postgres(db):
        from .store_pg import PostgresStore  # psycopg only for PostgreSQL
        return PostgresStore(db, listen=listen)
    return SQLiteStore(db, exclusive=exclusive, listen=listen)
