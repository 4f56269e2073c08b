"""PostgreSQL replicas take turns on the clock row (store_pg.py): a replica locks it before
it fixes its group, so the sends that reach it while another replica holds the clock
commit with that group, in one transaction, instead of waiting for a turn of their own.
Here the other replica is a connection of the test that holds the clock row's lock."""
from __future__ import annotations

import asyncio

import psycopg

from busd.model import NewMessage
from busd.store_pg import PostgresStore


def message(number: int, key: str | None = None) -> NewMessage:
    return NewMessage(channel="default", sender=f"s{number % 3}", to="r", body=f"m{number}",
                      meta=None, key=key, signature=None)


async def waiting_for_the_clock(other: psycopg.AsyncConnection, store: PostgresStore) -> None:
    """Until the store's writer waits for the lock the test holds (bounded)."""
    for _ in range(500):
        cursor = await other.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
            "AND wait_event_type = 'Lock'", (store.replica,))
        if (await cursor.fetchone())[0] > 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the store's writer never waited for the clock row")


def test_sends_that_arrive_while_another_replica_holds_the_clock_join_the_waiting_group(
        postgres_db):
    async def run() -> None:
        store = PostgresStore(postgres_db)
        await store.open()
        commits: list[list] = []
        store.on_commit = commits.append
        other = await psycopg.AsyncConnection.connect(postgres_db, autocommit=True)
        try:
            await other.execute("BEGIN")
            await other.execute("SELECT last_id FROM clock FOR UPDATE")
            first = asyncio.create_task(store.append(message(0, key="k")))
            await waiting_for_the_clock(other, store)
            later = [asyncio.create_task(store.append(message(n))) for n in range(1, 10)]
            # The same key again, while its first send waits: answered with that one.
            repeat = asyncio.create_task(store.append(message(0, key="k")))
            await asyncio.sleep(0)  # every task has joined the forming group
            await other.execute("COMMIT")
            results = await asyncio.gather(first, *later, repeat)
        finally:
            await other.close()
            await store.close()
        assert [len(batch) for batch in commits] == [10]
        stored = [r.message for r in results[:10]]
        assert [m.body for m in stored] == [f"m{n}" for n in range(10)]
        ids = [m.id for m in stored]
        assert ids == list(range(ids[0], ids[0] + 10))
        assert all(a.ts < b.ts for a, b in zip(stored, stored[1:]))
        assert results[10].duplicate and results[10].message.id == stored[0].id

    asyncio.run(run())
