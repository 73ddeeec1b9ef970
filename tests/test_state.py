"""The state database: lossless watermarks, atomic batch commits, leases, dead letters, migrations."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa

from syncd.errors import LeaseHeldError, LeaseLost, StateError
from syncd.state import StateStore, decode_value, encode_value
from syncd.values import Cursor, DeadLetter, PushRecord

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", "postgres"])
def sqlite_or_postgres(request, tmp_path) -> str:
    """An empty state database's URL (no migration run)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(sqlite_or_postgres):
    store = StateStore(sqlite_or_postgres)
    store.migrate()
    store.ensure_syncs(["contacts"])
    yield store
    store.close()


def push(outcome: str = "ack", count: int = 2) -> PushRecord:
    return PushRecord(
        kind="sync",
        sent_at=datetime.now(UTC),
        record_count=count,
        attempt=1,
        duration_ms=3.5,
        outcome=outcome,
        http_status=200,
        api_code=0,
        trans_id="t-1",
        correlation_id="c-1",
    )


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC),
        datetime(2026, 1, 2, 3, 4, 5, 999999),
        date(2026, 1, 2),
        Decimal("12345678901234567890.000001"),
        2**62,
        "2026-01-02 03:04:05.123",
        None,
    ],
)
def test_watermarks_round_trip_losslessly(value):
    assert decode_value(encode_value(value)) == value
    assert type(decode_value(encode_value(value))) is type(value)


def test_batch_commit_moves_watermark_digests_and_push_together(store):
    lease = store.acquire_lease("contacts", timedelta(seconds=30))
    store.commit_batch(
        "contacts",
        cursor=Cursor(datetime(2026, 1, 1, tzinfo=UTC), 7),
        acked=[("6", b"a" * 16, b"s" * 16), ("7", b"b" * 16, b"t" * 16)],
        pushes=[push()],
        lease=lease,
    )
    assert store.cursor("contacts") == Cursor(datetime(2026, 1, 1, tzinfo=UTC), 7)
    assert store.known_digests("contacts", ["6", "7", "8"]) == {"6": b"a" * 16, "7": b"b" * 16}
    assert store.status()[0].records_sent == 2
    assert store.pushes("contacts")[0]["trans_id"] == "t-1"


def test_each_digest_names_the_push_whose_ack_carried_it(store):
    """A bisected batch lands in parts: each key is stored with its own part's push (trans_id)."""
    first, refused, second = push(count=1), push("rejected", count=2), push(count=1)
    first.trans_id, refused.trans_id, second.trans_id = "t-first", None, "t-second"
    store.commit_batch(
        "contacts",
        cursor=None,
        acked=[("6", b"a" * 16, b"s" * 16), ("7", b"b" * 16, b"t" * 16)],
        acked_by=[first, second],
        pushes=[refused, first, second],
    )
    (_, six), (_, seven) = store.acknowledged("contacts", "6"), store.acknowledged("contacts", "7")
    assert (six["trans_id"], seven["trans_id"]) == ("t-first", "t-second")
    by_id = {row["id"]: row["trans_id"] for row in store.pushes("contacts")}
    assert by_id[six["id"]] == "t-first" and by_id[seven["id"]] == "t-second"
    assert six["sent_at"].tzinfo is not None
    assert store.acknowledged("contacts", "8") is None

    again = push(count=1)
    again.trans_id = "t-again"
    store.commit_batch("contacts", cursor=None, acked=[("6", b"c" * 16, b"s" * 16)], acked_by=[again], pushes=[again])
    digest, carrier = store.acknowledged("contacts", "6")
    assert (digest, carrier["trans_id"]) == (b"c" * 16, "t-again")  # the last ACK, not the first


def test_migration_0005_upgrades_a_0004_state_in_place(sqlite_or_postgres):
    """Keys acknowledged before 0005 keep their digests and say their push is not known."""
    from alembic import command

    from syncd.state import _alembic_config

    store = StateStore(sqlite_or_postgres)
    with store.engine.begin() as conn:
        command.upgrade(_alembic_config(conn), "0004")
    store.ensure_syncs(["contacts"])
    store.reset("contacts", Cursor(5, 5), forget=None)
    with store.engine.begin() as conn:
        assert "push_id" not in {column["name"] for column in sa.inspect(conn).get_columns("digests")}
        conn.execute(
            sa.text("INSERT INTO digests (sync, \"key\", digest, source_hash) VALUES ('contacts', '5', :d, :s)"),
            {"d": b"o" * 16, "s": b"h" * 16},
        )
    assert store.schema_revision() == "0004"

    store.migrate()
    assert store.schema_revision() == "0005" and store.schema_is_current()
    assert store.cursor("contacts") == Cursor(5, 5)
    assert store.acknowledged("contacts", "5") == (b"o" * 16, None)  # acknowledged before push tracking
    assert store.known_source_hashes("contacts", ["5"]) == {"5": b"h" * 16}

    ack = push(count=1)
    store.commit_batch("contacts", cursor=None, acked=[("5", b"n" * 16, b"h" * 16)], acked_by=[ack], pushes=[ack])
    digest, carrier = store.acknowledged("contacts", "5")
    assert digest == b"n" * 16 and carrier["trans_id"] == "t-1"
    store.close()


def test_a_lost_lease_commits_nothing(store):
    lease = store.acquire_lease("contacts", timedelta(seconds=30))
    other = StateStore(store.url)
    with other.engine.begin() as conn:  # another daemon took over after our lease ran out
        conn.execute(sa.text("UPDATE syncs SET owner = 'elsewhere:1:x' WHERE name = 'contacts'"))
    with pytest.raises(LeaseLost):
        store.commit_batch(
            "contacts", cursor=Cursor(5, 5), acked=[("5", b"c" * 16, b"u" * 16)], pushes=[push()], lease=lease
        )
    assert store.cursor("contacts") is None
    assert store.known_digests("contacts", ["5"]) == {}
    assert store.pushes("contacts") == []
    other.close()


def test_only_one_owner_at_a_time_and_expired_leases_are_taken_over(store):
    first, second = store, StateStore(store.url)
    assert first.acquire_lease("contacts", timedelta(seconds=30))
    with pytest.raises(LeaseHeldError) as held:
        second.acquire_lease("contacts", timedelta(seconds=30))
    assert held.value.owner == first.owner and held.value.expires_at > datetime.now(UTC)
    assert f"sync contacts is held by {first.owner} until " in str(held.value)
    assert first.acquire_lease("contacts", timedelta(seconds=-1))  # renewed, but already expired
    assert second.acquire_lease("contacts", timedelta(seconds=30))
    second.close()


STORE_CALLS = {
    "migrate": lambda s: s.migrate(),
    "ensure_syncs": lambda s: s.ensure_syncs(["contacts"]),
    "status": lambda s: s.status(),
    "cursor": lambda s: s.cursor("contacts"),
    "acquire_lease": lambda s: s.acquire_lease("contacts", timedelta(seconds=30)),
    "set_state": lambda s: s.set_state("contacts", "ok"),
    "known_digests": lambda s: s.known_digests("contacts", ["1"]),  # the driver's cursor, not SQLAlchemy's
    "commit_batch": lambda s: s.commit_batch("contacts", cursor=Cursor(1, 1), acked=[("1", b"d" * 16, b"s" * 16)]),
    "pushes": lambda s: s.pushes("contacts"),
    "dead_letters": lambda s: list(s.dead_letters("contacts")),
    "digest_keys": lambda s: list(s.digest_keys("contacts")),
}


@pytest.mark.parametrize("call", STORE_CALLS, ids=str)
def test_a_broken_state_database_is_a_one_line_state_error_from_every_method(tmp_path, call):
    """No SQLAlchemy or driver error leaves the store: callers catch StateError alone."""
    path = tmp_path / "state.db"
    made = StateStore(f"sqlite:///{path}")
    made.migrate()
    made.close()
    path.write_bytes(b"this is not a database" * 500)  # e.g. another file put in its place
    store = StateStore(f"sqlite:///{path}")
    with pytest.raises(StateError) as failed:
        STORE_CALLS[call](store)
    assert str(failed.value).startswith("state database, ") and "\n" not in str(failed.value)
    assert failed.value.reason == "file is not a database"
    store.close()


def test_a_state_database_migrated_by_a_newer_syncd_is_a_state_error(tmp_path):
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    store.migrate()
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(StateError, match="migrating the schema: Can't locate revision identified by '9999'"):
        store.migrate()
    store.close()


def test_a_state_database_syncd_cannot_use_is_a_state_error(tmp_path):
    with pytest.raises(StateError, match="opening it: it must be SQLite or PostgreSQL, not mysql"):
        StateStore("mysql+pymysql://root@127.0.0.1/test")
    with pytest.raises(StateError, match="opening it: Could not parse SQLAlchemy URL"):
        StateStore("not a url")


def test_a_lease_of_a_dead_local_process_is_taken_over(store):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owner = f"{store.owner.split(':')[0]}:{dead.stdout.strip()}:gone"
    with store.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE syncs SET owner = :owner, lease_until = :until WHERE name = 'contacts'"),
            {"owner": owner, "until": datetime.now(UTC) + timedelta(hours=1)},
        )
    assert store.acquire_lease("contacts", timedelta(seconds=30))


def test_one_open_dead_letter_per_key_resolved_by_a_later_push(store):
    letter = DeadLetter(key="9", reason="invalid row: msisdn: '12' is not a valid phone number", payload={"phone": "12"})
    store.commit_batch("contacts", cursor=None, dead_letters=[letter])
    store.commit_batch("contacts", cursor=None, dead_letters=[letter])
    (open_letter,) = store.dead_letters("contacts")
    assert open_letter.attempts == 2 and open_letter.payload == {"phone": "12"}
    store.commit_batch("contacts", cursor=None, acked=[("9", b"d" * 16, b"v" * 16)], pushes=[push(count=1)], resolve_keys=["9"])
    assert list(store.dead_letters("contacts")) == []
    (resolved,) = store.dead_letters("contacts", include_resolved=True)
    assert resolved.resolution == "delivered"


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_the_migrations_build_exactly_the_tables_state_py_describes(backend, tmp_path, request):
    """state.py's metadata (what every query is written against) and the migrations (what
    a database really has) are two spellings of one schema: Alembic finds no difference
    between a freshly migrated database and the metadata, whatever the newest revision is."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from syncd.state import metadata

    url = f"sqlite:///{tmp_path / 'state.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    store = StateStore(url)
    store.migrate()
    assert store.schema_is_current()
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        drift = compare_metadata(context, metadata)
    store.close()
    assert drift == []


def test_migrations_run_from_the_built_wheel(tmp_path):
    """The wheel carries the Alembic environment: `syncd migrate` works from an install."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("syncd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "syncd/migrations/env.py" in names
    assert any(name.startswith("syncd/migrations/versions/0001") for name in names)
    installed = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(installed)
    state = tmp_path / "state.db"
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import syncd.state as s; "
        "assert s.__file__.startswith(sys.argv[1]), s.__file__; "
        "st = s.StateStore(sys.argv[2]); st.migrate(); print(st.schema_is_current())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(installed), f"sqlite:///{state}"], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.stdout.strip() == "True", result.stderr


def test_schema_revision_names_the_newest_migration(tmp_path):
    from importlib import resources

    from alembic.script import ScriptDirectory

    from syncd.state import SCHEMA_REVISION

    head = ScriptDirectory(str(resources.files("syncd.migrations"))).get_current_head()
    assert head == SCHEMA_REVISION  # a new migration must bump it, or migrate() would skip it


def test_starting_on_a_current_schema_does_not_load_alembic(tmp_path):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    StateStore(url).migrate()
    code = "import sys, syncd.state as s; s.StateStore(sys.argv[1]).migrate(); print('alembic' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code, url], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_a_takeover_fences_the_previous_generation_even_for_the_same_owner(store):
    """Generation, not only owner: a daemon that lost a sync and took it back later must not
    commit (or send) under the lease it held before."""
    old = store.acquire_lease("contacts", timedelta(seconds=-1))  # taken, and already run out
    other = StateStore(store.url)
    assert other.acquire_lease("contacts", timedelta(seconds=-1))  # a takeover
    new = store.acquire_lease("contacts", timedelta(seconds=30))  # and back
    assert new.generation == old.generation + 2
    with pytest.raises(LeaseLost):
        store.commit_batch("contacts", cursor=Cursor(5, 5), pushes=[push()], lease=old)
    with pytest.raises(LeaseLost):
        old.ensure(1.0)  # nor may it send: the renewal is fenced too
    store.commit_batch("contacts", cursor=Cursor(5, 5), pushes=[push()], lease=new)
    assert store.cursor("contacts") == Cursor(5, 5)
    other.close()


def test_leases_are_timed_by_the_state_databases_clock(store, monkeypatch):
    """A daemon whose wall clock is an hour off neither steals a live lease nor keeps a dead one."""
    import syncd.state

    first, second = store, StateStore(store.url)
    assert first.acquire_lease("contacts", timedelta(seconds=30))
    monkeypatch.setattr(syncd.state, "utcnow", lambda: datetime.now(UTC) + timedelta(hours=1))
    with pytest.raises(LeaseHeldError):  # an hour ahead: still held
        second.acquire_lease("contacts", timedelta(seconds=30))
    monkeypatch.undo()
    assert first.acquire_lease("contacts", timedelta(seconds=-1))  # renewed, already run out
    monkeypatch.setattr(syncd.state, "utcnow", lambda: datetime.now(UTC) - timedelta(hours=1))
    assert second.acquire_lease("contacts", timedelta(seconds=30))  # an hour behind: taken over all the same
    second.close()


def test_a_lease_renews_itself_before_a_send_that_would_outlast_it(store):
    lease = store.acquire_lease("contacts", timedelta(seconds=30))
    lease.held_until = 0.0  # as after a long pause: nothing is provable any more
    lease.ensure(5.0)  # renewed in the database, so the send may go
    owner, until = store.lease_holder("contacts")
    assert owner == store.owner
    other = StateStore(store.url)
    with other.engine.begin() as conn:  # the lease ran out and another daemon took the sync
        conn.execute(sa.text("UPDATE syncs SET owner = 'elsewhere:1:x', lease_generation = lease_generation + 1"))
    lease.held_until = 0.0
    with pytest.raises(LeaseLost):
        lease.ensure(5.0)
    with pytest.raises(LeaseLost):  # and it stays lost: nothing read under it is sent
        lease.check()
    other.close()
