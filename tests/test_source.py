"""Reading changed rows: watermark kinds, schema-qualified tables, the settle bound, keyset order."""

from __future__ import annotations

import uuid
from contextlib import contextmanager
from datetime import timedelta

import pytest
import sqlalchemy as sa

from syncd.config import SourceConfig, SyncConfig
from syncd.source import Bound, Source, SourceError
from syncd.values import Cursor

from .crm import Crm, contact, once, pushed_records, stored


def sync_config(table: str = "contacts", settle: str = "0s") -> SyncConfig:
    return SyncConfig.model_validate(
        {
            "name": "contacts",
            "source": "crm",
            "table": table,
            "key": "id",
            "watermark": "updated_at",
            "settle": settle,
            "datastore_id": "1466",
            "feed_id": "1499",
            "fields": {"firstname": "first_name"},
        }
    )


def read_all(reader, cursor=None, batch=1000):
    return [row for rows in reader.changed_rows(cursor, batch) for row in rows]


@pytest.mark.parametrize("watermark", ["int", "timestamptz", "timestamp"])
def test_every_watermark_kind_syncs_changes_once(source_url, watermark, api, syncd_config):
    crm = Crm(source_url, watermark=watermark)
    crm.insert([contact(i) for i in range(1, 31)])
    config = syncd_config(source_url, batch=7)
    assert once(config) == 0
    crm.update([2, 9], first_name="Renamed")
    assert once(config) == 0
    api.wait_inserted("1466", 32)
    assert pushed_records(api) == 32
    assert stored(api)["acct-9"]["firstname"] == "Renamed"
    crm.dispose()


@contextmanager
def other_schema(url: str):
    """A schema beside the connection's own (in MySQL a schema is a database)."""
    engine = sa.create_engine(url)
    mysql = engine.dialect.name in ("mysql", "mariadb")
    name = (sa.make_url(url).database + "_sales") if mysql else f"sales_{uuid.uuid4().hex[:8]}"
    quoted = engine.dialect.identifier_preparer.quote(name)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE {'DATABASE' if mysql else 'SCHEMA'} {quoted}"))
    try:
        yield name
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP {'DATABASE' if mysql else 'SCHEMA'} {quoted}" + ("" if mysql else " CASCADE")))
        engine.dispose()


@pytest.mark.parametrize("service", ["postgres", "mysql"])
def test_schema_qualified_table(service, request, api, syncd_config):
    url = request.getfixturevalue(f"{service}_url")
    with other_schema(url) as schema:
        crm = Crm(url, schema=schema)
        crm.insert([contact(i) for i in range(1, 11)])
        config = syncd_config(url, table=f"{schema}.contacts")
        assert once(config) == 0
        api.wait_inserted("1466", 10)
        assert len(stored(api)) == 10
        crm.dispose()


def test_rows_newer_than_settle_wait_for_the_next_cycle(source_url):
    crm = Crm(source_url)
    crm.insert([contact(1)], stamp=crm.stamp(age=timedelta(minutes=5)))
    crm.insert([contact(2)], stamp=crm.stamp(age=timedelta(seconds=0)))
    reader = Source("crm", SourceConfig(url=source_url)).reader(sync_config(settle="60s"))
    assert [row[0] for row in read_all(reader)] == [1]  # row 2 is inside the settle window
    reader = Source("crm", SourceConfig(url=source_url)).reader(sync_config(settle="0s"))
    assert [row[0] for row in read_all(reader)] == [1, 2]
    crm.dispose()


def test_keyset_cursor_continues_inside_a_run_of_equal_watermarks(source_url):
    crm = Crm(source_url)
    same = crm.stamp(age=timedelta(minutes=1))
    crm.insert([contact(i) for i in range(1, 11)], stamp=same)
    reader = Source("crm", SourceConfig(url=source_url)).reader(sync_config())
    rows = read_all(reader)
    assert [row[0] for row in rows] == list(range(1, 11))
    after_four = reader.position(rows[3])
    assert [row[0] for row in read_all(reader, after_four, batch=3)] == list(range(5, 11))
    crm.dispose()


@pytest.mark.parametrize("one_statement", [False, True])
def test_a_first_backfill_reads_in_key_order_and_never_splits_a_key(source_url, monkeypatch, one_statement):
    """Keys 1-20 with 3, 7 and 8 twice (a view that joins), read in chunks of 8 rows and
    batches of 3: every row once, in key order, below the bound only, and a key's rows in
    one batch even where a chunk or a batch ends among them."""
    crm = Crm(source_url)
    crm.insert([contact(i) for i in range(1, 21)], stamp=crm.stamp(age=timedelta(minutes=1)))
    crm.insert([contact(21)])  # newer than the bound below
    doubled = " UNION ALL ".join(f"SELECT id, first_name, updated_at FROM contacts WHERE id = {i}" for i in (3, 7, 8))
    query = f"SELECT id, first_name, updated_at FROM contacts UNION ALL {doubled}"
    monkeypatch.setattr("syncd.source.CHUNK_ROWS", 8)  # the first chunk ends between the rows of 7
    sync = query_sync(query, fields={"firstname": "first_name"})
    reader = Source("crm", SourceConfig(url=source_url)).reader(sync)
    bound = Bound(crm.stamp(age=timedelta(seconds=30)))

    batches = [[row[0] for row in rows] for rows in reader.rows_in_key_order(None, 3, bound, one_statement=one_statement)]

    assert [key for batch in batches for key in batch] == [1, 2, 3, 3, 4, 5, 6, 7, 7, 8, 8, *range(9, 21)]
    assert all(len(batch) >= 3 for batch in batches[:-1])
    for key in (3, 7, 8):
        assert [batch.count(key) for batch in batches if key in batch] == [2]
    rest = reader.rows_in_key_order(8, 3, bound, one_statement=one_statement)
    assert [row[0] for rows in rest for row in rows] == list(range(9, 21))
    reader.source.dispose()
    crm.dispose()


def test_sqlite_text_timestamps_in_mixed_spellings_compare_as_instants(sqlite_url):
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE contacts (id INTEGER PRIMARY KEY, first_name TEXT, updated_at TIMESTAMP NOT NULL)"))
        conn.execute(
            sa.text("INSERT INTO contacts VALUES (1, 'a', '2024-01-01 10:00:00'), (2, 'b', '2024-01-01T10:00:00.000000'),"
                    " (3, 'c', '2024-01-01 10:00:00.500'), (4, 'd', '2024-01-01 09:59:59')")
        )
    reader = Source("crm", SourceConfig(url=sqlite_url)).reader(sync_config())
    rows = read_all(reader)
    assert [row[0] for row in rows] == [4, 1, 2, 3]
    # Resuming after row 1 must still find row 2, which is the same instant spelled differently.
    assert [row[0] for row in read_all(reader, reader.position(rows[1]))] == [2, 3]
    engine.dispose()


def test_missing_table_and_column_are_named(sqlite_url):
    sa.create_engine(sqlite_url).connect().close()
    reader = Source("crm", SourceConfig(url=sqlite_url)).reader(sync_config(table="nope"))
    with pytest.raises(SourceError, match="table 'nope' not found"):
        list(reader.changed_rows(None, 10))


def query_sync(query: str, **extra) -> SyncConfig:
    return SyncConfig.model_validate(
        {
            "name": "contacts",
            "source": "crm",
            "query": query,
            "key": "id",
            "watermark": "updated_at",
            "settle": "0s",
            "datastore_id": "1466",
            "feed_id": "1499",
            "fields": {"firstname": "first_name", "tag": "tag"},
            **extra,
        }
    )


def test_a_query_model_is_read_as_written(source_url):
    """Colons and percent signs in the operator's SQL are text, not parameters, and a trailing
    comment does not swallow the wrapping; the key keeps its type, so stored (text) keys
    find their rows again."""
    crm = Crm(source_url)
    crm.insert([contact(i, first_name=f"{'Ann' if i % 2 else 'Bob'}{i}") for i in range(1, 7)])
    query = "SELECT id, first_name, updated_at, 'at 10:30 :x 100%' AS tag FROM contacts WHERE first_name LIKE 'A%' -- the A's"
    reader = Source("crm", SourceConfig(url=source_url)).reader(query_sync(query))
    rows = read_all(reader)
    assert [row[0] for row in rows] == [1, 3, 5]
    assert {row[reader.sync.columns.index("tag")] for row in rows} == {"at 10:30 :x 100%"}
    assert [row[0] for rows in reader.rows_by_keys(["3", "4", "5"]) for row in rows] == [3, 5]
    assert [row[0] for row in read_all(reader, reader.position(rows[0]))] == [3, 5]
    reader.source.dispose()
    crm.dispose()


def test_the_filter_is_a_condition_or_a_verdict(source_url):
    crm = Crm(source_url, deleted=True)
    crm.insert([contact(i, deleted=int(i in (2, 4))) for i in range(1, 6)])
    sync = sync_config().model_copy(update={"filter": "deleted = 0"})
    reader = Source("crm", SourceConfig(url=source_url)).reader(sync)
    assert [row[0] for row in read_all(reader)] == [1, 3, 5]  # previews and lookups: the model's rows only
    every = [row for rows in reader.changed_rows(None, 100, membership=True) for row in rows]
    members, outside = reader.split(every)
    assert [row[0] for row in members] == [1, 3, 5] and outside == ["2", "4"]
    assert [row[0] for rows in reader.rows_by_keys(["1", "2"]) for row in rows] == [1]
    assert reader.existing_keys(["1", "2", "99"]) == {"1", "2"}
    reader.source.dispose()
    crm.dispose()


def test_a_sqlite_query_model_that_starts_empty_learns_its_types_from_its_first_rows(sqlite_url):
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE people (id INTEGER PRIMARY KEY, first_name TEXT, version INTEGER NOT NULL)"))
    sync = query_sync("SELECT id, first_name, version AS updated_at, 'x' AS tag FROM people")
    reader = Source("crm", SourceConfig(url=sqlite_url)).reader(sync)
    assert read_all(reader) == []
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO people VALUES (1, 'a', 7), (2, 'b', 3)"))
    rows = read_all(reader)
    assert [row[0] for row in rows] == [2, 1]  # ordered by the integer version
    assert reader.position(rows[-1]) == Cursor(7, 1)
    reader.source.dispose()
    engine.dispose()


def test_a_query_model_with_uuid_keys_finds_stored_keys(postgres_url):
    engine = sa.create_engine(postgres_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE people (id uuid PRIMARY KEY, first_name text, updated_at timestamp NOT NULL)"))
        conn.execute(
            sa.text(
                "INSERT INTO people VALUES ('6f1b3c1e-0000-4000-8000-000000000001', 'a', now() - interval '1 minute'),"
                " ('6f1b3c1e-0000-4000-8000-000000000002', 'b', now() - interval '1 minute')"
            )
        )
    reader = Source("crm", SourceConfig(url=postgres_url)).reader(query_sync("SELECT id, first_name, updated_at, '' AS tag FROM people"))
    rows = [row for rows in reader.rows_by_keys(["6f1b3c1e-0000-4000-8000-000000000002", "not-a-uuid"]) for row in rows]
    assert [row[reader.sync.columns.index("first_name")] for row in rows] == ["b"]
    assert reader.existing_keys(["6f1b3c1e-0000-4000-8000-000000000001"]) == {"6f1b3c1e-0000-4000-8000-000000000001"}
    reader.source.dispose()
    engine.dispose()
