"""Reading changed rows from a CRM table, in (watermark, key) order, without losing any.

The rules that keep changes from being lost live here and only here:
- rows are read with a keyset cursor, `(wm, key) > (:wm, :key)`, so rows sharing a
  watermark across a batch boundary are never skipped;
- each cycle reads below an upper bound taken from the *source's* clock minus `settle`,
  told in the frame naive timestamps are written in (`[sources] timezone`), never inside
  the current tick of the column's resolution, and on PostgreSQL also below the start of
  the oldest open transaction, so a row whose transaction commits late, or lands later in
  the same second, is still ahead of the cursor when it becomes visible;
- identifiers come from reflection and are always quoted by SQLAlchemy, never pasted.

The bound is taken just before the first read, in a transaction of its own. Rows are
streamed (server-side cursors where the driver has them) in chunks, each its own short
read transaction keeping that bound, so a long throttled backfill never pins a snapshot
open on the CRM for hours.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import queue
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Any, TypeVar

import orjson
import sqlalchemy as sa
import structlog
from sqlalchemy.dialects import mysql

from syncd.config import ChangeFeed, SecretFileError, SourceConfig, SyncConfig
from syncd.errors import SyncdError
from syncd.values import Cursor, db_error_line, key_text

__all__ = ["Bound", "SchemaProblem", "Source", "SourceError", "TableReader", "bound_before", "prefetched", "shift_bound"]

log = structlog.get_logger(__name__)

CHUNK_ROWS = 50_000  # rows per read transaction
FETCH_ROWS = 5_000  # rows per round trip of a server-side cursor
FUTURE_TOLERANCE = timedelta(minutes=5)  # clock skew before a future watermark is reported
KEY_ROWS = 500  # keys per `IN (...)` lookup
PROBE_ROWS = 100_000  # rows of a view or query that `check` reads for duplicate keys and NULL watermarks
APPLICATION_NAME = "syncd"  # PostgreSQL application_name, excluded from the open-transaction gate

_T = TypeVar("_T")


class SourceError(SyncdError):
    """The source cannot be read as configured (connection, missing table or column)."""


@dataclass(frozen=True, slots=True)
class SchemaProblem:
    severity: str  # error | warning
    message: str


@dataclass(frozen=True, slots=True)
class Bound:
    """The cycle's upper bound; `value is None` means unbounded (numeric watermarks)."""

    value: Any
    settled: Any = None  # set when an open transaction holds `value` below the source's now minus settle


class Source:
    """One configured source database: an engine, and readers for its tables."""

    def __init__(self, name: str, config: SourceConfig) -> None:
        self.name = name
        self.config = config
        self._engine: sa.Engine | None = None
        self._lock = threading.Lock()
        self._gate_warned = False
        self.sees_activity: bool | None = None  # may this role read other sessions' xact_start?

    @property
    def engine(self) -> sa.Engine:
        with self._lock:
            if self._engine is None:
                try:
                    self._engine = _create_engine(self.config, self.name)
                except SecretFileError as error:  # e.g. a credential gone since start-up
                    raise SourceError(str(error)) from None
            return self._engine

    def dispose(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

    @functools.cached_property
    def can_offload(self) -> bool:
        """Whether another process can open this database (an in-memory SQLite one it cannot)."""
        url = sa.make_url(self.config.url.get_secret_value())
        return not (url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"))

    def reader(self, sync: SyncConfig) -> TableReader:
        return TableReader(self, sync)

    def feed_reader(self, sync: SyncConfig, feed: ChangeFeed) -> TableReader:
        """A reader of one `[[syncs.changes]]` feed: its key and watermark, the filter as a condition."""
        shape = sync.model_copy(
            update={
                "name": f"{sync.name} (changes {feed.feed_id})",
                "table": feed.table,
                "query": feed.query,
                "key": feed.key,
                "watermark": feed.watermark,
                "filter": feed.filter,
                "fields": {},
                "changes": [],
                "removed": None,
            }
        )
        return TableReader(self, shape, feed=True)

    def warn_gate_once(self, reason: str) -> None:
        if not self._gate_warned:
            self._gate_warned = True
            log.warning(
                "open_transaction_gate_unavailable",
                source=self.name,
                reason=reason,
                fallback="settle only: a transaction open longer than settle may be missed until reconcile",
            )


class TableReader:
    """Reads one sync's model (a table, a view or a query): the bound, the changed rows,
    full passes, lookups by key and the backlog.

    The model's `filter` is the operator's SQL. Readers for previews and lookups apply it
    as a condition (only the model's rows); the cycle asks for `membership=True` instead:
    every row, with the filter's verdict as the last column (1 = in the model), so a row
    that stopped matching is seen and can be recorded as removed.
    """

    def __init__(self, source: Source, sync: SyncConfig, *, feed: bool = False) -> None:
        self.source = source
        self.sync = sync
        self.feed = feed  # a change feed: its filter is a condition, its rows are not fingerprinted
        self._table: sa.FromClause | None = None
        self._provisional = False  # a SQLite query model probed while empty: its types are guesses
        self._sqlite_fraction: bool | None = None  # whether SQLite text times carry fractions
        self._any_after: tuple[Any, sa.Select[Any]] | None = None  # (the table it was built for, the probe)

    # -- schema

    @property
    def table(self) -> Any:
        """The model as a FROM clause: the reflected table or view, or the query as `(...) AS m`."""
        if self._table is None:
            self._table = self._reflect() if self.sync.query is None else self._probe_query()
        return self._table

    def _reflect(self) -> sa.Table:
        assert self.sync.table is not None  # config: a sync has a table or a query
        schema, _, name = self.sync.table.rpartition(".")
        try:
            return sa.Table(name, sa.MetaData(), schema=schema or None, autoload_with=self.source.engine)
        except sa.exc.NoSuchTableError:
            raise SourceError(f"table {self.sync.table!r} not found in source {self.source.name!r}") from None
        except sa.exc.DBAPIError as error:
            raise SourceError(describe_db_error(self.source, error)) from None

    def _probe_query(self) -> sa.Subquery:
        """The query's columns, found by running it for zero rows (one for SQLite, which has no types).

        Only the key and the watermark need a type (how to compare them, how to turn a
        stored key back into a value); every other column comes back as the driver gives it.
        """
        assert self.sync.query is not None  # config: a sync has a table or a query
        query = _sql(self.sync.query)
        try:
            with self.source.engine.connect() as conn:
                if self.dialect == "sqlite":
                    result = conn.execute(sa.text(f"SELECT * FROM ({query.text}) AS m LIMIT 1"))
                    names = list(result.keys())
                    first = result.first()
                    types = {name: _sqlite_type(name, first, names, self.sync.watermark) for name in names}
                    self._provisional = first is None
                else:
                    result = conn.execute(sa.text(f"SELECT * FROM ({query.text}) AS m LIMIT 0"))
                    names = list(result.keys())
                    description = list(result.cursor.description)
                    result.close()
                    types = dict(zip(names, _driver_types(conn, self.dialect, description), strict=True))
        except sa.exc.DBAPIError as error:
            raise SourceError(f"query: {describe_db_error(self.source, error)}") from None
        wanted = (self.sync.key, self.sync.watermark)
        columns = [sa.column(name, types[name] if name in wanted else sa.types.NullType()) for name in names]
        return query.columns(*columns).subquery("m")

    @property
    def is_base_table(self) -> bool:
        """A table of the database, not a view or a query: its constraints and indexes speak for it."""
        if self.sync.query is not None:
            return False
        return self._is_base_table

    @functools.cached_property
    def _is_base_table(self) -> bool:
        table = self.table
        return table.name not in sa.inspect(self.source.engine).get_view_names(schema=table.schema)

    @functools.cached_property
    def key_is_unique(self) -> bool:
        """Whether the database guarantees one row per key (a table with a unique key, no filter join)."""
        return self.is_base_table and (self.sync.key,) in self._unique_sets()

    def _unique_sets(self) -> list[tuple[str | None, ...]]:
        table = self.table
        inspector = sa.inspect(self.source.engine)
        schema = table.schema
        unique_sets = [tuple(ix["column_names"]) for ix in inspector.get_indexes(table.name, schema=schema) if ix.get("unique")]
        unique_sets.append(tuple(inspector.get_pk_constraint(table.name, schema=schema).get("constrained_columns") or ()))
        for uc in inspector.get_unique_constraints(table.name, schema=schema):
            unique_sets.append(tuple(uc["column_names"]))
        return unique_sets

    @functools.cached_property
    def feeds(self) -> list[tuple[ChangeFeed, TableReader]]:
        """The sync's `[[syncs.changes]]` feeds, each with its reader."""
        return [(feed, self.source.feed_reader(self.sync, feed)) for feed in self.sync.changes]

    def problems(self, *, probe_data: bool = True) -> list[SchemaProblem]:
        """What `syncd check` reports about the live schema: missing columns, keys, indexes.

        Views and queries have no constraints to read: their keys and watermarks are
        checked by data (`probe_data`, a bounded read), never by asking for an index.
        """
        found = self._checked(
            lambda: self._problems(self.table, probe_data=probe_data) + (self.time_problems() if probe_data else [])
        )
        if any(p.severity == "error" for p in found):
            return found
        for feed, reader in self.feeds:
            found.extend(
                SchemaProblem(p.severity, f"changes ({feed.feed_id}): {p.message}")
                for p in reader._checked(functools.partial(reader._problems, reader.table, probe_data=False))
            )
        return found

    def _checked(self, problems: Callable[[], list[SchemaProblem]]) -> list[SchemaProblem]:
        try:
            return problems()
        except SourceError as error:
            return [SchemaProblem("error", str(error))]
        except sa.exc.DBAPIError as error:
            return [SchemaProblem("error", describe_db_error(self.source, error))]

    def _problems(self, table: Any, *, probe_data: bool) -> list[SchemaProblem]:
        where = self.sync.model_name if self.sync.query is None else "the query's columns"
        problems = [
            SchemaProblem("error", f"column {name!r} not found in {where} (sync {self.sync.name})")
            for name in self.sync.columns
            if name not in table.c
        ]
        if problems:
            return problems
        if self.sync.filter is not None:
            try:
                with self.source.engine.connect() as conn:
                    conn.execute(sa.select(sa.literal(1)).select_from(table).where(self._filter()).limit(0)).close()
            except sa.exc.DBAPIError as error:
                return [SchemaProblem("error", f"filter {self.sync.filter!r}: {describe_db_error(self.source, error)}")]
        if not self.is_base_table:
            return self._view_problems(table) if probe_data else []
        return self._table_problems(table)

    def _view_problems(self, table: Any) -> list[SchemaProblem]:
        """Duplicate keys and NULL watermarks in the first PROBE_ROWS rows by key, by data."""
        wm = self._watermark_expr()
        if _watermark_kind(table.c[self.sync.watermark], self.dialect) == "unsupported":
            column = table.c[self.sync.watermark]
            return [SchemaProblem("error", f"watermark column {column.name!r} is {column.type}; use a timestamp, date or integer column")]
        key = table.c[self.sync.key]
        sample = sa.select(key.label("k"), wm.label("w")).select_from(table).order_by(key).limit(PROBE_ROWS).subquery("p")
        with self.source.engine.connect() as conn:
            repeated = conn.execute(
                sa.select(sample.c.k, sa.func.count()).group_by(sample.c.k).having(sa.func.count() > 1).order_by(sample.c.k).limit(3)
            ).all()
            nulls = conn.scalar(sa.select(sa.func.count()).select_from(sample).where(sample.c.w.is_(None)))
        problems = []
        if repeated:
            shown = ", ".join(f"{key_value!r} ({count} rows)" for key_value, count in repeated)
            problems.append(
                SchemaProblem(
                    "error",
                    f"key {self.sync.key!r} is not unique in {self.sync.model_name}: {shown} among its first "
                    f"{PROBE_ROWS:,} rows by key; such keys are dead-lettered, never sent "
                    "(one row per key: aggregate or pick one row of the joined table)",
                )
            )
        if nulls:
            problems.append(
                SchemaProblem(
                    "warning",
                    f"watermark {self.sync.watermark!r} is NULL in {nulls} of the first {PROBE_ROWS:,} rows by key "
                    f"of {self.sync.model_name}: cycles never read them (only reconcile does); use COALESCE in the model",
                )
            )
        return problems

    def _table_problems(self, table: sa.Table) -> list[SchemaProblem]:
        problems: list[SchemaProblem] = []
        wm = table.c[self.sync.watermark]
        if _watermark_kind(wm, self.dialect) == "unsupported":
            problems.append(
                SchemaProblem(
                    "error",
                    f"watermark column {wm.name!r} is {wm.type}; use a timestamp, date or integer column",
                )
            )
        if wm.nullable:
            problems.append(
                SchemaProblem(
                    "warning",
                    f"watermark column {wm.name!r} is nullable: rows with NULL are never read "
                    "(only reconcile sees them); make it NOT NULL",
                )
            )
        inspector = sa.inspect(self.source.engine)
        schema = table.schema
        indexes = inspector.get_indexes(table.name, schema=schema)
        pk = tuple(inspector.get_pk_constraint(table.name, schema=schema).get("constrained_columns") or ())
        if not self.feed and (self.sync.key,) not in self._unique_sets():
            problems.append(
                SchemaProblem(
                    "error",
                    f"key column {self.sync.key!r} is not unique (no primary key or unique index on it alone)",
                )
            )
        ordered = [tuple(ix["column_names"][:2]) for ix in indexes] + [pk[:2]]
        if (self.sync.watermark, self.sync.key) not in ordered:
            quoted = self.source.engine.dialect.identifier_preparer
            problems.append(
                SchemaProblem(
                    "warning",
                    f"no index on ({self.sync.watermark}, {self.sync.key}): every cycle scans the table; "
                    f"fix: CREATE INDEX {quoted.quote('ix_' + table.name + '_' + self.sync.watermark + '_' + self.sync.key)} "
                    f"ON {quoted.format_table(table)} ({quoted.quote(self.sync.watermark)}, {quoted.quote(self.sync.key)})",
                )
            )
        return problems

    @functools.cached_property  # these are asked per row: work them out once
    def dialect(self) -> str:
        return self.source.engine.dialect.name

    # -- expressions

    def _fingerprint(self) -> list[sa.ColumnElement[Any]]:
        """The server-side fingerprint column, if any; it follows the columns (`source_hash_index`)."""
        expr = self._source_hash_expr()
        return [] if expr is None else [expr]

    def _columns(self) -> list[sa.ColumnElement[Any]]:
        if self._provisional:  # a SQLite query model that was empty: look at its values again
            self._table = None
            self.__dict__.pop("watermark_index", None)  # it follows the watermark's type
        table = self.table
        missing = [name for name in self.sync.columns if name not in table.c]
        if missing:
            raise SourceError(
                f"column(s) {', '.join(map(repr, missing))} not found in {self.sync.model_name} (sync {self.sync.name})"
            )
        return [table.c[name] for name in self.sync.columns]

    def _filter(self) -> sa.ColumnElement[bool]:
        """The operator's filter, parenthesised so that it combines with our conditions as one."""
        assert self.sync.filter is not None
        return _sql(f"({self.sync.filter})")  # type: ignore[return-value]

    def _model_rows(self, membership: bool) -> tuple[list[sa.ColumnElement[Any]], sa.ColumnElement[bool] | None]:
        """What a read adds for the filter: its verdict as the last column, or a condition."""
        if self.sync.filter is None:
            return [], None
        if membership:
            verdict = sa.case((self._filter(), sa.literal_column("1")), else_=sa.literal_column("0"))
            return [verdict.label("__in")], None
        return [], self._filter()

    def has_membership(self) -> bool:
        """Whether rows read with `membership=True` end with the filter's verdict."""
        return self.sync.filter is not None

    def split(self, rows: Sequence[Sequence[Any]]) -> tuple[Sequence[Sequence[Any]], list[str]]:
        """Rows read with `membership=True` → (the model's rows, keys of rows that fail the filter)."""
        if self.sync.filter is None:
            return rows, []
        outside = [key_text(row[0]) for row in rows if not row[-1]]
        if not outside:
            return rows, []
        return [row for row in rows if row[-1]], outside

    def typed_keys(self, keys: Sequence[str]) -> list[Any]:
        """Stored (text) keys as values of the key column; a key the column cannot hold is left out."""
        key = self.table.c[self.sync.key]
        try:
            convert = key.type.python_type
        except NotImplementedError:
            convert = str
        typed = []
        for k in keys:
            try:
                typed.append(convert(k))
            except (TypeError, ValueError):
                continue  # a stored key the column cannot hold is not in the model
        return typed

    def _watermark_expr(self) -> sa.ColumnElement[Any]:
        column: sa.Column[Any] = self.table.c[self.sync.watermark]
        if self.dialect == "sqlite" and _watermark_kind(column, "sqlite") == "time":
            # SQLite stores times as text in whatever format the writer used; compare one
            # canonical form on both sides so '10:00:00' and '10:00:00.000000' agree.
            canonical: sa.ColumnElement[Any] = sa.func.strftime("%Y-%m-%d %H:%M:%f", column, type_=sa.String)
            return canonical
        return column

    def _after(self, cursor: Cursor | None) -> sa.ColumnElement[bool] | None:
        if cursor is None:
            return None
        wm, key = self._watermark_expr(), self.table.c[self.sync.key]
        if cursor.key is None:  # set by `reset --to`: everything at or after the watermark
            return wm >= sa.literal(cursor.watermark, wm.type)
        return self._keyset(sa.literal(cursor.watermark, wm.type), sa.literal(cursor.key, key.type))

    def _keyset(self, at: sa.ColumnElement[Any], key_at: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
        """`(wm, key) > (at, key_at)`, written so that each database's planner seeks the index."""
        wm, key = self._watermark_expr(), self.table.c[self.sync.key]
        if self.dialect in ("mysql", "mariadb"):
            # MySQL's optimiser does not turn row-value comparisons into index ranges reliably.
            return sa.and_(wm >= at, sa.or_(wm > at, key > key_at))
        after = sa.tuple_(wm, key) > sa.tuple_(at, key_at)
        if self.dialect == "postgresql":
            # Implied by the row comparison, but the planner can only estimate and range-scan
            # on the watermark alone when the key comes from another table of a query (a feed's
            # `r.bean_id` with `ea.date_modified`): without it a quiet feed is planned as a full join.
            return sa.and_(wm >= at, after)
        return after

    # -- the bound

    def bound(self, conn: sa.Connection) -> Bound:
        """Where this cycle's read stops: the source's clock minus settle, in the column's frame.

        Two things hold it back further: on PostgreSQL the start of the oldest open
        transaction (a row whose transaction commits late carries that older time), and the
        current tick of the column's resolution (a whole-second column may still receive rows
        of this second, with keys below the cursor's).
        """
        column = self.table.c[self.sync.watermark]
        kind = _watermark_kind(column, self.dialect)
        if kind == "number":
            return Bound(None)
        if kind == "unsupported":
            raise SourceError(f"watermark column {column.name!r} is {column.type}; use a timestamp, date or integer column")
        now, oldest = self._clock(conn, column)
        settled = now - self.sync.settle
        value = oldest if oldest is not None and oldest < settled else settled
        tick = self._tick(conn, column)
        if tick >= timedelta(days=1):  # a DATE column: today's rows wait for tomorrow
            return Bound(self._spelled(value.date()))
        # `settled` tells `once` when a cycle has passed everything written before it began.
        return Bound(self._spelled(_floor(value, tick)), self._spelled(settled + tick))

    def _clock(self, conn: sa.Connection, column: sa.Column[Any]) -> tuple[datetime, datetime | None]:
        """The source's now and the start of its oldest open transaction, in `column`'s frame.

        Naive columns are read in the source's `timezone` frame (default UTC); "local" keeps
        the database session's own zone. Aware columns compare as instants.
        """
        zone = self._zone(column)
        oldest: datetime | None = None
        now: datetime
        if self.dialect == "postgresql":
            now, oldest, local_now, local_oldest = self._postgres_clock(conn)
            if zone == "session":
                return local_now, local_oldest
        elif zone == "session":
            if self.dialect in ("mysql", "mariadb"):  # the frame DATETIME and TIMESTAMP read in
                return _clock_value(conn, sa.text("SELECT NOW(6)")), None
            if self.dialect == "sqlite":  # SQLite's "local" is the process's zone
                return datetime.fromisoformat(_clock_value(conn, sa.text(_SQLITE_NOW.format(", 'localtime'")))), None
            return _clock_value(conn, sa.select(sa.func.current_timestamp())), None
        elif self.dialect in ("mysql", "mariadb"):
            now = _clock_value(conn, sa.text("SELECT UTC_TIMESTAMP(6)")).replace(tzinfo=UTC)
        elif self.dialect == "sqlite":
            now = datetime.fromisoformat(_clock_value(conn, sa.text(_SQLITE_NOW.format("")))).replace(tzinfo=UTC)
        else:
            now = _clock_value(conn, sa.select(sa.func.current_timestamp()))
            if now.tzinfo is None:
                raise SourceError(f"source {self.source.name!r}: cannot tell its clock's zone; set timezone = \"local\"")
        if zone == "instant":
            return now, oldest
        assert not isinstance(zone, str)  # "session" returned above
        return _naive_in(now, zone), None if oldest is None else _naive_in(oldest, zone)

    def _zone(self, column: sa.Column[Any]) -> tzinfo | str:
        """How the column's values relate to time: "instant" (tz-aware), "session" (the
        database session's zone, `timezone = "local"`), or the zone naive values are written in."""
        if self.dialect == "postgresql" and getattr(column.type, "timezone", False):
            return "instant"
        frame = self.source.config.frame
        if frame is None:
            return "session"
        if self.dialect in ("mysql", "mariadb") and isinstance(column.type, mysql.TIMESTAMP):
            return UTC  # stored as UTC, read in the session's zone, which our sessions set to UTC
        return frame

    def _postgres_clock(self, conn: sa.Connection) -> tuple[Any, Any, Any, Any]:
        """now() and the oldest open transaction's start, as instants and in the session's zone.

        One round trip: an idle cycle pays it and nothing else here.
        """
        if self.source.sees_activity is None:  # privileges do not change under a running daemon
            self.source.sees_activity = bool(conn.scalar(sa.text(_CAN_SEE_ACTIVITY)))
            if not self.source.sees_activity:
                self.source.warn_gate_once(
                    "this role cannot see other sessions in pg_stat_activity (grant pg_read_all_stats)"
                )
        if self.source.sees_activity:
            statement = sa.text(_CLOCK_WITH_GATE).bindparams(me=APPLICATION_NAME)
        else:
            statement = sa.text(_CLOCK_WITHOUT_GATE)
        now, oldest, local_now, local_oldest = conn.execute(statement).one()
        return now, oldest, local_now, local_oldest

    def _tick(self, conn: sa.Connection, column: sa.Column[Any]) -> timedelta:
        """The column's resolution: the bound never reaches into the current tick.

        Whole-second MySQL/MariaDB or PostgreSQL columns (and SQLite text written without
        fractions) would otherwise let a row of the current second land behind the cursor.
        """
        python_type = column.type.python_type
        if issubclass(python_type, date) and not issubclass(python_type, datetime):
            return timedelta(days=1)  # a DATE column
        if self.dialect in ("mysql", "mariadb"):
            digits = getattr(column.type, "fsp", None) or 0
        elif self.dialect == "postgresql":
            digits = getattr(column.type, "precision", None)
            digits = 6 if digits is None else digits
        elif self.dialect == "sqlite":
            digits = self._sqlite_digits(conn, column)
        else:
            digits = 6
        return timedelta(microseconds=10 ** (6 - min(digits, 6)))

    def _sqlite_digits(self, conn: sa.Connection, column: sa.Column[Any]) -> int:
        """SQLite keeps times as text in the writer's spelling: read the resolution off the newest value.

        Until a value with a fraction is seen, assume whole seconds (what SQLite's own
        CURRENT_TIMESTAMP and datetime('now') write).
        """
        if self._sqlite_fraction is None:
            newest = conn.scalar(sa.select(sa.type_coerce(column, sa.String)).order_by(column.desc()).limit(1))
            if newest is None:
                return 0
            self._sqlite_fraction = "." in str(newest)[10:]
        return 3 if self._sqlite_fraction else 0

    def time_problems(self) -> list[SchemaProblem]:
        """Watermark values the frame cannot place: text that is no time, or times in the future.

        Newest values ahead of the source's clock mean naive times written in another zone
        than `timezone` says: such rows would wait hours for the bound to reach them.
        """
        column = self.table.c.get(self.sync.watermark)
        if column is None or _watermark_kind(column, self.dialect) != "time":
            return []
        problems = []
        wm = self._watermark_expr()
        with self.source.engine.connect() as conn:
            if self.dialect == "sqlite":
                bad = conn.scalar(sa.select(column).where(column.is_not(None), wm.is_(None)).limit(1))
                if bad is not None:
                    problems.append(
                        SchemaProblem("error", f"watermark column {column.name!r} holds {bad!r}, which is not a time")
                    )
            newest = conn.scalar(sa.select(wm).order_by(wm.desc()).limit(1))
            now, _ = self._clock(conn, column)
        if isinstance(newest, str):
            newest = datetime.fromisoformat(newest)
        if isinstance(newest, datetime) and (newest.tzinfo is None) == (now.tzinfo is None):
            ahead = newest - now
            if ahead > FUTURE_TOLERANCE:
                frame = self.source.config.timezone
                problems.append(
                    SchemaProblem(
                        "warning",
                        f"the newest {column.name} is {ahead} ahead of the source's clock read in {frame!r}: "
                        f"if naive times are written in another zone, set [sources.{self.source.name}] timezone",
                    )
                )
        return problems

    def _spelled(self, value: datetime | date) -> Any:
        """A bound as the column compares: SQLite's canonical text, a date, or the datetime."""
        if self.dialect == "sqlite":
            if not isinstance(value, datetime):
                value = datetime.combine(value, datetime.min.time())
            return _sqlite_text(value)
        return value

    # -- reading

    @functools.cached_property
    def hash_columns(self) -> tuple[str, ...]:
        """The columns whose values decide the payload: the key and what the fields read."""
        used = [name for spec in self.sync.fields.values() for name in spec.columns]
        return tuple(dict.fromkeys([self.sync.key, *used]))

    def _source_hash_expr(self) -> sa.ColumnElement[Any] | None:
        """On PostgreSQL the server fingerprints each row; elsewhere Python does."""
        if self.dialect != "postgresql" or self.feed:
            return None
        quote = self.source.engine.dialect.identifier_preparer.quote
        columns = ", ".join(quote(name) for name in self.hash_columns)
        # hashtextextended (64 bits) costs half of md5 on the server; a collision would need
        # a change to land on the same 64-bit value for the same key.
        return sa.literal_column(f"hashtextextended(ROW({columns})::text, 0)", sa.BigInteger).label("__src")

    @functools.cached_property
    def source_hash_index(self) -> int | None:
        """Where a row holds its server-side fingerprint, or None (computed in Python)."""
        # Only PostgreSQL has one, and there no watermark column is appended before it.
        return len(self.sync.columns) if self.dialect == "postgresql" and not self.feed else None

    def source_hash(self, row: Sequence[Any]) -> bytes:
        """A fingerprint of the row's `hash_columns` (8 bytes from PostgreSQL, 16 from Python)."""
        index = self.source_hash_index
        if index is not None:
            return _server_hash(row[index])
        positions = self._hash_positions
        values = orjson.dumps([row[i] for i in positions], default=str)
        return hashlib.blake2b(values, digest_size=16).digest()

    @functools.cached_property
    def _hash_positions(self) -> tuple[int, ...]:
        return tuple(self.sync.columns.index(name) for name in self.hash_columns)

    def fingerprints(self, batch_rows: int, *, membership: bool = False) -> Iterator[list[tuple[Any, ...]]]:
        """`(key, fingerprint)` of every row in key order, computed by the server (PostgreSQL only).

        With `membership`, `(key, fingerprint, in_model)` of every row, the filter's verdict last.
        """
        expr = self._source_hash_expr()
        assert expr is not None
        key = self.table.c[self.sync.key]
        extra, condition = self._model_rows(membership)
        query = sa.select(key, expr, *extra).select_from(self.table).order_by(key)
        if condition is not None:
            query = query.where(condition)
        for rows in self._chunks(query, lambda last: None if last is None else key > last[0], batch_rows):
            if extra:
                yield [(row[0], _server_hash(row[1]), bool(row[2])) for row in rows]
            else:
                yield [(row[0], _server_hash(row[1])) for row in rows]

    @functools.cached_property
    def watermark_index(self) -> int:
        """Where a row from `changed_rows` holds its (comparable) watermark."""
        if self.dialect == "sqlite" and _watermark_kind(self.table.c[self.sync.watermark], "sqlite") == "time":
            return len(self.sync.columns)  # the canonical text form, appended after the columns
        return self.sync.columns.index(self.sync.watermark)

    def position(self, row: Sequence[Any]) -> Cursor:
        """The cursor just after `row` (a row from `changed_rows`)."""
        return Cursor(row[self.watermark_index], row[0])

    def changed_rows(
        self,
        cursor: Cursor | None,
        batch_rows: int,
        on_bound: Callable[[Bound], None] = lambda bound: None,
        *,
        bound: Bound | None = None,
        membership: bool = False,
    ) -> Generator[Sequence[Sequence[Any]]]:
        """Batches of rows after `cursor` and below the source's bound, in (watermark, key) order.

        The bound is taken just before the first read (`take_bound`) and handed to
        `on_bound`; later chunks keep it. A cycle that continues elsewhere passes its
        `bound` on instead. A row holds `sync.columns` (the key first); on
        SQLite the canonical watermark text follows them; with `membership` the filter's
        verdict comes last (see `split`). Rows are the driver's, not copied: this is the hot path.
        """
        columns = self._columns()
        wm, key = self._watermark_expr(), self.table.c[self.sync.key]
        extra = [wm.label("__wm")] if self.watermark_index == len(self.sync.columns) else []
        verdict, condition = self._model_rows(membership)
        query = sa.select(*columns, *extra, *self._fingerprint(), *verdict).select_from(self.table).order_by(wm, key)
        if condition is not None:
            query = query.where(condition)
        bounded = _watermark_kind(self.table.c[self.sync.watermark], self.dialect) == "time"
        if bounded:
            query = query.where(wm < sa.bindparam("__bound", type_=wm.type))
        if bound is None:
            bound = self.take_bound()
            on_bound(bound)
        yield from self._chunks(
            query,
            lambda last: self._after(cursor if last is None else self.position(last)),
            batch_rows,
            params={"__bound": bound.value},
        )

    def last_position(self, bound: Bound) -> Cursor | None:
        """The cursor after the last row below `bound` (None: no rows), where a full read would end.

        A change feed that never ran starts here when the cycle reads the whole model
        anyway: one backward index step instead of re-reading every key it names.
        """
        wm, key = self._watermark_expr(), self.table.c[self.sync.key]
        query = sa.select(wm, key).select_from(self.table).order_by(wm.desc(), key.desc()).limit(1)
        query = query.where(wm.is_not(None), key.is_not(None))
        if self.sync.filter is not None:
            query = query.where(self._filter())
        if bound.value is not None:
            query = query.where(wm < sa.literal(bound.value, wm.type))
        try:
            with self.source.engine.connect() as conn:
                row = conn.execute(query).first()
        except sa.exc.DBAPIError as error:
            raise SourceError(describe_db_error(self.source, error)) from None
        return None if row is None else Cursor(row[0], row[1])

    def take_bound(self) -> Bound:
        """The bound, in a transaction of its own that ends before the read's begins.

        A PostgreSQL read (REPEATABLE READ) takes its snapshot at its first statement: a
        transaction committing between that snapshot and the look at pg_stat_activity would
        be in neither, and its row behind the cursor for good. Looked at first, every
        transaction is either still open then (and holds the bound back) or committed
        before the read's snapshot (and visible to it).
        """
        try:
            with self.source.engine.connect() as conn, conn.begin():
                return self.bound(conn)
        except sa.exc.DBAPIError as error:
            raise SourceError(describe_db_error(self.source, error)) from None

    def all_rows(self, batch_rows: int, *, membership: bool = False) -> Iterator[Sequence[Sequence[Any]]]:
        """Every row (`sync.columns`) in key order, for reconcile."""
        columns = self._columns()
        key = self.table.c[self.sync.key]
        verdict, condition = self._model_rows(membership)
        query = sa.select(*columns, *self._fingerprint(), *verdict).select_from(self.table).order_by(key)
        if condition is not None:
            query = query.where(condition)
        yield from self._chunks(query, lambda last: None if last is None else key > last[0], batch_rows)

    def rows_in_key_order(
        self, after: Any, batch_rows: int, bound: Bound, *, membership: bool = False, one_statement: bool = False
    ) -> Iterator[Sequence[Sequence[Any]]]:
        """A first backfill's rows (`sync.columns`): below `bound`, past key `after` (None: all), in key order.

        Batches hold `batch_rows` rows, more only when one key's rows would straddle two:
        a key's rows always come together, so a batch finds the model's duplicates itself.
        `one_statement` reads the rest as one query on PostgreSQL, in one snapshot held for
        the whole read: its planner then joins the model's tables once (hash joins, the
        session plans cursors for all their rows) instead of probing them per chunk (1M
        SuiteCRM contacts: 8 s of reading instead of 27 s).
        Elsewhere chunks cost no more (MySQL joins by probes either way) and a SQLite read
        holds off the CRM's writers for as long as it lasts.
        """
        one_statement = one_statement and self.dialect == "postgresql"
        columns = self._columns()
        wm, key = self._watermark_expr(), self.table.c[self.sync.key]
        verdict, condition = self._model_rows(membership)
        query = sa.select(*columns, *self._fingerprint(), *verdict).select_from(self.table).order_by(key)
        if condition is not None:
            query = query.where(condition)
        if _watermark_kind(self.table.c[self.sync.watermark], self.dialect) == "time":
            query = query.where(wm < sa.bindparam("__bound", type_=wm.type))
        params = {"__bound": bound.value}
        buffer: list[Sequence[Any]] = []  # read, not handed out yet
        while True:
            start = after
            statement = query if after is None else query.where(key > sa.bindparam("__after", after, type_=key.type))
            if not one_statement:
                statement = statement.limit(CHUNK_ROWS)
            count = 0
            try:
                with self.source.engine.connect() as conn:
                    conn = conn.execution_options(stream_results=True, yield_per=max(batch_rows, FETCH_ROWS))
                    with conn.begin():
                        for rows in conn.execute(statement, params).partitions(batch_rows):
                            count += len(rows)
                            buffer.extend(rows)
                            while (cut := _key_cut(buffer, batch_rows, end=False)) is not None:
                                batch, buffer = buffer[:cut], buffer[cut:]
                                after = batch[-1][0]
                                yield batch
            except sa.exc.DBAPIError as error:
                raise SourceError(describe_db_error(self.source, error)) from None
            if one_statement or count < CHUNK_ROWS:
                break
            # A full chunk may end inside its last key's rows: the next one reads them again.
            newest = len(buffer)
            while newest > 0 and buffer[newest - 1][0] == buffer[-1][0]:
                newest -= 1
            if newest > 0:
                after, buffer = buffer[newest - 1][0], buffer[:newest]
            elif start != after:  # the buffer is one key's rows: read them all again
                buffer = []
            else:  # a chunk of one key's rows, more than a chunk holds: take them as they are
                after = buffer[-1][0]
        while (cut := _key_cut(buffer, batch_rows, end=True)) is not None:
            batch, buffer = buffer[:cut], buffer[cut:]
            yield batch

    def keys_after(self, cursor: Cursor | None, batch_rows: int = 5000) -> Iterator[list[Any]]:
        """Keys of the rows past `cursor` (what a `reset --to` will re-read), in batches."""
        wm, key = self._watermark_expr(), self.table.c[self.sync.key]
        query = sa.select(key, wm.label("__wm")).select_from(self.table).order_by(wm, key)
        for rows in self._chunks(
            query, lambda last: self._after(cursor if last is None else Cursor(last[1], last[0])), batch_rows
        ):
            yield [row[0] for row in rows]

    def rows_by_keys(self, keys: list[str], *, membership: bool = False) -> Iterator[list[Sequence[Any]]]:
        """The current rows (`sync.columns`) of the model for stored (text) keys, in batches of 500.

        Without `membership` only rows that pass the filter; with it, every row and the verdict last.
        """
        columns = self._columns()
        key = self.table.c[self.sync.key]
        verdict, condition = self._model_rows(membership)
        query = sa.select(*columns, *self._fingerprint(), *verdict).select_from(self.table).order_by(key)
        if condition is not None:
            query = query.where(condition)
        yield from self._by_keys(query, key, keys)

    def existing_keys(self, keys: Sequence[str]) -> set[str]:
        """Which of these stored keys the model (filter or not) still has."""
        key = self.table.c[self.sync.key]
        query = sa.select(key).select_from(self.table)
        return {key_text(row[0]) for rows in self._by_keys(query, key, keys) for row in rows}

    def duplicate_keys(self, keys: Sequence[str] | None = None) -> dict[str, int]:
        """Keys among these (None: all of the model's) that more than one row holds, with their row counts.

        Asked only of views and queries: a table's unique key cannot repeat. The whole
        model in one aggregate costs about what lookups of a few thousand keys do (the
        server hashes the joins once instead of probing them per key): a full pass asks that.
        """
        key = self.table.c[self.sync.key]
        query = sa.select(key, sa.func.count()).select_from(self.table).group_by(key).having(sa.func.count() > 1)
        if keys is not None:
            return {key_text(row[0]): row[1] for rows in self._by_keys(query, key, keys) for row in rows}
        try:
            with self.source.engine.connect() as conn:
                return {key_text(row[0]): row[1] for row in conn.execute(query)}
        except sa.exc.DBAPIError as error:
            raise SourceError(describe_db_error(self.source, error)) from None

    def _by_keys(self, query: sa.Select[Any], key: Any, keys: Sequence[str]) -> Iterator[list[Sequence[Any]]]:
        rows: list[Sequence[Any]]
        typed = self.typed_keys(keys)
        for start in range(0, len(typed), KEY_ROWS):
            try:
                with self.source.engine.connect() as conn:
                    rows = list(conn.execute(query.where(key.in_(typed[start : start + KEY_ROWS]))))
            except sa.exc.DBAPIError as error:
                raise SourceError(describe_db_error(self.source, error)) from None
            if rows:
                yield rows

    def _chunks(
        self,
        query: sa.Select[Any],
        after: Callable[[Sequence[Any] | None], sa.ColumnElement[bool] | None],
        batch_rows: int,
        *,
        params: dict[str, Any] | None = None,
    ) -> Iterator[Sequence[Sequence[Any]]]:
        """Run `query` chunk by chunk, each a short transaction that continues after the last row."""
        last: Sequence[Any] | None = None
        while True:
            condition = after(last)
            chunk = (query.where(condition) if condition is not None else query).limit(CHUNK_ROWS)
            count = 0
            try:
                with self.source.engine.connect() as conn:
                    # Fetch in larger round trips than the batches we hand out: fewer waits on the server.
                    conn = conn.execution_options(stream_results=True, yield_per=max(batch_rows, FETCH_ROWS))
                    with conn.begin():
                        for rows in conn.execute(chunk, params or {}).partitions(batch_rows):
                            count += len(rows)
                            last = rows[-1]
                            yield rows
            except sa.exc.DBAPIError as error:
                raise SourceError(describe_db_error(self.source, error)) from None
            if count < CHUNK_ROWS:
                return

    def any_after(self, cursor: Cursor | None) -> bool:
        """Whether any row lies past `cursor`: a quiet sync's whole cycle, so it is kept
        cheap. One index seek, on a statement built once with bound parameters (building
        and keying a SQLAlchemy statement costs more than the query), outside a transaction."""
        if cursor is None or cursor.key is None or (self.feed and self.sync.filter is not None):
            return self.backlog(cursor, limit=1) > 0
        table = self.table
        if self._any_after is None or self._any_after[0] is not table:  # built for a table re-probed since
            wm, key = self._watermark_expr(), table.c[self.sync.key]
            condition = self._keyset(sa.bindparam("wm", type_=wm.type), sa.bindparam("key", type_=key.type))
            self._any_after = (table, sa.select(sa.literal(1)).select_from(table).where(condition).limit(1))
        try:
            with self.source.engine.connect() as conn:
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                found = conn.execute(self._any_after[1], {"wm": cursor.watermark, "key": cursor.key}).first()
        except sa.exc.DBAPIError as error:
            raise SourceError(describe_db_error(self.source, error)) from None
        return found is not None

    def backlog(self, cursor: Cursor | None, limit: int = 10_000_000) -> int:
        """Rows past the watermark, counted through the index and capped, so it stays cheap."""
        condition = self._after(cursor)
        if self.feed and self.sync.filter is not None:
            condition = self._filter() if condition is None else sa.and_(condition, self._filter())
        inner = sa.select(sa.literal(1)).select_from(self.table)
        if condition is not None:
            inner = inner.where(condition)
        try:
            with self.source.engine.connect() as conn:
                return conn.scalar(sa.select(sa.func.count()).select_from(inner.limit(limit).subquery())) or 0
        except sa.exc.DBAPIError as error:
            raise SourceError(describe_db_error(self.source, error)) from None


_CAN_SEE_ACTIVITY = (
    "SELECT rolsuper OR pg_has_role(current_user, 'pg_read_all_stats', 'MEMBER') "
    "FROM pg_roles WHERE rolname = current_user"
)
# Other sessions' open transactions, not our own (application_name 'syncd'): a write
# committing late carries a timestamp from its transaction's start.
_CLOCK_WITH_GATE = (
    "WITH oldest AS (SELECT min(xact_start) AS t FROM pg_stat_activity "
    "WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid() AND backend_type = 'client backend' "
    "AND datname = current_database() AND coalesce(application_name, '') <> :me) "
    "SELECT now(), t, localtimestamp, t::timestamp FROM oldest"
)
_CLOCK_WITHOUT_GATE = "SELECT now(), NULL::timestamptz, localtimestamp, NULL::timestamp"
_SQLITE_NOW = "SELECT strftime('%Y-%m-%d %H:%M:%f', 'now'{})"


def prefetched(items: Iterator[_T], depth: int = 2) -> Iterator[_T]:
    """`items`, produced on a thread of their own up to `depth` ahead of the consumer.

    Reading from the source mostly waits on the server, with the GIL released; this lets
    that wait overlap the consumer's work. Errors reach the consumer in order, and a
    consumer that stops early stops the producer too.
    """
    slots: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put(("end", None))
        except BaseException as error:  # handed to the consumer
            slots.put(("error", error))

    thread = threading.Thread(target=contextvars.copy_context().run, args=(produce,), name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()
        close = getattr(items, "close", None)
        if close is not None:
            close()


def _key_cut(rows: list[Sequence[Any]], size: int, *, end: bool) -> int | None:
    """Where the first batch of `rows` (in key order) ends: after `size` rows and the rest
    of its last key's; None while that key may go on in rows not read yet (unless `end`)."""
    if not rows or (len(rows) <= size and not end):
        return None
    cut = min(size, len(rows))
    while cut < len(rows) and rows[cut][0] == rows[cut - 1][0]:
        cut += 1
    return None if cut == len(rows) and not end else cut


def shift_bound(value: Any, delta: timedelta) -> Any:
    """A bound or watermark (a datetime, a date, or SQLite's text) moved by `delta`, spelled alike."""
    if isinstance(value, str):  # SQLite's canonical text form
        return _sqlite_text(datetime.fromisoformat(value) + delta)
    return value + delta


def bound_before(value: Any, target: Any) -> bool:
    """Whether a bound is short of `target`; None (a numeric watermark: no bound) never is."""
    return value is not None and value < target


def _sqlite_text(value: datetime) -> str:
    """SQLite's canonical text of a time, which its TEXT columns compare as (milliseconds)."""
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _clock_value(conn: sa.Connection, statement: sa.Executable) -> Any:
    """A clock query's one value (a datetime, or SQLite's text), never NULL."""
    return conn.scalar(statement)


def _naive_in(instant: datetime, zone: tzinfo) -> datetime:
    return instant.astimezone(zone).replace(tzinfo=None)


def _floor(value: datetime, tick: timedelta) -> datetime:
    """`value` rounded down to a multiple of `tick` (a divisor of one second)."""
    micros = tick // timedelta(microseconds=1)
    return value - timedelta(microseconds=value.microsecond % micros) if micros > 1 else value


def _server_hash(value: int) -> bytes:
    return value.to_bytes(8, "big", signed=True)


def describe_db_error(source: Source, error: sa.exc.DBAPIError) -> str:
    """A one-line reason without the statement, parameters or URL (which may hold secrets)."""
    return f"source {source.name!r} ({source.config.display_url()}): {db_error_line(error)}"


def _watermark_kind(column: sa.Column[Any], dialect: str) -> str:
    try:
        python_type = column.type.python_type
    except NotImplementedError:
        return "unsupported"
    if issubclass(python_type, (datetime, date)):
        return "time"
    if issubclass(python_type, (int,)) or python_type.__name__ == "Decimal":
        return "number"
    if dialect == "sqlite" and issubclass(python_type, str):
        return "time"  # SQLite keeps times as text: compared in their canonical form
    return "unsupported"


def _create_engine(config: SourceConfig, name: str) -> sa.Engine:
    url = config.engine_url(f"sources.{name}.password_file")
    connect_args: dict[str, Any] = {}
    backend = url.get_backend_name()
    if backend == "postgresql":
        connect_args["application_name"] = APPLICATION_NAME
    kwargs: dict[str, Any] = {"pool_pre_ping": True, "connect_args": connect_args}
    if backend in ("postgresql", "mysql", "mariadb"):
        # Repeatable read: a chunk's rows all come from one snapshot.
        kwargs["isolation_level"] = "REPEATABLE READ"
    engine = sa.create_engine(url, **kwargs)
    if backend in ("mysql", "mariadb") and config.frame is not None:

        @sa.event.listens_for(engine, "connect")
        def _utc_session(dbapi_connection: Any, _record: Any) -> None:
            # TIMESTAMP columns then read as UTC, and NOW() in a filter means the same everywhere.
            cursor = dbapi_connection.cursor()
            cursor.execute("SET time_zone = '+00:00'")
            cursor.close()

    statement = _READ_ONLY.get(backend)
    if statement is not None:

        @sa.event.listens_for(engine, "connect")
        def _read_only(dbapi_connection: Any, _record: Any) -> None:
            # syncd never writes to a CRM: the operator's `query` and `filter` run in
            # sessions that the database itself keeps from writing.
            cursor = dbapi_connection.cursor()
            cursor.execute(statement)
            if backend == "postgresql":
                # Server-side cursors are planned for their first 10% of rows by default,
                # which picks per-row index probes through a model's joins; a chunk is always
                # read to its end, so plan for all of it (half the time of a join model's read).
                cursor.execute("SET cursor_tuple_fraction = 1")
            cursor.close()
            if backend != "sqlite":
                dbapi_connection.commit()

    return engine


_READ_ONLY = {
    "postgresql": "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "mysql": "SET SESSION TRANSACTION READ ONLY",
    "mariadb": "SET SESSION TRANSACTION READ ONLY",
    "sqlite": "PRAGMA query_only = ON",
}


def _sql(text: str) -> sa.TextClause:
    """The operator's SQL as it was written: colons are not bind parameters."""
    return sa.text(text.replace(":", "\\:"))


# DB-API type codes of MySQL/MariaDB result columns (the protocol's, shared by every driver).
_MYSQL_TIME = {7: mysql.TIMESTAMP, 12: mysql.DATETIME}  # with their fractional digits (the column's scale)
_MYSQL_NUMBER = {1, 2, 3, 8, 9, 13}  # TINY, SHORT, LONG, LONGLONG, INT24, YEAR
_MYSQL_DECIMAL = {0, 246}  # DECIMAL, NEWDECIMAL


def _driver_types(conn: sa.Connection, dialect: str, description: list[Any]) -> list[sa.types.TypeEngine[Any]]:
    """SQLAlchemy types for a result's columns, from the driver's type codes (DB-API description)."""
    codes = [column[1] for column in description]
    if dialect == "postgresql":  # type codes are pg_type OIDs
        names: dict[int, str] = dict(
            conn.execute(
                sa.text("SELECT oid::int, format_type(oid, NULL) FROM pg_type WHERE oid = ANY(:oids)"),
                {"oids": [int(code) for code in codes]},
            ).all()
        )
        return [_postgres_type(names.get(int(code), "")) for code in codes]
    if dialect in ("mysql", "mariadb"):
        return [
            _MYSQL_TIME[code](fsp=column[5] or 0) if code in _MYSQL_TIME
            else sa.Date() if code == 10
            else sa.BigInteger() if code in _MYSQL_NUMBER
            else sa.Numeric() if code in _MYSQL_DECIMAL
            else sa.String()
            for code, column in zip(codes, description, strict=True)
        ]
    return [sa.String() for _ in codes]


def _postgres_type(name: str) -> sa.types.TypeEngine[Any]:
    if name.startswith("timestamp"):
        return sa.DateTime(timezone="with time zone" in name)
    if name == "date":
        return sa.Date()
    if name in ("smallint", "integer", "bigint"):
        return sa.BigInteger()
    if name == "numeric":
        return sa.Numeric()
    if name == "uuid":  # stored keys come back as text: compare them as uuids, not as varchar
        return sa.Uuid()
    return sa.String()


def _sqlite_type(name: str, row: Sequence[Any] | None, names: list[str], watermark: str) -> sa.types.TypeEngine[Any]:
    """SQLite columns have no type: take it from the first row's value (text watermarks are times)."""
    value = None if row is None else row[names.index(name)]
    if isinstance(value, int):
        return sa.BigInteger()
    if isinstance(value, float):
        return sa.Float()
    if name == watermark and (value is None or isinstance(value, str)):
        return sa.DateTime()
    return sa.String()


def parse_watermark(reader: TableReader, text: str) -> Cursor:
    """`reset --to VALUE`: VALUE in the watermark column's terms, as an inclusive cursor."""
    column = reader.table.c[reader.sync.watermark]
    kind = _watermark_kind(column, reader.dialect)
    if kind == "number":
        return Cursor(int(text), None)
    if kind != "time":
        raise SourceError(f"watermark column {column.name!r} is {column.type}; cannot reset it to {text!r}")
    value = datetime.fromisoformat(text)
    zone = reader._zone(column)
    if zone == "instant":
        if value.tzinfo is None:
            raise ValueError("the watermark column has a time zone: give one, e.g. 2026-01-01T00:00:00+00:00")
    elif value.tzinfo is not None:  # an instant, told in the frame the column is written in
        value = value.replace(tzinfo=None) if zone == "session" else _naive_in(value, zone)  # type: ignore[arg-type]
    if reader.dialect == "sqlite":
        return Cursor(_sqlite_text(value), None)
    return Cursor(value, None)
