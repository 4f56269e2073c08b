"""The schema the migrations make, on both stores, against a snapshot taken from the
code that first shipped it: a database an older agent-bus made must open and work
with this one, so a change to how migrations are written must not change what they make.

The snapshots (tests/data/schema-vN-*.txt) were dumped by `dump_sqlite`/`dump_postgres`
below from the code that first made each version: v4 from c076502 (the commit before the
store core), v5 from b6023f5, v6 from the h18 branch (read receipts). A new migration adds a new snapshot; these stay as they are.
"""
from __future__ import annotations

import asyncio
import re
import sqlite3
from pathlib import Path

import pytest

SNAPSHOTS = Path(__file__).resolve().parent / "data"
VERSIONS = (4, 5, 6)


def _squeeze(sql: str) -> str:
    sql = re.sub(r"--[^\n]*", "", sql)
    sql = re.sub(r"\s+", " ", sql).strip()
    return re.sub(r"\s*([(),])\s*", r"\1", sql)


def dump_sqlite(path: str) -> str:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master "
                            "WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name").fetchall()
        version = conn.execute("SELECT version FROM schema_version").fetchall()
    finally:
        conn.close()
    lines = [f"{kind} {name} on {table}: {_squeeze(sql or '')}" for kind, name, table, sql in rows]
    return "\n".join([*lines, f"schema_version rows: {version}"]) + "\n"


def dump_postgres(url: str) -> str:
    import psycopg
    queries = {
        "column": "SELECT table_name, column_name, data_type, is_nullable, column_default, "
                  "is_identity, identity_generation FROM information_schema.columns "
                  "WHERE table_schema = 'public' ORDER BY table_name, ordinal_position",
        "index": "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' "
                 "ORDER BY indexname",
        "constraint": "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
                      "FROM pg_constraint WHERE connamespace = 'public'::regnamespace "
                      "ORDER BY 1, 2",
        "clock": "SELECT * FROM clock",
        "schema_version": "SELECT version FROM schema_version",
    }
    lines = []
    with psycopg.connect(url) as conn:
        for what, sql in queries.items():
            lines += [f"{what}: {row}" for row in conn.execute(sql).fetchall()]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("version", VERSIONS)
def test_sqlite_migrations_make_the_schema_they_always_made(tmp_path, version):
    from busd.store_sqlite import SQLiteStore
    path = str(tmp_path / "bus.db")
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        assert SQLiteStore._migrate(conn, upto=version) == (0, version)
    finally:
        conn.close()
    assert dump_sqlite(path) == (SNAPSHOTS / f"schema-v{version}-sqlite.txt").read_text()


@pytest.mark.parametrize("version", VERSIONS)
def test_postgres_migrations_make_the_schema_they_always_made(postgres_db, version):
    from busd.store_pg import PostgresStore

    async def migrate() -> tuple[int, int]:
        store = PostgresStore(postgres_db, listen=False)
        conn = await store._connect()
        try:
            return await store._migrate(conn, upto=version)
        finally:
            await conn.close()

    assert asyncio.run(migrate()) == (0, version)
    assert dump_postgres(postgres_db) == \
        (SNAPSHOTS / f"schema-v{version}-postgresql.txt").read_text()
