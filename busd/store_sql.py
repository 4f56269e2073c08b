"""The schema and every statement both stores run, written once, and the two dialects.

Statements are written in PostgreSQL's spelling: `%s` and `%(name)s` parameters,
GREATEST, `= ANY(%s)` for a list parameter, and ROWS_OF(types) for a batch of rows
(PostgreSQL unnests one array a column; SQLite runs the statement once a row).
`SQLiteDialect.render` rewrites those few constructs; the migrations' column types
come from each dialect. What differs beyond spelling (how ids and ts are stamped,
how other servers hear of a commit) stays in each store.
"""
from __future__ import annotations

import json
import re
from typing import Any, Sequence


# PostgreSQL's clock counts whole microseconds; a ts is seconds. Written once: `now` and
# message stamps must convert alike.
US_TO_TS = "::float8 / 1000000"


class PostgresDialect:
    # `now`: the clock as committed (see store.CommitClock).
    clock_now = f"SELECT last_us{US_TO_TS} AS now FROM clock"
    types = {
        # One row: where ids and ts go on from. Updating it is the lock that orders
        # every message-writing transaction of every replica (store_pg).
        "clock_table": """
            CREATE TABLE clock (
                only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
                last_id  BIGINT  NOT NULL,
                last_us  BIGINT  NOT NULL
            );
            INSERT INTO clock (only_row, last_id, last_us) VALUES (TRUE, 0, 0);""",
        "message_id": "BIGINT PRIMARY KEY",
        "serial": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        "bigint": "BIGINT",
        "real": "DOUBLE PRECISION",
        # bytea: PostgreSQL text cannot hold the NUL a message may carry.
        "body": "BYTEA",
        "bool": "BOOLEAN",
        "false": "FALSE",
        "without_rowid": "",
    }

    def render(self, sql: str) -> str:
        return _ROWS_OF.sub(lambda m: "SELECT * FROM unnest({})".format(", ".join(
            f"%s::{kind.strip()}[]" for kind in m.group(1).split(","))), sql)

    @staticmethod
    def array(values: Sequence) -> Any:
        """The parameter for `= ANY(%s)`."""
        return list(values)

    @staticmethod
    def batch(rows: list[tuple]) -> list[tuple]:
        """The parameter sets that write `rows` through a ROWS_OF statement: one, of columns."""
        return [tuple(list(column) for column in zip(*rows))] if rows else []


class SQLiteDialect(PostgresDialect):
    # The clock row is `meta`'s "clock", a ts written as repr() text (exact in Python;
    # SQLite's own REAL-to-text conversion would round it); none yet in a new database.
    clock_now = "SELECT COALESCE((SELECT value FROM meta WHERE key = 'clock'), '0') AS now"
    types = {
        "clock_table": "",  # the clock row is in `meta` (store_sqlite)
        # AUTOINCREMENT: ids of deleted messages are never given again.
        "message_id": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "serial": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "bigint": "INTEGER",
        "real": "REAL",
        "body": "TEXT",
        "bool": "INTEGER",
        "false": "0",
        "without_rowid": " WITHOUT ROWID",
    }

    def render(self, sql: str) -> str:
        sql = _ROWS_OF.sub(lambda m: "VALUES ({})".format(
            ", ".join("?" for _ in m.group(1).split(","))), sql)
        sql = sql.replace("= ANY(%s)", "IN (SELECT value FROM json_each(%s))")
        sql = re.sub(r"\bGREATEST\(", "MAX(", sql)
        sql = re.sub(r"%\((\w+)\)s", r":\1", sql)
        return sql.replace("%s", "?")

    @staticmethod
    def array(values: Sequence) -> Any:
        return json.dumps(list(values))

    @staticmethod
    def batch(rows: list[tuple]) -> list[tuple]:
        return rows


_ROWS_OF = re.compile(r"ROWS_OF\(([^)]*)\)")
SQLITE, POSTGRES = SQLiteDialect(), PostgresDialect()


# Numbered migrations: index + 1 is the schema version each one produces. Never edit
# one that has shipped (tests/test_store_schema.py holds what they make); add another.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    {clock_table}
    CREATE TABLE messages (
        id        {message_id},
        ts        {real} NOT NULL UNIQUE,
        channel   TEXT NOT NULL,
        from_name TEXT NOT NULL,
        to_name   TEXT NOT NULL,
        body      {body} NOT NULL,
        meta      TEXT,
        key       TEXT,
        signature TEXT
    );
    CREATE UNIQUE INDEX messages_by_key ON messages (from_name, key) WHERE key IS NOT NULL;
    CREATE INDEX messages_by_recipient ON messages (to_name, channel, ts);
    CREATE INDEX messages_by_channel ON messages (channel, id);
    CREATE TABLE watermarks (
        agent   TEXT NOT NULL,
        channel TEXT NOT NULL,
        last_id {bigint} NOT NULL,
        PRIMARY KEY (agent, channel)
    ){without_rowid};
    CREATE TABLE acknowledged (
        agent   TEXT NOT NULL,
        channel TEXT NOT NULL,
        ts      {real} NOT NULL,
        PRIMARY KEY (agent, channel)
    ){without_rowid};
    CREATE TABLE agents (
        name          TEXT PRIMARY KEY,
        identity      TEXT NOT NULL DEFAULT '',
        public_key    TEXT NOT NULL,
        role          TEXT NOT NULL DEFAULT 'agent',
        registered_by TEXT,
        created_at    {real} NOT NULL
    );
    """,
    # 2: per-agent bearer tokens; only a hash of each token is kept.
    """
    CREATE TABLE tokens (
        id         {serial},
        hash       TEXT NOT NULL UNIQUE,
        agent      TEXT NOT NULL,
        channels   TEXT,
        admin      {bool} NOT NULL DEFAULT {false},
        created_at {real} NOT NULL,
        revoked_at {real}
    );
    CREATE INDEX tokens_by_agent ON tokens (agent);
    """,
    # 3: delivery receipts (what each reader fetched and filed) and last contact.
    """
    ALTER TABLE acknowledged ADD COLUMN delivered_ts {real} NOT NULL DEFAULT 0;
    ALTER TABLE acknowledged ADD COLUMN filed_ts {real} NOT NULL DEFAULT 0;
    UPDATE acknowledged SET delivered_ts = ts;
    CREATE TABLE presence (
        agent     TEXT PRIMARY KEY,
        last_seen {real} NOT NULL
    ){without_rowid};
    """,
    # 4: what recipients' daemons found when they checked a handoff on arrival.
    """
    CREATE TABLE handoff_checks (
        message_id {bigint} NOT NULL,
        agent      TEXT NOT NULL,
        result     TEXT NOT NULL,
        checked_at {real} NOT NULL,
        PRIMARY KEY (message_id, agent)
    ){without_rowid};
    """,
    # 5: `signed` means verified. Until now an unverifiable signature (a sender with no
    # registered key, on a bus without an operator) was kept and shown as signed: keep a
    # stored signature only where its sender had a registered key when it was sent, the
    # only case in which the bus verified it. And each agent's registration remembers
    # when its operator signed it, so a replayed or older registration is refused.
    """
    ALTER TABLE agents ADD COLUMN registration_signed_at {bigint};
    UPDATE messages SET signature = NULL
        WHERE signature IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM agents WHERE agents.name = messages.from_name
                                   AND agents.created_at <= messages.ts);
    """,
    # 6: `read` receipts: which recipient was shown which message (a hook put it in its
    # model's context, an MCP tool returned it, a person read it with `inbox --read`).
    """
    CREATE TABLE read_receipts (
        message_id {bigint} NOT NULL,
        agent      TEXT NOT NULL,
        read_at    {real} NOT NULL,
        PRIMARY KEY (message_id, agent)
    ){without_rowid};
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)

_COLUMNS = "id, ts, channel, from_name, to_name, body, meta, signature"

# A recipient gets what is addressed to it and what others broadcast on the channel.
_RECV = (f"SELECT {_COLUMNS} FROM messages WHERE to_name IN (%(to)s, '*') {{channel}}"
         "AND ts > %(since)s AND NOT (to_name = '*' AND from_name = %(to)s) "
         "ORDER BY ts LIMIT %(limit)s")

# `now` from the same statement, so the same snapshot, as the messages it goes with; one
# row with no message when none matched.
_WITH_NOW = "SELECT c.now, m.* FROM ({clock}) c LEFT JOIN ({recv}) m ON TRUE ORDER BY m.ts"

# el-ipc readers see the whole channel's broadcasts (their own included, as the
# older server did) and what is addressed to them, past their watermark.
_UNREAD = ("FROM messages WHERE channel = %(channel)s AND id > COALESCE((SELECT last_id "
           "FROM watermarks WHERE agent = %(agent)s AND channel = %(channel)s), 0) "
           "AND to_name IN (%(agent)s, '*')")

# Not yet fetched by its recipient (on that channel, or by an all-channels reader).
_NOT_FETCHED = (
    "m.to_name <> '*' AND m.ts > GREATEST("
    "COALESCE((SELECT delivered_ts FROM acknowledged WHERE agent = m.to_name "
    "AND channel = m.channel), 0), "
    "COALESCE((SELECT delivered_ts FROM acknowledged WHERE agent = m.to_name "
    "AND channel = '*'), 0))")
_NEVER_SEEN = ("(m.to_name NOT IN (SELECT agent FROM presence) "
               "AND m.to_name NOT IN (SELECT name FROM agents))")


class Queries:
    """Every statement both stores run, in one dialect's spelling (an instance's
    attributes are the class's, rendered)."""

    create_version_table = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
    get_version = "SELECT version FROM schema_version"
    set_version = "UPDATE schema_version SET version = %s"
    init_version = "INSERT INTO schema_version (version) VALUES (0)"
    # A transaction's end, where a store opens one itself.
    commit = "COMMIT"
    roll_back = "ROLLBACK"

    find_by_key = f"SELECT {_COLUMNS} FROM messages WHERE from_name = %s AND key = %s"
    recv = _RECV.format(channel="AND channel = %(channel)s ")
    recv_all_channels = _RECV.format(channel="")
    messages_by_id = f"SELECT {_COLUMNS} FROM messages WHERE id = ANY(%s) ORDER BY id"
    # The operator console's feed: every recipient's messages, newest first (the
    # caller turns them round), optionally one channel's, or those from or to one agent.
    recent = (f"SELECT {_COLUMNS} FROM messages WHERE id > %(after)s "
              "AND (CAST(%(channel)s AS TEXT) IS NULL OR channel = %(channel)s) "
              "AND (CAST(%(agent)s AS TEXT) IS NULL OR from_name = %(agent)s "
              "OR to_name = %(agent)s) ORDER BY id DESC LIMIT %(limit)s")

    unread = f"SELECT {_COLUMNS} {_UNREAD} ORDER BY id LIMIT %(limit)s"
    count_unread = f"SELECT COUNT(*) {_UNREAD}"
    set_watermark = ("INSERT INTO watermarks (agent, channel, last_id) VALUES (%s, %s, %s) "
                     "ON CONFLICT (agent, channel) DO UPDATE SET last_id = "
                     "GREATEST(watermarks.last_id, excluded.last_id)")

    # A group's receipts in one batch, in key order: two replicas writing the same
    # rows take their locks in the same order, so never deadlock.
    acknowledge = (
        "INSERT INTO acknowledged (agent, channel, ts, delivered_ts, filed_ts) "
        "ROWS_OF(text, text, float8, float8, float8) ON CONFLICT (agent, channel) DO UPDATE "
        "SET ts = GREATEST(acknowledged.ts, excluded.ts), "
        "delivered_ts = GREATEST(acknowledged.delivered_ts, excluded.delivered_ts), "
        "filed_ts = GREATEST(acknowledged.filed_ts, excluded.filed_ts)")
    note_contacts = ("INSERT INTO presence (agent, last_seen) ROWS_OF(text, float8) "
                     "ON CONFLICT (agent) DO UPDATE SET last_seen = "
                     "GREATEST(presence.last_seen, excluded.last_seen)")
    last_contacts = "SELECT agent, last_seen FROM presence"
    receipts = ("SELECT agent, channel, delivered_ts, filed_ts FROM acknowledged "
                "WHERE channel = ANY(%s)")
    watermarks = "SELECT agent, channel, last_id FROM watermarks WHERE channel = ANY(%s)"
    # rapid's /inbox: every queue's length, read or not.
    queues = "SELECT channel, to_name, COUNT(*) FROM messages GROUP BY channel, to_name"
    pending = (f"SELECT m.channel, m.to_name, COUNT(*) FROM messages m WHERE {_NOT_FETCHED} "
               "GROUP BY m.channel, m.to_name")
    undelivered = (f"SELECT m.id, m.ts, m.from_name, m.to_name, m.channel, {_NEVER_SEEN} "
                   f"FROM messages m WHERE {_NOT_FETCHED} AND (m.ts < %s OR {_NEVER_SEEN}) "
                   "ORDER BY m.id LIMIT %s")

    record_handoff_check = (
        "INSERT INTO handoff_checks (message_id, agent, result, checked_at) "
        "VALUES (%s, %s, %s, %s) ON CONFLICT (message_id, agent) DO UPDATE SET "
        "result = excluded.result, checked_at = excluded.checked_at")
    handoff_checks = ("SELECT message_id, agent, result FROM handoff_checks "
                      "WHERE message_id = ANY(%s)")
    # The first report of a read stands: a later one changes nothing.
    record_reads = ("INSERT INTO read_receipts (message_id, agent, read_at) "
                    "SELECT id, %s, %s FROM messages WHERE id = ANY(%s) "
                    "ON CONFLICT (message_id, agent) DO NOTHING")
    reads = "SELECT message_id, agent FROM read_receipts WHERE message_id = ANY(%s)"
    channels = ("SELECT channel, COUNT(*), MAX(ts) FROM messages "
                "GROUP BY channel ORDER BY MAX(ts) DESC")

    # Retention: messages past the age or beyond the per-queue cap, but only those
    # every known reader has already gone past; an unread message is never dropped.
    retention_candidates = """
        WITH ranked AS (
            SELECT id, ts, channel, from_name, to_name,
                   ROW_NUMBER() OVER (PARTITION BY channel, to_name ORDER BY id DESC) AS newer
            FROM messages
        )
        SELECT r.id FROM ranked r
        WHERE (r.ts < %(cutoff)s OR r.newer > %(cap)s)
          AND CASE WHEN r.to_name <> '*' THEN
                r.ts <= GREATEST(
                    COALESCE((SELECT ts FROM acknowledged
                              WHERE agent = r.to_name AND channel = r.channel), 0),
                    COALESCE((SELECT ts FROM acknowledged
                              WHERE agent = r.to_name AND channel = '*'), 0))
                AND r.id <= COALESCE((SELECT last_id FROM watermarks
                                      WHERE agent = r.to_name AND channel = r.channel), r.id)
              ELSE
                EXISTS (SELECT 1 FROM acknowledged WHERE channel IN (r.channel, '*')
                        UNION ALL SELECT 1 FROM watermarks WHERE channel = r.channel)
                AND NOT EXISTS (SELECT 1 FROM acknowledged a WHERE a.channel IN (r.channel, '*')
                                AND a.agent <> r.from_name AND a.ts < r.ts)
                AND NOT EXISTS (SELECT 1 FROM watermarks w WHERE w.channel = r.channel
                                AND w.agent <> r.from_name AND w.last_id < r.id)
              END
        ORDER BY r.id
        LIMIT 5000
        """
    delete_messages = "DELETE FROM messages WHERE id = ANY(%s)"
    delete_handoff_checks = "DELETE FROM handoff_checks WHERE message_id = ANY(%s)"
    delete_reads = "DELETE FROM read_receipts WHERE message_id = ANY(%s)"

    token_by_hash = ("SELECT id, agent, channels, admin FROM tokens "
                     "WHERE hash = %s AND revoked_at IS NULL")
    any_token = "SELECT EXISTS (SELECT 1 FROM tokens WHERE revoked_at IS NULL)"
    create_token = ("INSERT INTO tokens (hash, agent, channels, admin, created_at) "
                    "VALUES (%s, %s, %s, %s, %s)")
    revoke_agent_tokens = ("UPDATE tokens SET revoked_at = %s "
                           "WHERE agent = %s AND revoked_at IS NULL")
    revoke_token = "UPDATE tokens SET revoked_at = %s WHERE id = %s AND revoked_at IS NULL"
    list_tokens = ("SELECT id, agent, channels, admin, created_at, revoked_at FROM tokens "
                   "ORDER BY id")
    public_key = "SELECT public_key, role FROM agents WHERE name = %s"
    first_operator = ("SELECT public_key FROM agents WHERE role = 'operator' "
                      "ORDER BY created_at, name LIMIT 1")
    register = ("INSERT INTO agents (name, identity, public_key, role, registered_by, "
                "created_at) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO UPDATE SET "
                "identity = excluded.identity, public_key = excluded.public_key, "
                "role = excluded.role, registered_by = excluded.registered_by")
    # A registration takes effect only over an older one (or none), never over an operator.
    register_signed = (
        "INSERT INTO agents (name, identity, public_key, role, registered_by, created_at, "
        "registration_signed_at) VALUES (%s, %s, %s, 'agent', %s, %s, %s) "
        "ON CONFLICT (name) DO UPDATE SET identity = excluded.identity, "
        "public_key = excluded.public_key, role = excluded.role, "
        "registered_by = excluded.registered_by, "
        "registration_signed_at = excluded.registration_signed_at "
        "WHERE agents.role = 'agent' AND (agents.registration_signed_at IS NULL "
        "OR agents.registration_signed_at < excluded.registration_signed_at)")
    agents = ("SELECT name, identity, role, registered_by, created_at FROM agents "
              "ORDER BY created_at")
    get_flag = "SELECT value FROM meta WHERE key = %s"
    set_flag = ("INSERT INTO meta (key, value) VALUES (%s, %s) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value")

    def __init__(self, dialect: PostgresDialect):
        for name, sql in vars(Queries).items():
            if isinstance(sql, str) and not name.startswith("_"):
                setattr(self, name, dialect.render(sql))
        self.migrations = tuple(dialect.render(text.format(**dialect.types))
                                for text in MIGRATIONS)
        self.now = dialect.clock_now
        self.recv_with_now = _WITH_NOW.format(clock=dialect.clock_now, recv=self.recv)
        self.recv_all_channels_with_now = _WITH_NOW.format(clock=dialect.clock_now,
                                                           recv=self.recv_all_channels)
