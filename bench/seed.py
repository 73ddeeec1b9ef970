"""Seed the benchmark's contacts table in PostgreSQL, and change a slice of it.

The table has the shape of `tests/crm.py` (id, names, email, phone, account_id,
`updated_at timestamptz`) with the `(updated_at, id)` index syncd's keyset cursor relies on.
Rows are generated inside PostgreSQL (`generate_series`), so seeding 1M rows costs seconds
and no Python time; every fourth row shares its `updated_at` with its neighbours, so the
readers' keysets have to cope with equal watermarks across batch boundaries.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

TABLE = "contacts"


def seed(dsn: str, schema: str, rows: int) -> None:
    """(Re)create `schema.contacts` with `rows` rows, its indexes, and fresh statistics."""
    table = sql.Identifier(schema, TABLE)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL(
                """CREATE TABLE {} (
                    id integer PRIMARY KEY,
                    first_name varchar(100),
                    last_name varchar(100),
                    email varchar(200),
                    phone varchar(40),
                    account_id varchar(40),
                    updated_at timestamptz NOT NULL
                )"""
            ).format(table)
        )
        # Same values as tests/crm.py's contact(i): valid UK numbers, mixed-case emails.
        conn.execute(
            sql.SQL(
                """INSERT INTO {} SELECT
                    i, 'First' || i, 'Last' || i, 'Person' || i || '@Example.COM',
                    '+4420' || lpad((79460000 + i)::text, 8, '0'), 'acct-' || i,
                    now() - interval '1 day' + (i / 4) * interval '10 microseconds'
                FROM generate_series(1, %s) AS i"""
            ).format(table),
            (rows,),
        )
        conn.execute(
            sql.SQL("CREATE INDEX {} ON {} (updated_at, id)").format(
                sql.Identifier(f"ix_{TABLE}_updated_at_id"), table
            )
        )
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(table))


def change_fraction(dsn: str, schema: str, every: int, tag: str) -> int:
    """Change one row in `every` (a new email and a fresh `updated_at`); the rows changed."""
    table = sql.Identifier(schema, TABLE)
    with psycopg.connect(dsn, autocommit=True) as conn:
        cursor = conn.execute(
            sql.SQL(
                "UPDATE {} SET email = %s || id || '@example.com', updated_at = clock_timestamp() "
                "WHERE id %% %s = 0"
            ).format(table),
            (f"changed-{tag}-", every),
        )
        changed = cursor.rowcount
        conn.execute(sql.SQL("ANALYZE {}").format(table))
    return changed


def postgres_version(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"
