"""One sync cycle: read → map → drop unchanged → batch → push → commit; the policy.

This module decides what a cycle reads, what it sends, what each answer commits and
what it means for the sync (DESIGN.md §2, §3, §5, §6); `pipeline.py` moves the batches
(in flight, answered in read order, committed on a thread) and `delivery.py` turns HTTP
answers into outcomes. Its collaborators are the protocols below (`ModelReader`,
`CycleState`, `PushClient`), so every rule can be tested over in-memory fakes.
- a batch's watermark, digests and push rows are one `BatchOutcome`, committed after the
  API acknowledged it; the watermark moves to the last batch before the first failure
  (a first backfill reads in key order and moves it once, after its last batch);
- a row whose mapped payload equals the last acknowledged one is not sent;
- within one cycle a key appears once, and cycles of one sync never overlap, so two
  versions of one key are never in flight together;
- a row that fails local validation, or that the API rejects on its own, becomes a dead
  letter and the feed moves on; a key whose current payload lands resolves its dead letter;
- a refused key (`AuthError`) pauses pushing until the token file changes or a backoff
  runs out; a configuration error (405) stops the sync until a reload;
- a key the model holds twice is a dead letter, and neither row is sent;
- a key that was acknowledged and has left the model (its row fails the filter, or is
  gone) is recorded as removed, and its `[syncs.removed]` record pushed if there is one;
- change feeds come after the model's own changes: the keys they name are re-read from
  the model and handled like changed rows, one feed batch at a time, and a feed's cursor
  commits with the batches that carried its keys.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol, cast

import orjson
import sqlalchemy as sa
import structlog

from syncd.config import ApiConfig, ChangeFeed, SyncConfig
from syncd.delivery import AuthError, ConfigurationError, Deliverer, DeliveryResult, PushClient
from syncd.errors import LeaseHeldError, LeaseLost, StateError
from syncd.mapping import MappedRows, Mapping, compile_mapping, digest_target, map_rows
from syncd.metrics import Metrics
from syncd.offload import Offload
from syncd.pipeline import Answer, BatchOutcome, CycleLease, Pipeline, handing_over
from syncd.seen import SeenKeys
from syncd.source import Bound, SchemaProblem, SourceError, bound_before, prefetched, shift_bound
from syncd.values import (
    Cursor,
    CycleKind,
    CycleOutcome,
    DeadLetter,
    PushRecord,
    SyncState,
    SyncStatus,
    display_value,
    key_text,
)

__all__ = ["CycleReport", "SyncRunner"]

log = structlog.get_logger(__name__)

AUTH_BACKOFF_START = timedelta(seconds=5)
AUTH_BACKOFF_MAX = timedelta(minutes=5)
FINGERPRINT_ROWS = 5_000  # keys compared per state lookup in a reconcile
OFFLOAD_AHEAD = 8  # batches a child process may map ahead of the sync thread
FEED_ROWS = 5_000  # change-feed rows read at a time; their model rows go out without a barrier between
QUIET_FULL_CYCLE_S = 300.0  # a quiet sync's full cycle (status row, dead-letter gauge) at least this often
_UNREAD = object()
NAMED_IN_LOG = 20  # trans_ids and dead-lettered keys the cycle line names; the rest are in the state db


# -- what the cycle needs of its collaborators: source.TableReader, state.StateStore (and
# delivery.PushClient, what Deliverer needs of delivery.ApiClient)


class FeedReader(Protocol):
    """A change feed's table (`source.TableReader` with `feed=True`)."""

    def take_bound(self) -> Bound: ...
    def last_position(self, bound: Bound) -> Cursor | None: ...
    def position(self, row: Sequence[Any]) -> Cursor: ...
    def changed_rows(self, cursor: Cursor | None, batch_rows: int) -> Iterator[Sequence[Sequence[Any]]]: ...


class ModelReader(Protocol):
    """The model a sync reads (`source.TableReader`): rows hold `sync.columns`, the key first."""

    source: Any  # source.Source: `can_offload`, `name` and `config` start a child process

    @property
    def key_is_unique(self) -> bool: ...
    @property
    def feeds(self) -> Sequence[tuple[ChangeFeed, FeedReader]]: ...
    @property
    def hash_columns(self) -> tuple[str, ...]: ...
    @property
    def source_hash_index(self) -> int | None: ...

    def problems(self, *, probe_data: bool = True) -> Sequence[SchemaProblem]: ...
    def take_bound(self) -> Bound: ...
    def last_position(self, bound: Bound) -> Cursor | None: ...
    def has_membership(self) -> bool: ...
    def split(self, rows: Sequence[Sequence[Any]]) -> tuple[Sequence[Sequence[Any]], list[str]]: ...
    def source_hash(self, row: Sequence[Any]) -> bytes: ...
    def position(self, row: Sequence[Any]) -> Cursor: ...
    def changed_rows(
        self, cursor: Cursor | None, batch_rows: int, on_bound: Callable[[Bound], None], *, membership: bool = False
    ) -> Iterator[Sequence[Sequence[Any]]]: ...
    def all_rows(self, batch_rows: int, *, membership: bool = False) -> Iterator[Sequence[Sequence[Any]]]: ...
    def rows_in_key_order(
        self, after: Any, batch_rows: int, bound: Bound, *, membership: bool = False
    ) -> Iterator[Sequence[Sequence[Any]]]: ...
    def fingerprints(self, batch_rows: int, *, membership: bool = False) -> Iterator[list[tuple[Any, ...]]]: ...
    def rows_by_keys(self, keys: list[str], *, membership: bool = False) -> Iterator[list[Sequence[Any]]]: ...
    def existing_keys(self, keys: Sequence[str]) -> set[str]: ...
    def duplicate_keys(self, keys: Sequence[str] | None = None) -> dict[str, int]: ...
    def backlog(self, cursor: Cursor | None, limit: int = 10_000_000) -> int: ...
    def any_after(self, cursor: Cursor | None) -> bool: ...


class CycleState(Protocol):
    """What the cycle reads and writes in the state database (`state.StateStore`)."""

    def acquire_lease(self, sync: str, ttl: timedelta) -> CycleLease: ...  # or raises LeaseHeldError
    def lease_holder(self, sync: str) -> tuple[str | None, datetime | None]: ...
    def cursor(self, sync: str) -> Cursor | None: ...
    def feed_cursor(self, sync: str, feed: str) -> Cursor | None: ...
    def has_digests(self, sync: str) -> bool: ...
    def digest_count(self, sync: str) -> int: ...
    def known_digests(self, sync: str, keys: Sequence[str]) -> dict[str, bytes]: ...
    def known_source_hashes(self, sync: str, keys: Sequence[str]) -> dict[str, bytes]: ...
    def digest_keys(self, sync: str, batch: int = 5000) -> Iterator[list[str]]: ...
    def sent_attributes(self, sync: str, keys: Sequence[str]) -> dict[str, dict[str, Any]]: ...
    def mapping_hash(self, sync: str) -> str | None: ...
    def set_mapping_hash(self, sync: str, value: str) -> None: ...
    def open_dead_letter_count(self, sync: str) -> int: ...
    def removal_count(self, sync: str) -> int: ...
    def commit_batch(  # BatchOutcome's fields
        self,
        sync: str,
        *,
        cursor: Cursor | None,
        acked: Sequence[tuple[str, bytes, bytes]] = (),
        refreshed: Sequence[tuple[str, bytes]] = (),
        pushes: Sequence[PushRecord] = (),
        dead_letters: Sequence[DeadLetter] = (),
        resolve_keys: Sequence[str] = (),
        lease: Any = None,
        progress: tuple[int, int] | None = None,
        feed_cursors: Sequence[tuple[str, Cursor]] = (),
        removed: Sequence[tuple[str, str]] = (),
        returned: Sequence[str] = (),
        sent: Sequence[tuple[str, str]] = (),
    ) -> None: ...
    def set_state(
        self, sync: str, state: SyncState, *, error: str | None = None, ran: bool = True, backlog: int | None = None
    ) -> None: ...
    def sync_status(self, sync: str) -> SyncStatus | None: ...


@dataclass(slots=True)
class CycleReport:
    """What one cycle did; logged as one summary event and returned to the caller."""

    sync: str
    kind: CycleKind = CycleKind.SYNC
    outcome: CycleOutcome = CycleOutcome.OK
    rows_read: int = 0
    unchanged: int = 0
    sent: int = 0
    batches: int = 0
    dead_lettered: int = 0
    duration_s: float = 0.0
    watermark: Any = None
    bound: Any = None
    settled: Any = None  # the source's now minus settle, even when an open transaction holds `bound` back
    backlog: int | None = None
    removed: int = 0  # keys that left the model in this cycle
    error: str | None = None
    last_trans_id: str | None = None  # of the newest ACK (every one is in the state database)
    offloaded_after: int | None = None  # rows read in-process before a child process took over
    trans_ids: list[str] = field(default_factory=list)  # of this cycle's pushes, the first NAMED_IN_LOG
    dead_letters: list[dict[str, str]] = field(default_factory=list)  # {key, reason}, the first NAMED_IN_LOG

    def note(self, pushes: Sequence[PushRecord], dead: Sequence[DeadLetter]) -> None:
        """Remember what the cycle line names: trans_ids, dead-lettered keys and why."""
        room = NAMED_IN_LOG - len(self.trans_ids)
        self.trans_ids.extend([p.trans_id for p in pushes if p.trans_id][:room])
        room = NAMED_IN_LOG - len(self.dead_letters)
        self.dead_letters.extend({"key": d.key, "reason": d.reason} for d in dead[:room])

    @property
    def idle(self) -> bool:
        """Nothing read, sent or failed: a quiet table's cycle, logged at debug only."""
        return self.outcome in (CycleOutcome.OK, CycleOutcome.PAUSED, CycleOutcome.SKIPPED) and not (self.rows_read or self.sent or self.dead_lettered)

    def summary(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "outcome": self.outcome,
            "rows_read": self.rows_read,
            "unchanged": self.unchanged,
            "sent": self.sent,
            "batches": self.batches,
            "dead_lettered": self.dead_lettered,
            **({"removed": self.removed} if self.removed else {}),
            "duration_s": round(self.duration_s, 3),
            "watermark": display_value(self.watermark),
            "backlog": self.backlog,
            **({"trans_ids": self.trans_ids} if self.trans_ids else {}),
            **({"dead_letters": self.dead_letters} if self.dead_letters else {}),
            **({"offloaded_after": self.offloaded_after} if self.offloaded_after is not None else {}),
            **({"error": self.error} if self.error else {}),
        }


@dataclass(slots=True)
class _Batch:
    """A read batch after mapping: what to send, and what to commit once it is answered."""

    cursor: Cursor | None
    keys: list[str] = field(default_factory=list)  # parallel to encoded
    digests: list[bytes] = field(default_factory=list)
    encoded: list[bytes] = field(default_factory=list)  # the records to send, as they go on the wire
    sources: list[bytes] = field(default_factory=list)  # source fingerprints, parallel to encoded
    unchanged_keys: list[str] = field(default_factory=list)
    refreshed: list[tuple[str, bytes]] = field(default_factory=list)  # unchanged payload, new fingerprint
    dead_letters: list[DeadLetter] = field(default_factory=list)
    rows: int = 0
    removing: dict[str, str] = field(default_factory=dict)  # keys in `keys` whose record is a removal → why
    gone: list[tuple[str, str]] = field(default_factory=list)  # removals recorded without a push
    sent: dict[str, str] = field(default_factory=dict)  # key → attributes kept for `[syncs.removed]` (JSON)
    feed: tuple[str, Cursor] | None = None  # a change feed's position, committed with this batch
    barrier: bool = False  # answer and commit everything before reading on


class SyncRunner:
    """Everything one sync needs, built once per config and reused by every cycle."""

    def __init__(
        self,
        sync: SyncConfig,
        *,
        reader: ModelReader,
        state: CycleState,
        client: PushClient,
        api: ApiConfig,
        metrics: Metrics,
        lease: timedelta,
        should_stop: Callable[[], bool] = lambda: False,
        on_progress: Callable[[CycleReport], None] | None = None,
    ) -> None:
        self.sync = sync
        self.reader = reader
        self.state = state
        self.client = client
        self.api = api
        self.metrics = metrics
        self.lease = lease
        self.should_stop = should_stop
        self.on_progress = on_progress
        self.mapping: Mapping = compile_mapping(sync.fields, sync.columns)
        self.mapping_hash = _mapping_hash(sync, reader)
        # Digests are keyed by where records go: a new datastore or feed gets everything again.
        self._target = digest_target(sync.datastore_id, sync.feed_id)
        self._pass_complete = False
        self.stopped: str | None = None  # set by a configuration error; cleared by a reload
        self._schema_checked = False
        self._compare = True  # whether this cycle looks up digests (False on a first backfill)
        self._auth_retry_at = 0.0
        self._auth_backoff = AUTH_BACKOFF_START
        self._has_removals = False  # whether acknowledged keys may end a recorded removal
        self._duplicates_possible: bool | None = None  # None: not known yet (then they are looked for)
        self._duplicates: dict[str, int] | None = None  # the model's, during a full pass; else asked per batch
        # A pass over unchanged rows commits only to renew its lease, every quarter lease.
        self._pipeline: Pipeline[_Batch] = Pipeline(
            sync.name, max_in_flight=api.max_in_flight, commit=self._commit, renew_every=lease.total_seconds() / 4
        )
        self._lease: CycleLease | None = None  # the last cycle's; a quiet cycle runs while it is held long enough
        self._quiet = False  # whether the last cycle was an ok one with nothing to read
        self._full_cycle_at = 0.0  # time.monotonic() of the last full cycle
        self._quiet_cursor: object = _UNREAD  # the watermark quiet cycles look past, read once after a full cycle

    # -- entry points

    def run_cycle(self) -> CycleReport:
        """Push everything changed since the watermark, up to the source's bound."""
        return self._quiet_cycle() or self._run(CycleKind.SYNC, self._changes)

    def reconcile(self) -> CycleReport:
        """Compare every row with what was last acknowledged and push the differences."""
        report = self._run(CycleKind.RECONCILE, self._everything)
        if report.outcome == CycleOutcome.OK and self._pass_complete:
            # Every stored fingerprint now belongs to the current mapping.
            self.state.set_mapping_hash(self.sync.name, self.mapping_hash)
        return report

    def warm_up(self) -> None:
        """Connect, reflect the table and log its schema problems once, before the first cycle.

        Reflection takes a few catalog queries; paying them up front keeps every cycle,
        the first one included, down to the work of finding changes.
        """
        self._schema_checked = True
        with structlog.contextvars.bound_contextvars(sync=self.sync.name):
            # A missing index, a nullable watermark...; views and queries are checked by data
            # by `syncd check`, and at run time by the duplicate-key lookups.
            for problem in self.reader.problems(probe_data=False):
                getattr(log, problem.severity)("schema_problem", problem=problem.message)
            self._learn_key_uniqueness()

    def _learn_key_uniqueness(self) -> None:
        """Whether the database vouches for one row per key (a table's unique key), so no
        batch needs to ask the model for duplicates. Asked again while the source is down."""
        if self._duplicates_possible is None:
            try:
                self._duplicates_possible = not self.reader.key_is_unique
            except (SourceError, sa.exc.DBAPIError):
                pass

    def retry_keys(self, keys: list[str]) -> CycleReport:
        """Push the current rows of these keys (`dead-letters retry`); the watermark stays."""
        return self._run(CycleKind.RETRY, lambda report: self._keyed(keys))

    def run_until_caught_up(self, sleep: Callable[[float], None] = time.sleep) -> CycleReport:
        """Cycles until every change committed before this call has been handled (`once`).

        A cycle stops `settle` short of the source's clock, so one more cycle after
        `settle` has passed picks up what was written just before we started.
        """
        first = self.run_cycle()
        if first.outcome != CycleOutcome.OK or not isinstance(first.bound, (datetime, date, str)):
            return first
        # From the source's clock, not the bound: an open transaction may hold the bound back.
        target = shift_bound(first.settled if first.settled is not None else first.bound, self.sync.settle)
        report = first
        deadline = time.monotonic() + self.sync.settle.total_seconds() + 60
        while bound_before(report.bound, target) and time.monotonic() < deadline and not self.should_stop():
            sleep(min(max(self.sync.settle.total_seconds(), 0.05), 5))
            report = _merge(report, self.run_cycle())
            if report.outcome != CycleOutcome.OK:
                break
        if report.outcome == CycleOutcome.OK and bound_before(report.bound, target):
            log.warning(
                "not_caught_up",
                sync=self.sync.name,
                reason="an open transaction on the source holds the read bound back",
                bound=str(report.bound),
            )
        return report

    # -- the cycle

    def _quiet_cycle(self) -> CycleReport | None:
        """The cycle of a sync that stays quiet, or None when a full cycle is needed.

        After an ok cycle that found nothing, while the lease it took is still held, a
        cycle asks the source whether any row lies past the watermark (one index seek).
        None: nothing to read, whatever the bound (§1 holds: a row committed later lies
        past the watermark and is found then), so the cycle ends there, without a status
        write, a transaction or a thread; the lease is still ours, so nothing can have
        taken the sync over (§9), and past half its ttl it is renewed here (one UPDATE).
        The watermark is read once after each full cycle: while the lease is ours only our
        own commits move it (a `reset --force` under a running daemon lands at the next full
        cycle). Any row, any error, a lease that could not be renewed, a change feed, or
        QUIET_FULL_CYCLE_S since the last full cycle (which refreshes the status row and
        the dead-letter gauge): the full cycle.
        """
        lease = self._lease
        if not self._quiet or lease is None or lease.lost is not None or self.reader.feeds:
            return None
        if time.monotonic() - self._full_cycle_at > QUIET_FULL_CYCLE_S:
            return None
        started = time.perf_counter()
        try:
            if lease.held_until - time.monotonic() < lease.ttl.total_seconds() / 2:
                lease.renew()  # a state database error leaves it as it was: checked below
                if lease.held_until - time.monotonic() < lease.ttl.total_seconds() / 2:
                    return None
            if self._quiet_cursor is _UNREAD:  # only a commit of ours moves it while the lease is ours
                self._quiet_cursor = self.state.cursor(self.sync.name)
            cursor = cast(Cursor | None, self._quiet_cursor)
            if self.reader.any_after(cursor):
                return None
        except (SourceError, StateError, LeaseLost, sa.exc.DBAPIError):
            return None  # the full cycle says what failed
        report = CycleReport(self.sync.name, kind=CycleKind.SYNC, watermark=cursor.watermark if cursor else None, backlog=0)
        report.duration_s = time.perf_counter() - started
        self.metrics.cycle(self.sync.name, report.duration_s, CycleOutcome.OK)
        self.metrics.set_last_success(self.sync.name, datetime.now(UTC))
        self.metrics.set_backlog(self.sync.name, 0)
        log.debug("cycle", sync=self.sync.name, **report.summary())
        return report

    def _run(self, kind: CycleKind, batches: Callable[[CycleReport], Iterator[_Batch]]) -> CycleReport:
        report = CycleReport(self.sync.name, kind=kind)
        started = time.perf_counter()
        with structlog.contextvars.bound_contextvars(sync=self.sync.name):
            try:
                self._cycle(report, batches)
            except SourceError as error:
                report.outcome, report.error = CycleOutcome.FAILING, str(error)
            except StateError as error:
                report.outcome, report.error = CycleOutcome.FAILING, str(error)
            except LeaseLost as error:  # what was read under it was dropped, not sent
                report.outcome, report.error = CycleOutcome.SKIPPED, str(error)
            report.duration_s = time.perf_counter() - started
            self._finish(report)
        if kind == "sync":
            self._quiet = report.outcome == CycleOutcome.OK and report.idle
            self._full_cycle_at = time.monotonic()
            self._quiet_cursor = _UNREAD
        return report

    def _cycle(self, report: CycleReport, batches: Callable[[CycleReport], Iterator[_Batch]]) -> None:
        if self.sync.paused:
            report.outcome = CycleOutcome.PAUSED
            return
        if self.stopped:
            report.outcome, report.error = CycleOutcome.CONFIG_ERROR, self.stopped
            return
        if not self._auth_may_push():
            report.outcome, report.error = CycleOutcome.AUTH_ERROR, "waiting for a working API key"
            return
        if not self._schema_checked:
            self.warm_up()
        self._learn_key_uniqueness()
        self._duplicates = None  # a full pass that ended early leaves none behind
        try:
            lease = self.state.acquire_lease(self.sync.name, self.lease)
        except LeaseHeldError as held:
            until = f" (lease until {held.expires_at:%H:%M:%S} UTC)" if held.expires_at else ""
            report.outcome, report.error = CycleOutcome.SKIPPED, f"running on {held.owner or 'another syncd'}{until}"
            return
        self._lease = lease
        deliverer = Deliverer(self.client, self.api, kind=report.kind, should_stop=self.should_stop, fence=lease)
        open_letters = self.state.open_dead_letter_count(self.sync.name) > 0
        self._has_removals = self.state.removal_count(self.sync.name) > 0
        # A first backfill has nothing to compare with: skip the per-batch digest lookups.
        self._compare = self.state.has_digests(self.sync.name)
        if not self._compare:  # everything stored from here on is taken under this mapping
            self.state.set_mapping_hash(self.sync.name, self.mapping_hash)
        send = functools.partial(self._send, deliverer)
        settle = functools.partial(self._settle, report, open_letters)
        failure = self._pipeline.run(batches(report), send=send, settle=settle, lease=lease, should_stop=self.should_stop)
        if failure is not None:
            self._fail(report, failure)
        elif report.outcome == CycleOutcome.OK:
            self._auth_backoff = AUTH_BACKOFF_START

    def _changes(self, report: CycleReport) -> Iterator[_Batch]:
        """Changed rows in watermark order; a big cycle is finished by a child process (`offload.py`)."""
        cursor = self.state.cursor(self.sync.name)
        report.watermark = cursor.watermark if cursor else None
        skip_to: dict[str, Cursor] = {}
        if cursor is None and not self._compare:
            skip_to = self._feed_starts()
            yield from self._whole_model(report)
        else:
            yield from self._changed_rows(report, cursor)
        if self._duplicates is not None:
            yield self._new_duplicates()
        if self.reader.feeds:
            yield from self._feed_changes(skip_to)

    def _feed_starts(self) -> dict[str, Cursor]:
        """Where each change feed that never ran starts when the whole model is read.

        At its last row now, where reading it in full would end, without re-reading the keys
        it names: found before the model's reads begin, those rows' changes are in what they read.
        """
        skip_to: dict[str, Cursor] = {}
        for feed, reader in self.reader.feeds:
            if self.state.feed_cursor(self.sync.name, feed.feed_id) is None:
                position = reader.last_position(reader.take_bound())
                if position is not None:
                    skip_to[feed.feed_id] = position
        return skip_to

    def _whole_model(self, report: CycleReport) -> Iterator[_Batch]:
        """A first backfill: every row below the bound in key order, the watermark set at the end.

        In key order the digests are appended to the state's index, not scattered over it
        (uuid keys), and a key's rows come together, so each batch finds the model's
        duplicates itself. The watermark moves once, after the last batch, to the model's
        newest row below the bound, found before the read: every row up to it is in what
        the read sees, and a row changed since lies past it. A backfill that stops early
        leaves its digests and no watermark: the next cycle reads in watermark order and
        sends only what is not there yet.
        """
        bound = self.reader.take_bound()
        report.bound, report.settled = bound.value, bound.settled
        end = self.reader.last_position(bound)
        size = self.api.max_batch_records
        read_up_to: list[Any] = [None]  # the last key read in this process

        def prepare(rows: Sequence[Sequence[Any]]) -> _Batch:
            read_up_to[0] = rows[-1][0]
            return self._prepare(rows, cursor=None, whole=True)

        def rest(offload: Offload, last: _Batch, read: int) -> Iterator[_Batch]:
            report.offloaded_after = read
            with offload:
                results = offload.batches(read_up_to[0], bound, by_key=True)
                for _, rows_read, mapped, outside in prefetched(results, depth=OFFLOAD_AHEAD):
                    yield self._select(mapped, rows=rows_read, cursor=None, outside=outside, whole=True)

        in_process = self.reader.rows_in_key_order(None, size, bound, membership=True)
        yield from handing_over(in_process, prepare, full=size, start=lambda batch: self._start_offload(None), rest=rest)
        if end is not None:
            yield _Batch(cursor=end)

    def _changed_rows(self, report: CycleReport, cursor: Cursor | None) -> Iterator[_Batch]:
        """Rows past the cursor in watermark order."""
        bounds: list[Bound] = []

        def on_bound(bound: Bound) -> None:
            bounds.append(bound)
            report.bound, report.settled = bound.value, bound.settled

        if cursor is None and self._duplicates_possible is not False:
            # The whole model is read: one aggregate over it instead of a lookup per batch.
            self._duplicates = self.reader.duplicate_keys()

        def prepare(rows: Sequence[Sequence[Any]]) -> _Batch:
            return self._prepare(rows, cursor=self.reader.position(rows[-1]))

        def rest(offload: Offload, last: _Batch, read: int) -> Iterator[_Batch]:
            report.offloaded_after = read
            with offload:
                results = offload.batches(last.cursor, bounds[0])
                for position, rows_read, mapped, outside in prefetched(results, depth=OFFLOAD_AHEAD):
                    yield self._select(mapped, rows=rows_read, cursor=position, outside=outside)

        size = self.api.max_batch_records
        in_process = self.reader.changed_rows(cursor, size, on_bound, membership=True)
        yield from handing_over(
            in_process, prepare, full=size, start=lambda batch: self._start_offload(batch.cursor), rest=rest
        )

    def _feed_changes(self, skip_to: dict[str, Cursor]) -> Iterator[_Batch]:
        """The keys each change feed names since its cursor, re-read from the model.

        A feed is read `FEED_ROWS` rows at a time; their keys, each once, are re-read and
        sent in batches that may be in flight together. The next read waits until those
        were answered and committed: a key may come up again in it, and its digest must be
        there to compare with (and two versions of a key are never in flight together).
        A feed in `skip_to` moves there instead (the whole model was just read, every
        batch of it answered and committed: this is reached only then).
        """
        yield _Batch(cursor=None, barrier=True)  # the model's changes are in; so are their digests
        self._compare = True  # a first backfill has stored its digests now
        size = self.api.max_batch_records
        for feed, reader in self.reader.feeds:
            if feed.feed_id in skip_to:
                yield _Batch(cursor=None, feed=(feed.feed_id, skip_to[feed.feed_id]), barrier=True)
                continue
            cursor = self.state.feed_cursor(self.sync.name, feed.feed_id)
            for rows in reader.changed_rows(cursor, FEED_ROWS):
                keys = list(dict.fromkeys(key_text(row[0]) for row in rows if row[0] is not None))
                found: set[str] = set()
                for model_rows in prefetched(self._rows_of(keys, size)):  # the next lookup runs while this batch goes out
                    found.update(key_text(row[0]) for row in model_rows)
                    yield self._prepare(model_rows, cursor=None, whole=True)
                missing = [key for key in keys if key not in found]
                gone: list[str] = []  # keys the model does not have: nothing, unless they were sent before
                for start in range(0, len(missing), size):
                    known = self.state.known_digests(self.sync.name, missing[start : start + size])
                    gone.extend(key for key in missing[start : start + size] if key in known)
                for start in range(0, len(gone), size):
                    removal = _Batch(cursor=None)
                    self._leave(removal, gone[start : start + size], "not in the model")
                    yield removal
                yield _Batch(cursor=None, feed=(feed.feed_id, reader.position(rows[-1])), barrier=True)

    def _rows_of(self, keys: list[str], size: int) -> Iterator[Sequence[Sequence[Any]]]:
        """The model's rows (with the filter's verdict) for `keys`, `size` keys at a time."""
        for start in range(0, len(keys), size):
            yield from self.reader.rows_by_keys(keys[start : start + size], membership=True)

    def _new_duplicates(self) -> _Batch:
        """Keys that a full pass's model holds twice now but did not when its read began.

        Rows of such a key may have gone out during the pass (a per-batch lookup would
        have seen them a little later): they are reported now, and from here on every
        batch asks again, so they are not sent back and forth.
        """
        before, self._duplicates = self._duplicates or {}, None
        batch = _Batch(cursor=None)
        for key, n in self.reader.duplicate_keys().items():
            if key not in before:
                self._report_duplicate(batch, key, n)
        return batch

    def _report_duplicate(self, batch: _Batch, key: str, n: int) -> None:
        log.error("duplicate_key", key=key, rows=n, action="fix the model so that it has one row per key")
        batch.dead_letters.append(DeadLetter(key=key, reason=f"duplicate key in model: {n} rows have key {key}"))

    def _start_offload(self, cursor: Cursor | None) -> Offload | None:
        """A child process to read and map the rest of this cycle, when more than `offload_after` rows wait.

        Asked only after a full first batch, so an idle or small cycle never pays for the probe.
        """
        after = self.sync.offload_after
        if not after or not self.reader.source.can_offload:
            return None
        if self.reader.backlog(cursor, limit=after) < after:  # an index range of at most `after` entries
            return None
        source = self.reader.source
        try:
            return Offload(
                self.sync, source.name, source.config, batch_rows=self.api.max_batch_records, target=self._target
            )
        except OSError as error:  # e.g. a sandbox that forbids starting the interpreter again
            log.warning("offload_failed", reason=str(error), action="the cycle goes on in one process")
            return None

    def _everything(self, report: CycleReport) -> Iterator[_Batch]:
        """Every row, in key order; only rows whose source changed are mapped.

        A row whose source fingerprint equals the one stored with its last acknowledged
        payload maps to that payload again, as long as the mapping is the one the
        fingerprints were taken under; so those rows are skipped without mapping. After
        a mapping change every row is mapped once, and the pass re-arms the shortcut.
        """
        self._pass_complete = False
        name, size = self.sync.name, self.api.max_batch_records
        fast = self.state.mapping_hash(name) == self.mapping_hash
        seen = SeenKeys(self.state.digest_count(name))
        if fast and self.reader.source_hash_index is not None:
            # The server fingerprints the rows: read keys and fingerprints only, in big
            # chunks, then the full rows of just the stale keys.
            filtered = self.reader.has_membership()
            for found in prefetched(self.reader.fingerprints(FINGERPRINT_ROWS, membership=filtered)):
                keys = [key_text(item[0]) for item in found]
                seen.add(keys)  # the same str objects as the lookups below: each key is hashed once
                pairs: Sequence[Sequence[Any]] = found
                outside = [key for key, item in zip(keys, found, strict=True) if not item[-1]] if filtered else []
                if outside:
                    inside = [(key, item) for key, item in zip(keys, found, strict=True) if item[-1]]
                    keys, pairs = [key for key, _ in inside], [item for _, item in inside]
                stored = self.state.known_source_hashes(name, keys)
                stale = [key for key, item in zip(keys, pairs, strict=True) if stored.get(key) != item[1]]
                stale_keys = set(stale)
                batch = _Batch(cursor=None, rows=len(found) - len(stale), unchanged_keys=[k for k in keys if k not in stale_keys])
                self._left_filter(batch, outside)
                yield batch
                for rows in self.reader.rows_by_keys(stale, membership=True) if stale else ():
                    yield self._prepare(rows, cursor=None, refresh=True, whole=True)
        else:
            hash_of = self.reader.source_hash
            for read in self.reader.all_rows(size, membership=True):
                seen.add(key_text(row[0]) for row in read)
                if not fast:
                    yield self._prepare(read, cursor=None, refresh=True)
                    continue
                in_model, outside = self.reader.split(read)
                keys = [key_text(row[0]) for row in in_model]
                stored = self.state.known_source_hashes(name, keys)
                changed = [row for key, row in zip(keys, in_model, strict=True) if stored.get(key) != hash_of(row)]
                batch = self._prepare(changed, cursor=None, refresh=True) if changed else _Batch(cursor=None)
                stale_keys = {key_text(row[0]) for row in changed}
                batch.rows = len(read)
                batch.unchanged_keys.extend(key for key in keys if key not in stale_keys)
                self._left_filter(batch, outside)
                yield batch
        # Keys acknowledged once that the model no longer has at all: stored, not read by
        # this pass (seen.py), and confirmed absent by the source.
        yield _Batch(cursor=None, barrier=True)
        for keys in self.state.digest_keys(name, FINGERPRINT_ROWS):
            unseen = seen.unseen(keys)
            present = self.reader.existing_keys(unseen) if unseen else set()
            missing = [key for key in unseen if key not in present]
            if missing:
                batch = _Batch(cursor=None)
                self._leave(batch, missing, "not in the model")
                yield batch
        self._pass_complete = True

    def _keyed(self, keys: list[str]) -> Iterator[_Batch]:
        for rows in self.reader.rows_by_keys(keys, membership=True):
            yield self._prepare(rows, cursor=None, whole=True)

    def _prepare(
        self, read: Sequence[Sequence[Any]], *, cursor: Cursor | None, refresh: bool = False, whole: bool = False
    ) -> _Batch:
        """Map rows read with `membership=True`; rows that fail the filter are not mapped.

        `whole`: `read` holds every row the model has for its keys (one `rows_by_keys`
        batch), so counting them finds the duplicates without asking the model again.
        """
        rows, outside = self.reader.split(read)
        mapped = map_rows(rows, self.mapping, target=self._target, source_hash=self.reader.source_hash)
        return self._select(mapped, rows=len(read), cursor=cursor, refresh=refresh, outside=outside, whole=whole)

    def _select(
        self,
        mapped: MappedRows,
        *,
        rows: int,
        cursor: Cursor | None,
        refresh: bool = False,
        outside: Sequence[str] = (),
        whole: bool = False,
    ) -> _Batch:
        """Keep the records whose payload differs from the last acknowledged one.

        `refresh`: also note new source fingerprints of rows whose payload is unchanged.
        `outside`: keys of rows that fail the filter (removed if they were ever acknowledged).
        `whole`: the rows are all the model has for their keys (see `_prepare`).
        """
        batch = _Batch(cursor=cursor, rows=rows)
        if self._duplicates_possible is not False:
            mapped, outside = self._without_duplicates(batch, mapped, outside, ask=not whole)
        batch.dead_letters.extend(
            DeadLetter(key=key, reason=f"invalid row: {reason}", payload=row) for key, reason, row in mapped.rejected
        )
        self._left_filter(batch, outside)
        if not self._compare:  # a first backfill: everything is new
            batch.keys, batch.encoded, batch.digests, batch.sources = (
                mapped.keys,
                mapped.encoded,
                mapped.digests,
                mapped.sources,
            )
            self._keep_sent(batch)
            return batch
        known = self.state.known_digests(self.sync.name, mapped.keys)
        sources = self.state.known_source_hashes(self.sync.name, mapped.keys) if refresh else {}
        for key, encoded, digest, source in zip(mapped.keys, mapped.encoded, mapped.digests, mapped.sources, strict=True):
            if known.get(key) == digest:
                batch.unchanged_keys.append(key)
                if refresh and sources.get(key) != source:
                    batch.refreshed.append((key, source))
            else:
                batch.keys.append(key)
                batch.encoded.append(encoded)
                batch.digests.append(digest)
                batch.sources.append(source)
        self._keep_sent(batch)
        return batch

    def _without_duplicates(
        self, batch: _Batch, mapped: MappedRows, outside: Sequence[str], *, ask: bool = True
    ) -> tuple[MappedRows, Sequence[str]]:
        """Dead-letter keys the model holds more than once; neither row is sent.

        Sending one of them would flip the datastore between the rows from one pass to
        the next. The model is asked about every key of the batch, so a second row that
        sorts far away (another watermark, another batch) is found as well.
        """
        keys = [*mapped.keys, *(key for key, _, _ in mapped.rejected), *outside]
        counts = {key: n for key, n in Counter(keys).items() if n > 1}
        if self._duplicates is not None:  # a full pass: the model's duplicates were found when it began
            counts.update((key, self._duplicates[key]) for key in keys if key in self._duplicates)
        elif keys and ask:
            counts.update(self.reader.duplicate_keys(keys))
        if not counts:
            return mapped, outside
        for key, n in counts.items():
            self._report_duplicate(batch, key, n)
        kept = MappedRows(rejected=[item for item in mapped.rejected if item[0] not in counts])
        for key, encoded, digest, source in zip(mapped.keys, mapped.encoded, mapped.digests, mapped.sources, strict=True):
            if key not in counts:
                kept.keys.append(key)
                kept.encoded.append(encoded)
                kept.digests.append(digest)
                kept.sources.append(source)
        return kept, [key for key in outside if key not in counts]

    def _left_filter(self, batch: _Batch, outside: Sequence[str]) -> None:
        """Rows that fail the filter: a key acknowledged before has left the model."""
        if outside and self._compare:  # before the first ACK nothing can have left
            known = self.state.known_digests(self.sync.name, list(outside))
            self._leave(batch, [key for key in outside if key in known], "filter")

    def _leave(self, batch: _Batch, keys: Sequence[str], why: str) -> None:
        """Record these keys' removal with `batch`: after its `[syncs.removed]` record's ACK, if any."""
        if not keys:
            return
        removed = self.sync.removed
        if removed is None:
            batch.gone.extend((key, why) for key in keys)
            return
        last_sent = self.state.sent_attributes(self.sync.name, list(keys))
        for key in keys:
            kept = last_sent.get(key, {})
            record: dict[str, Any] = {}
            missing = []
            for attribute, spec in removed.items():
                if spec.value is not None:
                    record[attribute] = spec.value
                elif spec.sent in kept:
                    record[attribute] = kept[spec.sent]
                else:
                    missing.append(spec.sent)
            if missing:  # acknowledged before [syncs.removed] was configured, or never carried it
                batch.gone.append((key, why))
                batch.dead_letters.append(
                    DeadLetter(
                        key=key,
                        reason=f"removed ({why}), but no record pushed: the last acknowledged record "
                        f"had no {', '.join(map(repr, missing))}",
                        payload=record,
                    )
                )
                continue
            batch.removing[key] = why
            batch.keys.append(key)
            batch.encoded.append(orjson.dumps(record, option=orjson.OPT_SORT_KEYS))
            batch.digests.append(b"")
            batch.sources.append(b"")

    def _keep_sent(self, batch: _Batch) -> None:
        """What `[syncs.removed]` will need of these records, stored with their digests."""
        attributes = self.sync.sent_attributes
        if not attributes:
            return
        for key, encoded in zip(batch.keys, batch.encoded, strict=True):
            if key not in batch.removing:
                payload = orjson.loads(encoded)
                kept = {name: payload[name] for name in attributes if name in payload}
                batch.sent[key] = orjson.dumps(kept, option=orjson.OPT_SORT_KEYS).decode()

    def _commit(self, outcome: BatchOutcome) -> None:
        self.state.commit_batch(self.sync.name, **outcome.arguments())

    def _send(self, deliverer: Deliverer, batch: _Batch) -> DeliveryResult:
        return deliverer.deliver(self.sync.datastore_id, self.sync.feed_id, batch.encoded)

    def _settle(self, report: CycleReport, open_letters: bool, answers: list[Answer[_Batch]]) -> BatchOutcome:
        """What answered batches (in read order) commit, in one state transaction.

        The watermark moves to the last batch before the first failure; batches that
        landed after a failure keep their digests, so they are not sent again.
        """
        outcome = BatchOutcome()
        feeds: dict[str, Cursor] = {}
        records_of_removals = 0
        acked, dead, removed, resolve = outcome.acked, outcome.dead_letters, outcome.removed, outcome.resolve_keys
        for answer in answers:
            batch, result = answer.batch, answer.result
            dead.extend(batch.dead_letters)
            for index, error in result.rejected:
                dead.append(
                    DeadLetter(
                        key=batch.keys[index],
                        reason=f"rejected by the API: {error.description}",
                        payload=orjson.loads(batch.encoded[index]),
                        http_status=error.http_status,
                        api_code=error.api_code,
                    )
                )
            if len(result.acked) == len(batch.keys):  # the usual case: all of it
                landed = list(zip(batch.keys, batch.digests, batch.sources, strict=True))
            else:
                landed = [(batch.keys[i], batch.digests[i], batch.sources[i]) for i in result.acked]
            carrier = dict(zip((item[0] for item in landed), result.ack_pushes(), strict=True))
            if batch.removing:  # removal records: the ACK records the removal, not a digest
                records = [(item[0], batch.removing[item[0]]) for item in landed if item[0] in batch.removing]
                removed.extend(records)
                records_of_removals += len(records)
                landed = [item for item in landed if item[0] not in batch.removing]
            removed.extend(batch.gone)
            if batch.sent:
                outcome.sent.extend((key, batch.sent[key]) for key, _, _ in landed if key in batch.sent)
            acked.extend(landed)
            outcome.acked_by.extend(carrier[key] for key, _, _ in landed)
            outcome.refreshed.extend(batch.refreshed)
            outcome.pushes.extend(result.pushes)
            if answer.in_order and batch.cursor is not None:
                outcome.cursor = batch.cursor
            if answer.in_order and batch.feed is not None:
                feeds[batch.feed[0]] = batch.feed[1]
            if open_letters:  # a key whose current payload landed, or was there already, is resolved
                resolve.extend(key for key, _, _ in landed)
                resolve.extend(batch.unchanged_keys)
            report.rows_read += batch.rows
            report.unchanged += len(batch.unchanged_keys)
            report.batches += 1 if batch.encoded else 0
        outcome.feed_cursors = list(feeds.items())
        if removed:
            self._has_removals = True
        if self._has_removals and acked:
            outcome.returned = [key for key, _, _ in acked]
        outcome.progress = (report.rows_read, report.sent + len(acked))
        pushes = outcome.pushes
        report.sent += len(acked) + records_of_removals
        report.removed += len(removed)
        report.dead_lettered += len(dead)
        report.note(pushes, dead)
        report.last_trans_id = next((p.trans_id for p in reversed(pushes) if p.trans_id), report.last_trans_id)
        if outcome.cursor is not None:
            report.watermark = outcome.cursor.watermark
        name = self.sync.name
        self.metrics.rows_read(name, sum(answer.batch.rows for answer in answers))
        self.metrics.unchanged_skipped(name, sum(len(answer.batch.unchanged_keys) for answer in answers))
        self.metrics.records_sent(name, len(acked))
        self.metrics.dead_lettered(name, len(dead))
        for push in pushes:
            self.metrics.push(name, push.http_status, push.api_code, push.duration_ms / 1000)
        if self.on_progress is not None:
            self.on_progress(report)
        return outcome

    def _fail(self, report: CycleReport, result: DeliveryResult) -> None:
        error = result.failure
        assert error is not None
        report.error = f"{type(error).__name__}: {error.description}" + (
            f" (HTTP {error.http_status}, code {error.api_code})" if error.http_status else ""
        )
        if isinstance(error, AuthError):
            report.outcome = CycleOutcome.AUTH_ERROR
            self._auth_retry_at = time.monotonic() + self._auth_backoff.total_seconds()
            self._auth_backoff = min(self._auth_backoff * 2, AUTH_BACKOFF_MAX)
        elif isinstance(error, ConfigurationError):
            report.outcome = CycleOutcome.CONFIG_ERROR
            self.stopped = report.error
            log.error("sync_stopped", reason=report.error, action="fix the config and reload")
        else:
            report.outcome = CycleOutcome.FAILING

    def _auth_may_push(self) -> bool:
        """While the key is refused, probe again only when it changed or the backoff ran out."""
        if self._auth_retry_at == 0.0:
            return True
        try:
            changed = self.client.tokens.refresh()
        except AuthError:
            changed = False
        if changed or time.monotonic() >= self._auth_retry_at:
            self._auth_retry_at = 0.0
            return True
        return False

    def _finish(self, report: CycleReport) -> None:
        name = self.sync.name
        state = report.outcome.state  # None: skipped, the cycle ran elsewhere
        # Backlog after every cycle the source can answer, failed ones included: rows pile
        # up while the API is down. Not when the cycle failed before the source gave a bound
        # (the source itself may be what failed; asking again would only wait again).
        source_failed = report.outcome == CycleOutcome.FAILING and report.bound is None
        if report.kind is CycleKind.SYNC and state not in (None, SyncState.PAUSED) and not source_failed:
            try:
                report.backlog = self.reader.backlog(self.state.cursor(name))
            except (SourceError, StateError, sa.exc.DBAPIError):
                report.backlog = None
        # Metrics before the state database, which may be what failed this cycle.
        self.metrics.cycle(name, report.duration_s, "ok" if report.outcome is CycleOutcome.OK else "failed")
        if state is not None:
            self.metrics.set_state(name, state)
            if state is SyncState.OK:
                self.metrics.set_last_success(name, datetime.now(UTC))
            if report.backlog is not None:
                self.metrics.set_backlog(name, report.backlog)
            self.state.set_state(name, state.stored, error=report.error, backlog=report.backlog)
            self.metrics.set_open_dead_letters(name, self.state.open_dead_letter_count(name))
        elif (stored := self.state.sync_status(name)) is not None:  # another syncd runs it: show its progress
            self.metrics.show_stored(stored)
        if report.outcome not in (CycleOutcome.OK, CycleOutcome.PAUSED, CycleOutcome.SKIPPED):
            level = "error"
        elif report.dead_lettered:
            level = "warning"  # rows that need someone's attention
        else:
            level = "debug" if report.idle else "info"
        getattr(log, level)("cycle", **report.summary())


def _mapping_hash(sync: SyncConfig, reader: ModelReader) -> str:
    """Identifies what stored fingerprints stand for: the mapping, its columns, its target."""
    fields = {name: spec.model_dump() for name, spec in sync.fields.items()}
    target = [sync.datastore_id, sync.feed_id]
    data = orjson.dumps({"fields": fields, "columns": reader.hash_columns, "target": target}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(data).hexdigest()[:32]




def _merge(total: CycleReport, more: CycleReport) -> CycleReport:
    for name in ("rows_read", "unchanged", "sent", "batches", "dead_lettered", "removed", "duration_s"):
        setattr(more, name, getattr(total, name) + getattr(more, name))
    more.last_trans_id = more.last_trans_id or total.last_trans_id
    more.trans_ids = (total.trans_ids + more.trans_ids)[:NAMED_IN_LOG]
    more.dead_letters = (total.dead_letters + more.dead_letters)[:NAMED_IN_LOG]
    if more.offloaded_after is None:
        more.offloaded_after = total.offloaded_after
    if more.watermark is None:
        more.watermark = total.watermark
    return more

