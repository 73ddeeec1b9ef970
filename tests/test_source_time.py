"""Time frames: naive timestamps in the source's `timezone`, late commits, the tick of a column.

The scenarios real CRMs meet: naive UTC written by the application while the database
session runs in another zone, a transaction that commits after rows written later than it,
updates landing later in the same second as the last read at whole-second precision, and
SQLite times kept as text.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from syncd.config import ConfigError, SourceConfig, load_config
from syncd.source import Source, parse_watermark

from .test_source import read_all, sync_config


def reader_for(url: str, *, timezone: str = "UTC", settle: str = "0s"):
    return Source("crm", SourceConfig(url=url, timezone=timezone)).reader(sync_config(settle=settle))


def keys(rows) -> list[int]:
    return [int(row[0]) for row in rows]


def pg_session_zone(url: str, zone: str) -> str:
    """The same database, with sessions in `zone` (as a server or role default would set it)."""
    parsed = sa.make_url(url)
    options = f"{parsed.query.get('options', '')} -ctimezone={zone}".strip()
    return parsed.update_query_dict({"options": options}).render_as_string(hide_password=False)


def mysql_session_zone(url: str, offset: str) -> str:
    parsed = sa.make_url(url)
    return parsed.update_query_dict({"init_command": f"SET time_zone = '{offset}'"}).render_as_string(hide_password=False)


def create_contacts(engine: sa.Engine, watermark_type: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.text(f"CREATE TABLE contacts (id INTEGER PRIMARY KEY, first_name VARCHAR(50), updated_at {watermark_type} NOT NULL)")
        )


def utc_now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


# -- the frame of naive timestamps


def test_a_bad_timezone_is_a_config_error_naming_the_key(tmp_path):
    from .crm import write_config

    config = write_config(tmp_path / "syncd.toml", source_url="sqlite:///x.db", api_url="http://127.0.0.1:1/", state_url="sqlite:///s.db")
    text = config.read_text().replace('[sources.crm]\n', '[sources.crm]\ntimezone = "Europe/Atlantis"\n')
    config.write_text(text)
    with pytest.raises(ConfigError, match=r"sources\.crm\.timezone: 'Europe/Atlantis' is not a time zone"):
        load_config(config)


def test_naive_utc_under_a_new_york_session_is_read_at_once_not_five_hours_late(postgres_url):
    url = pg_session_zone(postgres_url, "America/New_York")
    engine = sa.create_engine(url)
    create_contacts(engine, "TIMESTAMP")
    with engine.begin() as conn:  # what Django and Rails write: naive UTC from the application
        conn.execute(sa.text("INSERT INTO contacts VALUES (1, 'a', :t)"), {"t": utc_now() - timedelta(seconds=1)})
    assert keys(read_all(reader_for(url, timezone="UTC"))) == [1]
    # Read in the session's zone (the old behaviour), the row waits five hours.
    assert keys(read_all(reader_for(url, timezone="local"))) == []
    engine.dispose()


def test_naive_utc_under_a_berlin_session_keeps_a_late_commit(postgres_url):
    url = pg_session_zone(postgres_url, "Europe/Berlin")
    engine = sa.create_engine(url)
    create_contacts(engine, "TIMESTAMP")
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO contacts VALUES (1, 'early', :t)"), {"t": utc_now() - timedelta(minutes=1)})
    reader = reader_for(url, settle="0s")
    cursor = reader.position(read_all(reader)[-1])

    late = engine.connect()
    transaction = late.begin()
    # The application stamps the row when its transaction starts, and commits later.
    late.execute(sa.text("INSERT INTO contacts VALUES (2, 'late', now() AT TIME ZONE 'UTC')"))
    with engine.begin() as conn:  # a row stamped after the late one, committed before it
        conn.execute(sa.text("INSERT INTO contacts VALUES (3, 'after', :t)"), {"t": utc_now()})

    rows = read_all(reader, cursor)  # the open transaction holds the bound below its start
    assert keys(rows) == []
    transaction.commit()
    late.close()

    assert keys(read_all(reader, cursor)) == [2, 3]
    engine.dispose()


def test_mariadb_naive_utc_under_a_plus_one_session_keeps_a_commit_within_settle(mysql_url):
    url = mysql_session_zone(mysql_url, "+01:00")
    engine = sa.create_engine(url)
    create_contacts(engine, "DATETIME(6)")
    reader = reader_for(url, settle="1s")
    late = engine.connect()
    transaction = late.begin()
    late.execute(sa.text("INSERT INTO contacts VALUES (1, 'late', UTC_TIMESTAMP(6))"))
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO contacts VALUES (2, 'after', UTC_TIMESTAMP(6))"))
    # Read in the session's zone the bound would be an hour ahead and row 2 read before row 1 commits.
    assert keys(read_all(reader)) == []
    transaction.commit()
    late.close()
    deadline = time.monotonic() + 10
    rows = []
    while time.monotonic() < deadline and len(rows) < 2:
        rows = read_all(reader)
    assert keys(rows) == [1, 2]
    engine.dispose()


def test_mariadb_timestamp_columns_compare_as_instants(mysql_url):
    url = mysql_session_zone(mysql_url, "+05:00")
    engine = sa.create_engine(url)
    create_contacts(engine, "TIMESTAMP(6)")
    with engine.begin() as conn:  # CURRENT_TIMESTAMP: stored as an instant whatever the session's zone
        conn.execute(sa.text("INSERT INTO contacts VALUES (1, 'a', CURRENT_TIMESTAMP(6) - INTERVAL 1 SECOND)"))
    assert keys(read_all(reader_for(url, timezone="America/New_York"))) == [1]
    engine.dispose()


def test_sqlite_text_written_in_berlin_time_is_read_in_that_frame(sqlite_url):
    engine = sa.create_engine(sqlite_url)
    create_contacts(engine, "TEXT")
    berlin_now = datetime.now(ZoneInfo("Europe/Berlin")).replace(tzinfo=None)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO contacts VALUES (1, 'a', :t)"), {"t": str(berlin_now - timedelta(seconds=5))})
    assert keys(read_all(reader_for(sqlite_url, timezone="Europe/Berlin"))) == [1]
    # Berlin is ahead of UTC: read as UTC, the row looks an hour or two in the future.
    assert keys(read_all(reader_for(sqlite_url, timezone="UTC"))) == []
    problems = [p.message for p in reader_for(sqlite_url, timezone="UTC").problems()]
    assert any("ahead of the source's clock" in message and "timezone" in message for message in problems), problems
    engine.dispose()


# -- the tick of the watermark's resolution


def wait_for_a_new_second(now) -> datetime:
    """Wait until the source's clock has just started a second, so two writes share it."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        value = now()
        if value.microsecond < 200_000:
            return value
        time.sleep((1_000_000 - value.microsecond) / 1_000_000)
    raise AssertionError("the clock never showed the start of a second")


@pytest.mark.parametrize("service", ["mysql", "sqlite"])
def test_same_second_updates_at_whole_second_precision_are_never_lost(service, request):
    url = request.getfixturevalue(f"{service}_url")
    engine = sa.create_engine(url)
    mysql = service == "mysql"
    create_contacts(engine, "DATETIME" if mysql else "TEXT")  # DATETIME = DATETIME(0): whole seconds
    stamp = "UTC_TIMESTAMP()" if mysql else "datetime('now')"  # what the CRM writes, whole seconds
    clock = "SELECT UTC_TIMESTAMP(6)" if mysql else "SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')"

    def now() -> datetime:
        with engine.connect() as conn:
            value = conn.scalar(sa.text(clock))
        return value if isinstance(value, datetime) else datetime.fromisoformat(value)

    earlier = "UTC_TIMESTAMP() - INTERVAL 5 SECOND" if mysql else "datetime('now', '-5 seconds')"
    reader = reader_for(url, settle="0s")
    with engine.begin() as conn:
        conn.execute(sa.text(f"INSERT INTO contacts VALUES (1, 'old', {earlier})"))
    cursor = reader.position(read_all(reader)[-1])

    second = wait_for_a_new_second(now)
    with engine.begin() as conn:
        conn.execute(sa.text(f"INSERT INTO contacts VALUES (5, 'five', {stamp})"))
    seen = read_all(reader, cursor)  # in the same second: row 5's second is not over yet
    if seen:
        cursor = reader.position(seen[-1])
    with engine.begin() as conn:
        conn.execute(sa.text(f"INSERT INTO contacts VALUES (3, 'three', {stamp})"))  # a lower key, same second
    if now() - second < timedelta(seconds=1):
        assert keys(seen) == [], "a row of the current second was read before the second ended"

    deadline = time.monotonic() + 5
    rows = list(seen)
    while time.monotonic() < deadline and len(rows) < 2:
        more = read_all(reader, cursor)
        if more:
            rows += more
            cursor = reader.position(more[-1])
    assert sorted(keys(rows)) == [3, 5]
    engine.dispose()


def test_sqlite_text_watermarks_in_any_common_spelling(sqlite_url):
    engine = sa.create_engine(sqlite_url)
    create_contacts(engine, "TEXT")
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO contacts VALUES (1, 'a', '2024-01-01 10:00:00'), (2, 'b', '2024-01-01T09:00:00.250'),"
                " (3, 'c', '2024-01-01T10:30:00+02:00'), (4, 'd', '2024-01-01 10:00:00.5')"
            )
        )
    reader = reader_for(sqlite_url)
    assert [p.message for p in reader.problems() if p.severity == "error"] == []  # TEXT is accepted
    assert keys(read_all(reader)) == [3, 2, 1, 4]  # 10:30+02:00 is 08:30 UTC
    engine.dispose()


def test_sqlite_text_that_is_no_time_is_named_by_check(sqlite_url):
    engine = sa.create_engine(sqlite_url)
    create_contacts(engine, "TEXT")
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO contacts VALUES (1, 'a', 'yesterday')"))
    problems = [p.message for p in reader_for(sqlite_url).problems()]
    assert "watermark column 'updated_at' holds 'yesterday', which is not a time" in problems
    engine.dispose()


# -- reset --to in the column's frame


def test_reset_to_an_instant_is_told_in_the_columns_frame(postgres_url):
    engine = sa.create_engine(postgres_url)
    create_contacts(engine, "TIMESTAMP")
    reader = reader_for(postgres_url, timezone="Europe/Berlin")
    cursor = parse_watermark(reader, "2026-01-01T12:00:00+00:00")
    assert cursor.watermark == datetime(2026, 1, 1, 13, 0)  # Berlin is UTC+1 in winter
    assert parse_watermark(reader, "2026-01-01T12:00:00").watermark == datetime(2026, 1, 1, 12, 0)
    engine.dispose()
