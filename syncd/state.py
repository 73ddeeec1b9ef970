"""The state database: where each sync stands, what was pushed, and what could not be.

SQLite by default (WAL, busy timeout), PostgreSQL for scale-out. The schema is owned by
Alembic (`migrations/`); the tables below mirror it for SQLAlchemy Core queries. Every write
that moves a sync forward (watermark, digests, push rows, dead-letter resolution) happens in
one transaction, fenced by the sync's lease, so a crash or a lost lease never leaves the
watermark ahead of what the API acknowledged.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from importlib import resources
from itertools import chain, repeat
from typing import Any

import orjson
import sqlalchemy as sa

from syncd.errors import LeaseHeldError, LeaseLost, StateError
from syncd.values import (
    STORED_STATES,
    Cursor,
    DeadLetter,
    PushOutcome,
    PushRecord,
    SyncState,
    SyncStatus,
    db_error_line,
    utcnow,
)

__all__ = [
    "Lease",
    "LeaseHeldError",
    "LeaseLost",
    "StateError",
    "StateStore",
]

SCHEMA_REVISION = "0005"  # the newest migration; tests/test_state.py checks it against Alembic's head
APPLICATION_NAME = "syncd"  # as source.py names its sessions
DEFAULT_LEASE = timedelta(seconds=60)  # [state] lease's default (config.py)
UPSERT_ROWS = 500  # digests per statement: 2,500 parameters, under every driver's limit

metadata = sa.MetaData()

syncs_table = sa.Table(
    "syncs",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("watermark", sa.Text),  # typed JSON, see encode_value
    sa.Column("watermark_key", sa.Text),
    sa.Column("last_run_at", sa.DateTime(timezone=True)),
    sa.Column("last_success_at", sa.DateTime(timezone=True)),
    sa.Column("last_error", sa.Text),
    sa.Column("records_sent", sa.BigInteger, nullable=False),
    sa.Column("backlog", sa.BigInteger),
    sa.Column("owner", sa.String(200)),
    sa.Column("lease_until", sa.DateTime(timezone=True)),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("mapping_hash", sa.String(64)),  # the fields config every stored source_hash was taken under
    sa.Column("lease_generation", sa.BigInteger, nullable=False, server_default="0"),  # +1 per takeover
    sa.Column("cycle_started_at", sa.DateTime(timezone=True)),  # the running cycle, while one runs
    sa.Column("cycle_rows_read", sa.BigInteger),
    sa.Column("cycle_sent", sa.BigInteger),
)

rate_limits_table = sa.Table(  # PostgreSQL: the next free request slot, shared by every daemon
    "rate_limits",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("next_at", sa.DateTime(timezone=True), nullable=False),
)

pushes_table = sa.Table(
    "pushes",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("sync", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("record_count", sa.Integer, nullable=False),
    sa.Column("http_status", sa.Integer),
    sa.Column("api_code", sa.Integer),
    sa.Column("description", sa.Text),
    sa.Column("trans_id", sa.String(100)),
    sa.Column("correlation_id", sa.String(100)),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("duration_ms", sa.Float, nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Index("ix_pushes_sync_sent_at", "sync", "sent_at"),
)

digests_table = sa.Table(
    "digests",
    metadata,
    sa.Column("sync", sa.String(64), primary_key=True),
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("digest", sa.LargeBinary(16), nullable=False),
    # Fingerprint of the source columns that produced the payload: lets reconcile skip
    # mapping rows whose source has not changed (valid while syncs.mapping_hash matches).
    sa.Column("source_hash", sa.LargeBinary(16)),
    # The attributes `[syncs.removed]` takes from the last acknowledged record (JSON);
    # NULL unless the sync has that table.
    sa.Column("sent", sa.Text),
    # pushes.id of the ACK that carried the last acknowledged record; NULL for keys
    # acknowledged before migration 0005 (no foreign key: see that migration).
    sa.Column("push_id", sa.BigInteger),
    sqlite_with_rowid=False,  # the primary key is the table: one B-tree, not two
)

feed_cursors_table = sa.Table(
    "feed_cursors",
    metadata,
    sa.Column("sync", sa.String(64), primary_key=True),
    sa.Column("feed", sa.String(255), primary_key=True),  # ChangeFeed.feed_id
    sa.Column("watermark", sa.Text, nullable=False),  # typed JSON, like syncs.watermark
    sa.Column("watermark_key", sa.Text, nullable=False),
)

removals_table = sa.Table(
    "removals",
    metadata,
    sa.Column("sync", sa.String(64), primary_key=True),
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("removed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
)

dead_letters_table = sa.Table(
    "dead_letters",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("sync", sa.String(64), nullable=False),
    sa.Column("key", sa.String(255), nullable=False),
    sa.Column("payload", sa.Text),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("http_status", sa.Integer),
    sa.Column("api_code", sa.Integer),
    sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("resolved_at", sa.DateTime(timezone=True)),
    sa.Column("resolution", sa.String(16)),  # delivered | discarded
    sa.Index("ix_dead_letters_sync_key", "sync", "key"),
)


class Lease:
    """This daemon's hold on one sync, as far as it can prove it (DESIGN.md §9).

    The database times the lease: `lease_until` is its own clock plus the ttl, compared
    in SQL, never with this host's wall clock. Locally the lease is `held_until`, a
    monotonic time: the moment *before* the last successful renewal statement was sent,
    plus the ttl. The database started that lease no earlier, so until `held_until` no
    other daemon can have taken the sync over, whatever the two hosts' clocks say.
    `generation` fences every commit: a takeover increments it.
    """

    def __init__(self, store: StateStore, sync: str, ttl: timedelta, generation: int, held_until: float) -> None:
        self.store = store
        self.sync = sync
        self.ttl = ttl
        self.generation = generation
        self.held_until = held_until
        self.lost: str | None = None  # why, once lost; a lost lease is never renewed
        self.writing = threading.Lock()  # renewals and fenced commits of this lease, one at a time

    def check(self) -> None:
        """Raise LeaseLost once the lease is lost (no database round trip)."""
        if self.lost is not None:
            raise LeaseLost(self.sync, self.lost)

    def ensure(self, seconds: float) -> float:
        """Return the monotonic time the lease is provably held until, only while that is
        `seconds` away or more; renew first if needed.

        Called before every HTTP attempt with the longest that request can take; the request
        then goes out only before that time (delivery.py). A failed renewal loses the lease
        for good: what was read under it must be dropped.
        """
        # Only on SQLite (one host) may a lease be shorter than a request (config.py):
        # there it only keeps a second local process out.
        seconds = min(seconds, self.ttl.total_seconds() / 2)
        self.check()
        if time.monotonic() + seconds <= (held := self.held_until):
            return held
        with self.writing:
            self.check()
            if time.monotonic() + seconds <= (held := self.held_until):
                return held  # another thread renewed it meanwhile
            self._renew(lose_on_error=True)
            if time.monotonic() + seconds > (held := self.held_until):  # the renewal itself took that long
                self.lose("the state database answered too slowly to renew the lease")
            return held

    def renew(self) -> None:
        """Renew now; a state database error leaves the lease as it was (ensure() decides)."""
        with self.writing:
            self.check()
            self._renew(lose_on_error=False)

    def renewed(self, started: float) -> None:
        """A renewal statement sent at monotonic time `started` committed."""
        self.held_until = max(self.held_until, started + self.ttl.total_seconds())

    def lose(self, reason: str) -> None:
        if self.lost is None:
            self.lost = reason
        raise LeaseLost(self.sync, self.lost)

    def _renew(self, *, lose_on_error: bool) -> None:
        started = time.monotonic()
        try:
            held = self.store.renew_lease(self)
        except StateError as error:
            if lose_on_error:
                self.lose(f"cannot renew it: {error}")
            raise
        if not held:
            self.lose("another syncd took this sync over")
        self.renewed(started)

    def keep(self) -> Callable[[], None]:
        """Renew every quarter lease on a thread of its own, so a slow read or a long
        Retry-After never lets the lease run out; returns the function that stops it."""
        stop = threading.Event()

        def keep() -> None:
            while not stop.wait(self.ttl.total_seconds() / 4):
                try:
                    self.renew()
                except LeaseLost:
                    return
                except StateError:
                    continue  # the next send cannot prove the lease and ends the cycle

        thread = threading.Thread(target=keep, name=f"lease-{self.sync}", daemon=True)
        thread.start()

        def stopped() -> None:
            stop.set()
            thread.join()

        return stopped


# ---------------------------------------------------------------------------- stored values


def encode_value(value: Any) -> str:
    """Typed, lossless JSON for a watermark or key: never float seconds, never rounded."""
    if isinstance(value, datetime):
        return orjson.dumps({"datetime": value.isoformat()}).decode()
    if isinstance(value, date):
        return orjson.dumps({"date": value.isoformat()}).decode()
    if isinstance(value, Decimal):
        return orjson.dumps({"decimal": str(value)}).decode()
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, str))):
        raise TypeError(f"cannot store a {type(value).__name__} as a watermark or key")
    return orjson.dumps(value).decode()


def decode_value(text: str | None) -> Any:
    if text is None:
        return None
    value = orjson.loads(text)
    if isinstance(value, dict):
        ((kind, raw),) = value.items()
        decode: dict[str, Callable[[str], Any]] = {"datetime": datetime.fromisoformat, "date": date.fromisoformat, "decimal": Decimal}
        return decode[kind](raw)
    return value


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes for timezone=True columns; they were written as UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


# ---------------------------------------------------------------------------- the store


class StateStore:
    """All reads and writes of the state database."""

    def __init__(self, url: str, *, lease: timedelta = DEFAULT_LEASE) -> None:
        self.url = url
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        with _state_errors("opening it", OSError, ValueError):  # a directory it cannot create, a URL it cannot use
            self.engine = _create_engine(url, lease)
        self.postgres = self.engine.dialect.name == "postgresql"
        self._placeholder = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
        # The hot path talks to the driver directly (_lookup, _upsert_digests): its errors too.
        self._driver_error: type[Exception] = self.engine.dialect.loaded_dbapi.Error

    @contextmanager
    def _connection(self, doing: str, *, write: bool = False) -> Iterator[sa.Connection]:
        """A connection, in a transaction when writing; every database failure in it becomes
        a one-line StateError naming what was being done (nothing else leaves the store)."""
        with _state_errors(doing, self._driver_error), (self.engine.begin() if write else self.engine.connect()) as conn:
            yield conn

    def close(self) -> None:
        self.engine.dispose()

    # -- schema

    def migrate(self, migrating: Callable[[], AbstractContextManager[object]] = nullcontext) -> None:
        """Bring the schema to the newest Alembic revision (idempotent).

        `migrating()` wraps an upgrade that really runs (the daemon keeps extending
        systemd's start timeout in it), not the quick check that finds none needed.
        """
        if self._revision() == SCHEMA_REVISION:
            return  # every start of every command comes here: skip loading Alembic (~8 MB, ~0.1 s)
        from alembic import command
        from alembic.util import CommandError

        # CommandError: a revision this syncd does not know, say (a newer syncd migrated the database).
        doing = "migrating the schema"
        with migrating(), _state_errors(doing, CommandError), self._connection(doing, write=True) as conn:
            if self.postgres:
                # N daemons started at once on an empty database: one migrates, the others
                # wait here, then find the schema current. Waiting is the point, so no timeouts.
                conn.execute(sa.text("SET LOCAL lock_timeout = 0"))
                conn.execute(sa.text("SET LOCAL statement_timeout = 0"))
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('syncd.migrate:' || current_schema()))"))
            command.upgrade(_alembic_config(conn), "head")

    def _revision(self) -> str | None:
        """The schema's Alembic revision, or None before the first migration."""
        with self._connection("reading the schema revision") as conn:
            if not sa.inspect(conn).has_table("alembic_version"):
                return None
            revision: str | None = conn.scalar(sa.text("SELECT version_num FROM alembic_version"))
            return revision

    def schema_is_current(self) -> bool:
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        with self._connection("reading the schema revision") as conn:
            current = MigrationContext.configure(conn).get_current_heads()
            heads = ScriptDirectory.from_config(_alembic_config(conn)).get_heads()
        return set(current) == set(heads)

    # -- syncs

    def ensure_syncs(self, names: Iterable[str]) -> None:
        """Add the syncs not known yet; several daemons may do it at once (ON CONFLICT DO NOTHING)."""
        insert = _dialect_insert(self.engine)
        with self._connection("adding syncs", write=True) as conn:
            existing = set(conn.scalars(sa.select(syncs_table.c.name)))
            for name in names:
                if name not in existing:
                    conn.execute(
                        insert(syncs_table)
                        .values(name=name, state=SyncState.NEVER_RUN, records_sent=0, created_at=utcnow())
                        .on_conflict_do_nothing(index_elements=["name"])
                    )

    def cursor(self, sync: str) -> Cursor | None:
        with self._connection("reading the watermark") as conn:
            row = conn.execute(
                sa.select(syncs_table.c.watermark, syncs_table.c.watermark_key).where(
                    syncs_table.c.name == sync
                )
            ).one_or_none()
        if row is None or row.watermark is None:
            return None
        return Cursor(decode_value(row.watermark), decode_value(row.watermark_key))

    def acquire_lease(self, sync: str, ttl: timedelta) -> Lease:
        """Take or renew the right to run a cycle of `sync`; LeaseHeldError while another owner holds it.

        Claimable: no owner, our own, a lease run out by the database's clock, or an owner on
        this host whose process is gone (a `kill -9` must not block the next `syncd once` for
        a whole lease). Never waits on a row lock: a row locked by another session (a commit
        in progress, or a stalled daemon's transaction) means "held" (SKIP LOCKED). A takeover
        increments the generation; the cycle's progress starts again from zero.
        """
        started = time.monotonic()
        holder, _ = self.lease_holder(sync)
        table = syncs_table.c
        claimable = sa.or_(table.owner.is_(None), table.owner == self.owner, table.lease_until < self._now())
        if holder is not None and _dead_local_owner(holder):
            claimable = sa.or_(claimable, table.owner == holder)
        where: sa.ColumnElement[bool]
        if self.postgres:
            free = sa.select(table.name).where(table.name == sync, claimable).with_for_update(skip_locked=True)
            where = table.name.in_(free.scalar_subquery())
        else:  # SQLite locks the whole database for a write, briefly
            where = sa.and_(table.name == sync, claimable)
        statement = (
            syncs_table.update()
            .where(where)
            .values(
                owner=self.owner,
                lease_until=self._later(ttl),
                lease_generation=sa.case(
                    (table.owner == self.owner, table.lease_generation), else_=table.lease_generation + 1
                ),
                cycle_started_at=self._now(),
                cycle_rows_read=0,
                cycle_sent=0,
            )
            .returning(table.lease_generation)
        )
        with self._connection("taking the lease", write=True) as conn:
            generation = conn.scalar(statement)
        if generation is None:
            owner, expires_at = self.lease_holder(sync)
            raise LeaseHeldError(sync, owner, expires_at)
        return Lease(self, sync, ttl, generation, started + ttl.total_seconds())

    def renew_lease(self, lease: Lease) -> bool:
        """Extend `lease` by its ttl from the database's now; False when it is not ours any more.

        Callers hold `lease.writing`; the row lock may be waited for up to `lock_timeout`.
        """
        with self._connection("renewing the lease", write=True) as conn:
            result = conn.execute(
                syncs_table.update().where(self._fenced(lease)).values(lease_until=self._later(lease.ttl))
            )
        return result.rowcount == 1

    def release_lease(self, sync: str) -> None:
        with self._connection("releasing the lease", write=True) as conn:
            conn.execute(
                syncs_table.update()
                .where(syncs_table.c.name == sync, syncs_table.c.owner == self.owner)
                .values(owner=None, lease_until=None, cycle_started_at=None)
            )

    def reserve_request(self, name: str, interval_s: float) -> float:
        """Take the next request slot of `name` (PostgreSQL): seconds to wait before sending.

        One row per API endpoint holds the next free slot, by the database's clock, so every
        daemon on this state database shares one `requests_per_second` (GCRA, burst 1).
        """
        step = sa.literal(timedelta(seconds=interval_s), sa.Interval)
        now = sa.func.clock_timestamp()
        insert = _dialect_insert(self.engine)(rate_limits_table).values(name=name, next_at=now + step)
        statement = insert.on_conflict_do_update(
            index_elements=["name"],
            set_={"next_at": sa.func.greatest(rate_limits_table.c.next_at, now) + step},
        ).returning(sa.extract("epoch", rate_limits_table.c.next_at - step - now))
        with self._connection("taking a request slot", write=True) as conn:
            return float(conn.scalar(statement))

    def _fenced(self, lease: Lease) -> sa.ColumnElement[bool]:
        return sa.and_(
            syncs_table.c.name == lease.sync,
            syncs_table.c.owner == self.owner,
            syncs_table.c.lease_generation == lease.generation,
        )

    def _now(self) -> sa.ColumnElement[Any]:
        """The state database's clock, in the form its lease_until column compares with."""
        if self.postgres:
            return sa.func.clock_timestamp()
        return sa.func.strftime("%Y-%m-%d %H:%M:%f000", "now")  # SQLAlchemy's text form of a DateTime

    def _later(self, ttl: timedelta) -> sa.ColumnElement[Any]:
        if self.postgres:
            return sa.func.clock_timestamp() + sa.literal(ttl, sa.Interval)
        return sa.func.strftime("%Y-%m-%d %H:%M:%f000", "now", f"{ttl.total_seconds():+.3f} seconds")

    def lease_holder(self, sync: str) -> tuple[str | None, datetime | None]:
        with self._connection("reading the lease") as conn:
            row = conn.execute(
                sa.select(syncs_table.c.owner, syncs_table.c.lease_until).where(syncs_table.c.name == sync)
            ).one_or_none()
        return (row.owner, _aware(row.lease_until)) if row else (None, None)

    def set_state(
        self,
        sync: str,
        state: SyncState,
        *,
        error: str | None = None,
        ran: bool = True,
        backlog: int | None = None,
    ) -> None:
        assert state in STORED_STATES, state
        now = utcnow()
        values: dict[str, Any] = {"state": state, "last_error": error}
        if ran:
            values["last_run_at"] = now
        if state is SyncState.OK and ran:
            values["last_success_at"] = now
        if backlog is not None:
            values["backlog"] = backlog
        if ran:  # the cycle is over; a cycle another daemon runs now stays shown as running
            values["cycle_started_at"] = sa.case(
                (syncs_table.c.owner == self.owner, sa.null()), else_=syncs_table.c.cycle_started_at
            )
        # A daemon that lost the sync (paused, cut off) does not overwrite the owner's state.
        mine = sa.or_(
            syncs_table.c.owner.is_(None), syncs_table.c.owner == self.owner, syncs_table.c.lease_until < self._now()
        )
        with self._connection("recording the sync's state", write=True) as conn:
            conn.execute(syncs_table.update().where(syncs_table.c.name == sync, mine).values(**values))

    def reset(self, sync: str, cursor: Cursor | None, *, forget: Iterable[Sequence[str]] | None) -> None:
        """Move the watermark (None = the beginning) and forget the digests of `forget`'s keys.

        `forget` yields batches of keys whose rows must be sent again; None forgets none.
        A reset to the beginning forgets every digest of the sync.
        """
        with self._connection("resetting the watermark", write=True) as conn:
            conn.execute(
                syncs_table.update()
                .where(syncs_table.c.name == sync)
                .values(
                    watermark=None if cursor is None else encode_value(cursor.watermark),
                    watermark_key=None if cursor is None else encode_value(cursor.key),
                )
            )
            if forget is None:
                return
            if cursor is None:
                conn.execute(digests_table.delete().where(digests_table.c.sync == sync))
                return
            for keys in forget:
                conn.execute(
                    digests_table.delete().where(digests_table.c.sync == sync, digests_table.c.key.in_(keys))
                )

    # -- the hot path

    def has_digests(self, sync: str) -> bool:
        with self._connection("reading digests") as conn:
            return conn.scalar(sa.select(digests_table.c.key).where(digests_table.c.sync == sync).limit(1)) is not None

    def digest_count(self, sync: str) -> int:
        with self._connection("reading digests") as conn:
            return conn.scalar(sa.select(sa.func.count()).select_from(digests_table).where(digests_table.c.sync == sync)) or 0

    def known_digests(self, sync: str, keys: Sequence[str]) -> dict[str, bytes]:
        """Digests of the last acknowledged payloads for `keys` (one query per batch)."""
        return self._lookup("digest", sync, keys)

    def known_source_hashes(self, sync: str, keys: Sequence[str]) -> dict[str, bytes]:
        """Source fingerprints stored with the acknowledged payloads of `keys`."""
        return self._lookup("source_hash", sync, keys)

    def _lookup(self, column: str, sync: str, keys: Sequence[str]) -> dict[str, bytes]:
        """Plain DB-API SQL: this runs once per batch of a backfill or reconcile, where
        SQLAlchemy's statement building and rows cost more than the lookup itself."""
        if not keys:
            return {}
        mark = self._placeholder
        statement = (
            f'SELECT "key", {column} FROM digests WHERE sync = {mark} AND "key" IN ({", ".join([mark] * len(keys))})'
        )
        with self._connection("reading digests") as conn:
            cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            try:
                cursor.execute(statement, (sync, *keys))
                return {key: bytes(value) for key, value in cursor.fetchall() if value is not None}
            finally:
                cursor.close()

    def mapping_hash(self, sync: str) -> str | None:
        with self._connection("reading the mapping hash") as conn:
            return conn.scalar(sa.select(syncs_table.c.mapping_hash).where(syncs_table.c.name == sync))

    def set_mapping_hash(self, sync: str, value: str) -> None:
        with self._connection("recording the mapping hash", write=True) as conn:
            conn.execute(syncs_table.update().where(syncs_table.c.name == sync).values(mapping_hash=value))

    def commit_batch(
        self,
        sync: str,
        *,
        cursor: Cursor | None,
        acked: Sequence[tuple[str, bytes, bytes]] = (),
        acked_by: Sequence[PushRecord] = (),
        refreshed: Sequence[tuple[str, bytes]] = (),
        pushes: Sequence[PushRecord] = (),
        dead_letters: Sequence[DeadLetter] = (),
        resolve_keys: Sequence[str] = (),
        lease: Lease | None = None,
        progress: tuple[int, int] | None = None,
        feed_cursors: Sequence[tuple[str, Cursor]] = (),
        removed: Sequence[tuple[str, str]] = (),
        returned: Sequence[str] = (),
        sent: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Record one batch's outcome atomically; `cursor=None` leaves the watermark alone.

        With `lease`, the commit is fenced by owner and generation and renews the lease;
        it raises LeaseLost (and writes nothing) when the sync is not ours any more.
        `progress` is the running cycle's (rows read, records sent) so far, for `status`.
        `feed_cursors`: change feeds' new positions, `(feed, cursor)`. `removed`: keys that
        left the model, `(key, reason)`: their digests go, a removal is recorded. `returned`:
        acknowledged keys whose removal, if any, is over. `sent`: `(key, JSON)` of the
        attributes `[syncs.removed]` needs, for keys in `acked`. `acked_by`: the ACK of
        `pushes` that carried each entry of `acked`, in the same order; each digest is stored
        with that push's id (without it, with none).
        """
        now = utcnow()
        with _fenced_write(lease), self._connection("committing a batch", write=True) as conn:
            values: dict[str, Any] = {}
            if cursor is not None:
                values["watermark"] = encode_value(cursor.watermark)
                values["watermark_key"] = encode_value(cursor.key)
            acked_count = sum(p.record_count for p in pushes if p.outcome == PushOutcome.ACK)
            if acked_count:
                values["records_sent"] = syncs_table.c.records_sent + acked_count
            if progress is not None:
                values["cycle_rows_read"], values["cycle_sent"] = progress
            update = syncs_table.update().where(syncs_table.c.name == sync)
            if lease is not None:
                values["lease_until"] = self._later(lease.ttl)
                update = syncs_table.update().where(self._fenced(lease))
            if values:
                result = conn.execute(update.values(**values))
                if lease is not None and result.rowcount != 1:
                    lease.lose("another syncd took this sync over")
            # One INSERT ... RETURNING per push (a batch has one, a split batch a few): a
            # multi-row RETURNING in parameter order needs SQLAlchemy 2.0.10, above our floor.
            push_ids: dict[int, int] = {}  # id() of a PushRecord → its row's id
            insert_push = pushes_table.insert().returning(pushes_table.c.id)
            for p in pushes:
                row = {
                    "sync": sync,
                    "kind": p.kind,
                    "sent_at": p.sent_at,
                    "record_count": p.record_count,
                    "http_status": p.http_status,
                    "api_code": p.api_code,
                    "description": p.description,
                    "trans_id": p.trans_id,
                    "correlation_id": p.correlation_id,
                    "attempt": p.attempt,
                    "duration_ms": p.duration_ms,
                    "outcome": p.outcome,
                }
                push_ids[id(p)] = conn.execute(insert_push, row).scalar_one()
            if acked:
                carried = list(map(push_ids.get, map(id, acked_by))) if len(acked_by) == len(acked) else None
                self._upsert_digests(conn, sync, acked, carried)
            if refreshed:  # payload unchanged, source changed: remember the new fingerprint
                mark = self._placeholder
                conn.exec_driver_sql(
                    f'UPDATE digests SET source_hash = {mark} WHERE sync = {mark} AND "key" = {mark}',
                    [(source, sync, key) for key, source in refreshed],
                )
            if resolve_keys:
                conn.execute(
                    dead_letters_table.update()
                    .where(
                        dead_letters_table.c.sync == sync,
                        dead_letters_table.c.resolved_at.is_(None),
                        dead_letters_table.c.key.in_(resolve_keys),
                    )
                    .values(resolved_at=now, resolution="delivered")
                )
            if dead_letters:
                _record_dead_letters(conn, sync, dead_letters, now)
            if sent:
                mark = self._placeholder
                conn.exec_driver_sql(
                    f'UPDATE digests SET sent = {mark} WHERE sync = {mark} AND "key" = {mark}',
                    [(text, sync, key) for key, text in sent],
                )
            if feed_cursors or removed or returned:
                _record_model_changes(conn, sync, feed_cursors, removed, returned, now)

    def _upsert_digests(
        self,
        conn: sa.Connection,
        sync: str,
        acked: Sequence[tuple[str, bytes, bytes]],
        push_ids: Sequence[int | None] | None,
    ) -> None:
        """Many rows per statement, not one statement per row.

        This runs on the committer thread beside a busy sync thread. SQLite releases the
        GIL for every statement it steps and the thread then waits for the GIL to come
        back; row by row (executemany) that wait dominated a backfill's state writes.
        Keys are unique within one commit (a cycle reads each key once), which
        PostgreSQL's ON CONFLICT needs of a multi-row statement.
        """
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            for start in range(0, len(acked), UPSERT_ROWS):
                part = acked[start : start + UPSERT_ROWS]
                keys, digests, sources = zip(*part, strict=True)  # flattened in C, not row by row
                carriers = [None] if push_ids is None else push_ids[start : start + UPSERT_ROWS]
                if carriers.count(carriers[0]) == len(carriers):  # one ACK carried them all: bind its id once
                    values = [carriers[0], *chain.from_iterable(zip(repeat(sync), keys, digests, sources, strict=False))]
                    cursor.execute(_upsert_statement(self._placeholder, len(part), one_push=True), values)
                else:  # a bisected batch: each row its own push id
                    values = list(chain.from_iterable(zip(repeat(sync), keys, digests, sources, carriers, strict=False)))
                    cursor.execute(_upsert_statement(self._placeholder, len(part), one_push=False), values)
        finally:
            cursor.close()

    # -- models: change feeds and removals

    def feed_cursor(self, sync: str, feed: str) -> Cursor | None:
        with self._connection("reading a change feed's position") as conn:
            row = conn.execute(
                sa.select(feed_cursors_table.c.watermark, feed_cursors_table.c.watermark_key).where(
                    feed_cursors_table.c.sync == sync, feed_cursors_table.c.feed == feed
                )
            ).one_or_none()
        return None if row is None else Cursor(decode_value(row.watermark), decode_value(row.watermark_key))

    def removal_count(self, sync: str) -> int:
        with self._connection("reading removals") as conn:
            return conn.scalar(sa.select(sa.func.count()).where(removals_table.c.sync == sync)) or 0

    def removals(self, sync: str, keys: Sequence[str] | None = None) -> dict[str, tuple[datetime, str]]:
        """`key → (when, why)` of the keys that left the model (all of them, or of `keys`)."""
        query = sa.select(removals_table.c.key, removals_table.c.removed_at, removals_table.c.reason).where(
            removals_table.c.sync == sync
        )
        if keys is not None:
            query = query.where(removals_table.c.key.in_(keys))
        with self._connection("reading removals") as conn:
            return {row.key: (_aware(row.removed_at), row.reason) for row in conn.execute(query)}  # type: ignore[misc]

    def sent_attributes(self, sync: str, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The attributes kept from the last acknowledged record of `keys` (for `[syncs.removed]`)."""
        if not keys:
            return {}
        with self._connection("reading the attributes sent") as conn:
            rows = conn.execute(
                sa.select(digests_table.c.key, digests_table.c.sent).where(
                    digests_table.c.sync == sync, digests_table.c.key.in_(keys), digests_table.c.sent.is_not(None)
                )
            )
            return {row.key: orjson.loads(row.sent) for row in rows}

    def digest_keys(self, sync: str, batch: int = 5000) -> Iterator[list[str]]:
        """Every key with a digest, in batches (for reconcile to find keys the model no longer has)."""
        last: str | None = None
        while True:
            query = sa.select(digests_table.c.key).where(digests_table.c.sync == sync).order_by(digests_table.c.key)
            if last is not None:
                query = query.where(digests_table.c.key > last)
            with self._connection("reading digests") as conn:
                keys = list(conn.scalars(query.limit(batch)))
            if keys:
                yield keys
            if len(keys) < batch:
                return
            last = keys[-1]

    # -- reading for operators

    def status(self, sync: str | None = None) -> list[SyncStatus]:
        """Where every sync stands (or only `sync`), in name order."""

        def only(query: sa.Select[Any], column: sa.Column[Any]) -> sa.Select[Any]:
            return query if sync is None else query.where(column == sync)

        with self._connection("reading the status") as conn:
            open_letters: dict[str, int] = dict(
                conn.execute(
                    only(sa.select(dead_letters_table.c.sync, sa.func.count()), dead_letters_table.c.sync)
                    .where(dead_letters_table.c.resolved_at.is_(None))
                    .group_by(dead_letters_table.c.sync)
                ).all()
            )
            removed: dict[str, int] = dict(
                conn.execute(
                    only(sa.select(removals_table.c.sync, sa.func.count()), removals_table.c.sync).group_by(
                        removals_table.c.sync
                    )
                ).all()
            )
            # Compared with the database's clock: a lease that ran out means no cycle runs.
            current = sa.and_(syncs_table.c.owner.is_not(None), syncs_table.c.lease_until > self._now())
            rows = conn.execute(
                only(
                    sa.select(syncs_table, sa.case((current, True), else_=False).label("lease_current")),
                    syncs_table.c.name,
                ).order_by(syncs_table.c.name)
            ).all()
        return [
            SyncStatus(
                name=row.name,
                state=SyncState(row.state),
                watermark=decode_value(row.watermark),
                watermark_key=decode_value(row.watermark_key),
                last_run_at=_aware(row.last_run_at),
                last_success_at=_aware(row.last_success_at),
                last_error=row.last_error,
                records_sent=row.records_sent,
                backlog=row.backlog,
                dead_letters=open_letters.get(row.name, 0),
                owner=row.owner,
                lease_until=_aware(row.lease_until),
                removed=removed.get(row.name, 0),
                running=bool(row.lease_current) and row.cycle_started_at is not None,
                cycle_started_at=_aware(row.cycle_started_at),
                cycle_rows_read=row.cycle_rows_read,
                cycle_sent=row.cycle_sent,
            )
            for row in rows
        ]

    def pushes(
        self, sync: str | None = None, limit: int = 100, *, since: datetime | None = None, failed: bool = False
    ) -> list[dict[str, Any]]:
        """Push records, newest first; `failed` keeps those whose outcome is not an ACK."""
        query = sa.select(pushes_table).order_by(pushes_table.c.id.desc()).limit(limit)
        if sync is not None:
            query = query.where(pushes_table.c.sync == sync)
        if since is not None:
            query = query.where(pushes_table.c.sent_at >= since)
        if failed:
            query = query.where(pushes_table.c.outcome != PushOutcome.ACK)
        with self._connection("reading pushes") as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def open_dead_letter_count(self, sync: str) -> int:
        with self._connection("reading dead letters") as conn:
            return (
                conn.scalar(
                    sa.select(sa.func.count()).where(
                        dead_letters_table.c.sync == sync, dead_letters_table.c.resolved_at.is_(None)
                    )
                )
                or 0
            )

    def dead_letters(
        self, sync: str | None = None, *, include_resolved: bool = False, ids: Sequence[int] = ()
    ) -> Iterator[DeadLetter]:
        query = sa.select(dead_letters_table).order_by(dead_letters_table.c.id)
        if sync is not None:
            query = query.where(dead_letters_table.c.sync == sync)
        if not include_resolved:
            query = query.where(dead_letters_table.c.resolved_at.is_(None))
        if ids:
            query = query.where(dead_letters_table.c.id.in_(ids))
        with self._connection("reading dead letters") as conn:
            for row in conn.execute(query):
                yield DeadLetter(
                    id=row.id,
                    sync=row.sync,
                    key=row.key,
                    payload=orjson.loads(row.payload) if row.payload else None,
                    reason=row.reason,
                    http_status=row.http_status,
                    api_code=row.api_code,
                    first_seen=_aware(row.first_seen),
                    last_seen=_aware(row.last_seen),
                    attempts=row.attempts,
                    resolved_at=_aware(row.resolved_at),
                    resolution=row.resolution,
                )

    def discard_dead_letters(self, ids: Sequence[int]) -> int:
        with self._connection("discarding dead letters", write=True) as conn:
            return conn.execute(
                dead_letters_table.update()
                .where(dead_letters_table.c.id.in_(ids), dead_letters_table.c.resolved_at.is_(None))
                .values(resolved_at=utcnow(), resolution="discarded")
            ).rowcount

    def sync_status(self, sync: str) -> SyncStatus | None:
        """One sync's row of `status()` (a daemon that does not hold the sync shows the
        holder's progress in its metrics)."""
        found = self.status(sync)
        return found[0] if found else None

    # -- read-only views for operators (status, pushes, preview, inspect)

    def schema_revision(self) -> str | None:
        """The schema's Alembic revision, None before the first migration; reads only."""
        return self._revision()

    def acknowledged(self, sync: str, key: str) -> tuple[bytes, dict[str, Any] | None] | None:
        """The digest of the payload last acknowledged for one key and the push row whose ACK
        carried it (None for a key acknowledged before migration 0005); None if never acknowledged."""
        carrier = digests_table.outerjoin(pushes_table, pushes_table.c.id == digests_table.c.push_id)
        query = (
            sa.select(digests_table.c.digest, pushes_table)
            .select_from(carrier)
            .where(digests_table.c.sync == sync, digests_table.c.key == key)
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).one_or_none()
        if row is None:
            return None
        push = {name: value for name, value in row._mapping.items() if name != "digest"}
        if push["id"] is None:
            return bytes(row.digest), None
        return bytes(row.digest), {**push, "sent_at": _aware(push["sent_at"])}

    def dead_letter_ids(self, sync: str, key: str) -> list[int]:
        """Every dead letter of one key, open or resolved, oldest first (through ix_dead_letters_sync_key)."""
        with self._connection("reading dead letters") as conn:
            return list(
                conn.scalars(
                    sa.select(dead_letters_table.c.id)
                    .where(dead_letters_table.c.sync == sync, dead_letters_table.c.key == key)
                    .order_by(dead_letters_table.c.id)
                )
            )


@contextmanager
def _fenced_write(lease: Lease | None) -> Iterator[None]:
    """Under `lease`: hold its write lock, check it first, and count a committed write as a renewal."""
    if lease is None:
        yield
        return
    with lease.writing:
        lease.check()
        started = time.monotonic()
        yield
        lease.renewed(started)


def _dead_local_owner(owner: str) -> bool:
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, just not ours
    return False


def _record_dead_letters(
    conn: sa.Connection, sync: str, letters: Sequence[DeadLetter], now: datetime
) -> None:
    """One open dead letter per key: a repeat failure updates it instead of piling up."""
    keys = [letter.key for letter in letters]
    open_ids = dict(
        conn.execute(
            sa.select(dead_letters_table.c.key, dead_letters_table.c.id).where(
                dead_letters_table.c.sync == sync,
                dead_letters_table.c.resolved_at.is_(None),
                dead_letters_table.c.key.in_(keys),
            )
        ).all()
    )
    for letter in letters:
        values = {
            "payload": orjson.dumps(letter.payload, default=str).decode() if letter.payload is not None else None,
            "reason": letter.reason,
            "http_status": letter.http_status,
            "api_code": letter.api_code,
            "last_seen": now,
        }
        if letter.key in open_ids:
            conn.execute(
                dead_letters_table.update()
                .where(dead_letters_table.c.id == open_ids[letter.key])
                .values(attempts=dead_letters_table.c.attempts + 1, **values)
            )
        else:
            conn.execute(
                dead_letters_table.insert().values(
                    sync=sync, key=letter.key, first_seen=now, attempts=1, **values
                )
            )


def _record_model_changes(
    conn: sa.Connection,
    sync: str,
    feed_cursors: Sequence[tuple[str, Cursor]],
    removed: Sequence[tuple[str, str]],
    returned: Sequence[str],
    now: datetime,
) -> None:
    """Feed cursors, removals and returns, in the transaction of the batches they belong to."""
    for feed, cursor in feed_cursors:
        values = {"watermark": encode_value(cursor.watermark), "watermark_key": encode_value(cursor.key)}
        where = (feed_cursors_table.c.sync == sync, feed_cursors_table.c.feed == feed)
        if conn.execute(feed_cursors_table.update().where(*where).values(**values)).rowcount == 0:
            conn.execute(feed_cursors_table.insert().values(sync=sync, feed=feed, **values))
    if returned:
        conn.execute(removals_table.delete().where(removals_table.c.sync == sync, removals_table.c.key.in_(returned)))
    if removed:
        keys = [key for key, _ in removed]
        # A key whose removal is recorded is sent again, in full, when it comes back.
        conn.execute(digests_table.delete().where(digests_table.c.sync == sync, digests_table.c.key.in_(keys)))
        conn.execute(removals_table.delete().where(removals_table.c.sync == sync, removals_table.c.key.in_(keys)))
        conn.execute(
            removals_table.insert(), [{"sync": sync, "key": key, "removed_at": now, "reason": why} for key, why in removed]
        )


@functools.lru_cache(maxsize=16)  # a backfill uses the full size and a few remainders
def _upsert_statement(mark: str, rows: int, *, one_push: bool) -> str:
    """The digest upsert; with `one_push` the push id is one parameter for every row.

    Every parameter costs the driver time, and a whole chunk usually comes from one ACK:
    a push id per row made the PostgreSQL upsert ~25% slower, bound once it costs nothing.
    """
    update = (
        'ON CONFLICT (sync, "key") DO UPDATE SET digest = excluded.digest, source_hash = excluded.source_hash, '
        "push_id = excluded.push_id"
    )
    columns = 'INSERT INTO digests (sync, "key", digest, source_hash, push_id)'
    if not one_push:
        values = ", ".join([f"({mark}, {mark}, {mark}, {mark}, {mark})"] * rows)
        return f"{columns} VALUES {values} {update}"
    values = ", ".join([f"({mark}, {mark}, {mark}, {mark})"] * rows)
    # `WHERE true`: SQLite needs it to tell an upsert's ON CONFLICT from a join's ON.
    return (
        f"{columns} SELECT column1, column2, column3, column4, CAST({mark} AS BIGINT) "
        f"FROM (VALUES {values}) AS v WHERE true {update}"
    )


WAL_CHECKPOINT_PAGES = 10_000
WAL_SIZE_LIMIT = 64 * 2**20


def _create_engine(url: str, lease: timedelta) -> sa.Engine:
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(parsed.database)), exist_ok=True)
        engine = sa.create_engine(parsed, connect_args={"timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            # WAL lets `syncd status` read while the daemon writes; synchronous=NORMAL is
            # durable across process crashes (the case we guard) at a fraction of FULL's cost.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            # A backfill's digests land on random pages of a large index (uuid keys); a
            # checkpoint every 10,000 WAL pages (40 MB) instead of 1,000 copies each page
            # back once for many commits (1M SuiteCRM contacts: 46 -> 40 s). The WAL file is
            # cut back to 64 MB after a checkpoint.
            cursor.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
            cursor.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            cursor.close()

        return engine
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(f"it must be SQLite or PostgreSQL, not {parsed.get_backend_name()}")
    return sa.create_engine(parsed, pool_pre_ping=True, connect_args=postgres_session_settings(parsed, lease))


def postgres_session_settings(url: sa.URL, lease: timedelta) -> dict[str, Any]:
    """libpq parameters that bound every state transaction by the lease L (DESIGN.md §9).

    - lock_timeout L/4: a write waits at most a quarter lease for a row lock (taking a
      lease does not wait at all: SKIP LOCKED);
    - statement_timeout L/2;
    - idle_in_transaction_session_timeout L/2: the server ends the transaction of a
      daemon stalled inside it (SIGSTOP, a paused VM) and releases its row locks;
    - TCP keepalives after L/4 idle, every L/12, 3 probes, and tcp_user_timeout L/2, on
      both ends (libpq options and the server's tcp_* settings), so a partition ends the
      session within about half a lease instead of the kernel's two hours;
    - connect_timeout L/4 (at least 2 s, libpq's minimum that is honoured).
    - application_name "syncd".
    Settings given in the URL win.
    """
    seconds = lease.total_seconds()
    idle, interval, count = max(1, round(seconds / 4)), max(1, round(seconds / 12)), 3
    server = {
        "lock_timeout": f"{round(seconds * 250)}ms",
        "statement_timeout": f"{round(seconds * 500)}ms",
        "idle_in_transaction_session_timeout": f"{round(seconds * 500)}ms",
        "tcp_keepalives_idle": idle,
        "tcp_keepalives_interval": interval,
        "tcp_keepalives_count": count,
        "tcp_user_timeout": round(seconds * 500),
    }
    given = url.query.get("options") or ""
    given = " ".join(given) if isinstance(given, tuple) else given
    options = " ".join(f"-c {name}={value}" for name, value in server.items() if name not in given)
    settings: dict[str, Any] = {
        "options": f"{given} {options}".strip(),
        "keepalives": 1,
        "keepalives_idle": idle,
        "keepalives_interval": interval,
        "keepalives_count": count,
        "tcp_user_timeout": round(seconds * 500),
        "connect_timeout": max(2, round(seconds / 4)),
        # Named like the source sessions, so a syncd reading a CRM in this same database does not
        # take these short state transactions for writes that may commit late (source.py).
        "application_name": APPLICATION_NAME,
    }
    return {name: value for name, value in settings.items() if name == "options" or name not in url.query}


def _dialect_insert(engine: sa.Engine) -> Callable[..., Any]:
    """INSERT with ON CONFLICT for the state database's dialect."""
    from sqlalchemy.dialects import postgresql, sqlite

    return postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert


_TIMEOUTS = {  # PostgreSQL SQLSTATEs of the bounds set in postgres_session_settings
    "55P03": "a row lock was held longer than lock_timeout",
    "57014": "a statement ran longer than statement_timeout",
    "25P03": "the server ended a transaction left idle longer than idle_in_transaction_session_timeout",
}


@contextmanager
def _state_errors(doing: str, *also: type[Exception]) -> Iterator[None]:
    """State database errors (SQLAlchemy's, and `also`) as one-line `StateError`s naming what was being done."""
    failures: tuple[type[Exception], ...] = (sa.exc.SQLAlchemyError, *also)
    try:
        yield
    except failures as error:
        code = str(getattr(getattr(error, "orig", None) or error, "sqlstate", None))
        raise StateError(doing, _TIMEOUTS.get(code) or db_error_line(error)) from None


def _alembic_config(conn: sa.Connection) -> Any:
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", str(resources.files("syncd.migrations")))
    config.attributes["connection"] = conn
    return config
