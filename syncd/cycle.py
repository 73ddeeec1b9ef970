"""One sync cycle: read → map → drop unchanged → batch → push → commit.

This module wires source, mapping, delivery and state together and owns the ordering
rules between them (DESIGN.md §2, §3, §6):
- a batch's watermark, digests and push rows are committed in one state transaction,
  only after the API acknowledged it, and batches commit in read order, so the watermark
  never passes a batch that is still pending;
- up to `max_in_flight` batches are on the wire while the next is read and mapped; within
  one cycle a key appears once, and cycles of one sync never overlap, so two versions of
  one key are never in flight together;
- a row that fails local validation, or that the API rejects on its own, becomes a dead
  letter and the feed moves on;
- a key the model holds twice is a dead letter, and neither row is sent;
- a key that was acknowledged and has left the model (its row fails the filter, or is
  gone) is recorded as removed, and its `[syncs.removed]` record pushed if there is one;
- change feeds come after the model's own changes: the keys they name are re-read from
  the model and handled like changed rows, one feed batch at a time, and a feed's cursor
  commits with the batches that carried its keys.
"""

from __future__ import annotations

import contextvars
import hashlib
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson
import sqlalchemy as sa
import structlog

from syncd.config import ApiConfig, SyncConfig
from syncd.delivery import (
    ApiClient,
    AuthError,
    ConfigurationError,
    Deliverer,
    DeliveryResult,
)
from syncd.mapping import MappedRows, Mapping, compile_mapping, digest_target, map_rows
from syncd.metrics import Metrics
from syncd.offload import Offload
from syncd.source import Bound, SourceError, TableReader, prefetched
from syncd.state import (
    Cursor,
    DeadLetter,
    Lease,
    LeaseLost,
    PushRecord,
    StateError,
    StateStore,
    db_error_line,
    display_value,
    key_text,
)

__all__ = ["CycleReport", "SyncRunner"]

log = structlog.get_logger(__name__)

AUTH_BACKOFF_START = timedelta(seconds=5)
AUTH_BACKOFF_MAX = timedelta(minutes=5)
FINGERPRINT_ROWS = 5_000  # keys compared per state lookup in a reconcile
OFFLOAD_AHEAD = 8  # batches a child process may map ahead of the sync thread
NAMED_IN_LOG = 20  # trans_ids and dead-lettered keys the cycle line names; the rest are in the state db


@dataclass(slots=True)
class CycleReport:
    """What one cycle did; logged as one summary event and returned to the caller."""

    sync: str
    kind: str = "sync"  # sync | reconcile | retry
    outcome: str = "ok"  # ok | failing | auth_error | config_error | paused | skipped
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
        return self.outcome in ("ok", "paused", "skipped") and not (self.rows_read or self.sent or self.dead_lettered)

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
        reader: TableReader,
        state: StateStore,
        client: ApiClient,
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
        self._lease_renewed = 0.0  # a pass over unchanged rows writes only to renew its lease
        self._auth_retry_at = 0.0
        self._auth_backoff = AUTH_BACKOFF_START
        self._has_removals = False  # whether acknowledged keys may end a recorded removal
        self._duplicates_possible: bool | None = None  # None: not known yet (then they are looked for)
        self._duplicates: dict[str, int] | None = None  # the model's, during a full pass; else asked per batch
        self._lease: Lease | None = None  # the last cycle's; a quiet cycle runs while it is held long enough
        self._quiet = False  # whether the last cycle was an ok one with nothing to read

    # -- entry points

    def run_cycle(self) -> CycleReport:
        """Push everything changed since the watermark, up to the source's bound."""
        return self._quiet_cycle() or self._run("sync", self._changes)

    def reconcile(self) -> CycleReport:
        """Compare every row with what was last acknowledged and push the differences."""
        report = self._run("reconcile", self._everything)
        if report.outcome == "ok" and self._pass_complete:
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
        return self._run("retry", lambda report: self._keyed(keys))

    def run_until_caught_up(self, sleep: Callable[[float], None] = time.sleep) -> CycleReport:
        """Cycles until every change committed before this call has been handled (`once`).

        A cycle stops `settle` short of the source's clock, so one more cycle after
        `settle` has passed picks up what was written just before we started.
        """
        first = self.run_cycle()
        if first.outcome != "ok" or not isinstance(first.bound, (datetime, date, str)):
            return first
        # From the source's clock, not the bound: an open transaction may hold the bound back.
        target = _add(first.settled if first.settled is not None else first.bound, self.sync.settle)
        report = first
        deadline = time.monotonic() + self.sync.settle.total_seconds() + 60
        while _before(report.bound, target) and time.monotonic() < deadline and not self.should_stop():
            sleep(min(max(self.sync.settle.total_seconds(), 0.05), 5))
            report = _merge(report, self.run_cycle())
            if report.outcome != "ok":
                break
        if report.outcome == "ok" and _before(report.bound, target):
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

        After an ok cycle that found nothing, while the lease it took is still held for
        more than half its ttl, a cycle first asks the source whether any row lies past
        the watermark (one index seek). None: nothing to read, whatever the bound (§1
        holds: a row committed later lies past the watermark and is found then), so the
        cycle ends there, without a lease or status write, a transaction or a thread;
        the lease still holds, so nothing can have taken the sync over (§9). Any row, any
        error, a lease past half its ttl (30 s by default: the full cycle renews it and
        refreshes the status row and the dead-letter gauge) or a change feed: the full cycle.
        """
        lease = self._lease
        if not self._quiet or lease is None or lease.lost is not None or self.reader.feeds:
            return None
        if lease.held_until - time.monotonic() < lease.ttl.total_seconds() / 2:
            return None
        started = time.perf_counter()
        try:
            cursor = self.state.cursor(self.sync.name)
            if self.reader.any_after(cursor):
                return None
        except (SourceError, StateError, sa.exc.DBAPIError):
            return None  # the full cycle says what failed
        report = CycleReport(self.sync.name, kind="sync", watermark=cursor.watermark if cursor else None, backlog=0)
        report.duration_s = time.perf_counter() - started
        self.metrics.cycle(self.sync.name, report.duration_s, "ok")
        self.metrics.set_last_success(self.sync.name, datetime.now(UTC))
        self.metrics.set_backlog(self.sync.name, 0)
        log.debug("cycle", sync=self.sync.name, **report.summary())
        return report

    def _run(self, kind: str, batches: Callable[[CycleReport], Iterator[_Batch]]) -> CycleReport:
        report = CycleReport(self.sync.name, kind=kind)
        started = time.perf_counter()
        with structlog.contextvars.bound_contextvars(sync=self.sync.name):
            try:
                self._cycle(report, batches)
            except SourceError as error:
                report.outcome, report.error = "failing", str(error)
            except sa.exc.DBAPIError as error:  # the state database (the source's are SourceError)
                report.outcome, report.error = "failing", f"state database: {db_error_line(error)}"
            except StateError as error:
                report.outcome, report.error = "failing", str(error)
            except LeaseLost as error:  # what was read under it was dropped, not sent
                report.outcome, report.error = "skipped", str(error)
            report.duration_s = time.perf_counter() - started
            self._finish(report)
        if kind == "sync":
            self._quiet = report.outcome == "ok" and report.idle
        return report

    def _cycle(self, report: CycleReport, batches: Callable[[CycleReport], Iterator[_Batch]]) -> None:
        if self.sync.paused:
            report.outcome = "paused"
            return
        if self.stopped:
            report.outcome, report.error = "config_error", self.stopped
            return
        if not self._auth_may_push():
            report.outcome, report.error = "auth_error", "waiting for a working API key"
            return
        if not self._schema_checked:
            self.warm_up()
        self._learn_key_uniqueness()
        self._duplicates = None  # a full pass that ended early leaves none behind
        lease = self.state.acquire_lease(self.sync.name, self.lease)
        if lease is None:
            owner, until = self.state.lease_holder(self.sync.name)
            held = f" (lease until {until:%H:%M:%S} UTC)" if until else ""
            report.outcome, report.error = "skipped", f"running on {owner or 'another syncd'}{held}"
            return
        self._lease = lease
        deliverer = Deliverer(self.client, self.api, kind=report.kind, should_stop=self.should_stop, fence=lease)
        open_letters = self.state.open_dead_letter_count(self.sync.name) > 0
        self._has_removals = self.state.removal_count(self.sync.name) > 0
        # A first backfill has nothing to compare with: skip the per-batch digest lookups.
        self._compare = self.state.has_digests(self.sync.name)
        if not self._compare:  # everything stored from here on is taken under this mapping
            self.state.set_mapping_hash(self.sync.name, self.mapping_hash)
        pending: deque[tuple[Future[DeliveryResult], _Batch]] = deque()
        failed: list[DeliveryResult] = []
        committer = _Committer(self.state.commit_batch, name=f"commit-{self.sync.name}")
        stop_keeping = lease.keep()  # renews every quarter lease, however long a read or a retry takes
        with ThreadPoolExecutor(self.api.max_in_flight, thread_name_prefix=f"push-{self.sync.name}") as pool:
            try:
                for batch in batches(report):
                    lease.check()  # lost: this batch and the rest of the cycle are dropped
                    pending.append((self._submit(pool, deliverer, batch), batch))
                    full = len(pending) >= self.api.max_in_flight
                    if full or pending[0][0].done():
                        self._settle(report, _answered(pending, wait_for_one=full), failed, open_letters, committer, lease)
                    if batch.barrier:  # what comes next compares with what this committed
                        while pending and not failed:
                            self._settle(report, _answered(pending, wait_for_one=True), failed, open_letters, committer, lease)
                        committer.flush()
                    if failed or self.should_stop():
                        break
            finally:
                try:
                    # What is on the wire still lands; its digests are kept. Not under a lost lease.
                    while pending and lease.lost is None:
                        answered = _answered(pending, wait_for_one=True)
                        self._settle(report, answered, failed, open_letters, committer, lease)
                finally:
                    for future, _ in pending:  # lost: queued batches never start, running ones fail their fence
                        future.cancel()
                    stop_keeping()
                    committer.close()  # every answered batch is committed before the cycle ends
        if failed:
            self._fail(report, failed[0])
        elif report.outcome == "ok":
            self._auth_backoff = AUTH_BACKOFF_START

    def _changes(self, report: CycleReport) -> Iterator[_Batch]:
        """Changed rows in watermark order; a big cycle is finished by a child process (`offload.py`)."""
        cursor = self.state.cursor(self.sync.name)
        report.watermark = cursor.watermark if cursor else None
        bounds: list[Bound] = []

        def on_bound(bound: Bound) -> None:
            bounds.append(bound)
            report.bound, report.settled = bound.value, bound.settled

        # A first backfill reads the whole model: a feed that never ran starts where reading
        # it in full would end, at its last row now, without re-reading the keys it names.
        # Found before the model's reads begin, those rows' changes are in what they read.
        skip_to: dict[str, Cursor] = {}
        if cursor is None and not self._compare:
            for feed, reader in self.reader.feeds:
                if self.state.feed_cursor(self.sync.name, feed.feed_id) is None:
                    position = reader.last_position(reader.take_bound())
                    if position is not None:
                        skip_to[feed.feed_id] = position
        if cursor is None and self._duplicates_possible is not False:
            # The whole model is read: one aggregate over it instead of a lookup per batch.
            self._duplicates = self.reader.duplicate_keys()
        offload: Offload | None = None
        handed_over = False
        read = 0
        size = self.api.max_batch_records
        in_process = self.reader.changed_rows(cursor, size, on_bound, membership=True)
        try:
            for rows in in_process:
                batch = self._prepare(rows, cursor=self.reader.position(rows[-1]))
                yield batch
                if read == 0 and len(rows) == size:  # a full first batch: is this a big cycle?
                    offload = self._start_offload(batch.cursor)
                read += len(rows)
                if offload is not None:
                    try:
                        handed_over = offload.ready()
                    except SourceError as error:  # not needed to go on: read on here
                        log.warning("offload_failed", reason=str(error), action="the cycle goes on in one process")
                        offload.close()
                        offload = None
                if handed_over:
                    cursor = batch.cursor
                    break
        finally:
            in_process.close()  # ends its read transaction before the child starts its own
            if offload is not None and not handed_over:
                offload.close()
        if offload is not None and handed_over:
            report.offloaded_after = read
            with offload:
                results = offload.batches(cursor, bounds[0])
                for position, rows_read, mapped, outside in prefetched(results, depth=OFFLOAD_AHEAD):
                    yield self._select(mapped, rows=rows_read, cursor=position, outside=outside)
        if self._duplicates is not None:
            yield self._new_duplicates()
        if self.reader.feeds:
            yield from self._feed_changes(skip_to)

    def _feed_changes(self, skip_to: dict[str, Cursor]) -> Iterator[_Batch]:
        """The keys each change feed names since its cursor, re-read from the model.

        Each feed batch waits for the one before to be answered and committed: a key may
        come up again in the next one, and its digest must be there to compare with.
        A feed in `skip_to` moves there instead (the whole model was just read, every
        batch of it answered and committed: this is reached only then).
        """
        yield _Batch(cursor=None, barrier=True)  # the model's changes are in; so are their digests
        self._compare = True  # a first backfill has stored its digests now
        for feed, reader in self.reader.feeds:
            if feed.feed_id in skip_to:
                yield _Batch(cursor=None, feed=(feed.feed_id, skip_to[feed.feed_id]), barrier=True)
                continue
            cursor = self.state.feed_cursor(self.sync.name, feed.feed_id)
            for rows in reader.changed_rows(cursor, self.api.max_batch_records):
                keys = list(dict.fromkeys(key_text(row[0]) for row in rows if row[0] is not None))
                found: set[str] = set()
                for model_rows in self.reader.rows_by_keys(keys, membership=True) if keys else ():
                    found.update(key_text(row[0]) for row in model_rows)
                    yield self._prepare(model_rows, cursor=None, whole=True)
                last = _Batch(cursor=None, feed=(feed.feed_id, reader.position(rows[-1])), barrier=True)
                missing = [key for key in keys if key not in found]
                if missing:  # a key the model does not have: nothing, unless it was sent before
                    known = self.state.known_digests(self.sync.name, missing)
                    self._leave(last, [key for key in missing if key in known], "not in the model")
                yield last

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
        if fast and self.reader.source_hash_index is not None:
            # The server fingerprints the rows: read keys and fingerprints only, in big
            # chunks, then the full rows of just the stale keys.
            filtered = self.reader.has_membership()
            for found in prefetched(self.reader.fingerprints(FINGERPRINT_ROWS, membership=filtered)):
                outside = [key_text(item[0]) for item in found if not item[-1]] if filtered else []
                pairs = [item for item in found if item[-1]] if outside else found
                keys = [key_text(item[0]) for item in pairs]
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
                if not fast:
                    yield self._prepare(read, cursor=None, refresh=True)
                    continue
                rows, outside = self.reader.split(read)
                keys = [key_text(row[0]) for row in rows]
                stored = self.state.known_source_hashes(name, keys)
                stale = [row for key, row in zip(keys, rows, strict=True) if stored.get(key) != hash_of(row)]
                batch = self._prepare(stale, cursor=None, refresh=True) if stale else _Batch(cursor=None)
                stale_keys = {key_text(row[0]) for row in stale}
                batch.rows = len(read)
                batch.unchanged_keys.extend(key for key in keys if key not in stale_keys)
                self._left_filter(batch, outside)
                yield batch
        # Keys acknowledged once that the model no longer has at all.
        yield _Batch(cursor=None, barrier=True)
        for keys in self.state.digest_keys(name, FINGERPRINT_ROWS):
            present = self.reader.existing_keys(keys)
            missing = [key for key in keys if key not in present]
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

    def _submit(self, pool: ThreadPoolExecutor, deliverer: Deliverer, batch: _Batch) -> Future[DeliveryResult]:
        if not batch.encoded:
            done: Future[DeliveryResult] = Future()
            done.set_result(DeliveryResult())
            return done
        context = contextvars.copy_context()  # keep `sync=` on the push thread's log lines
        return pool.submit(
            context.run, deliverer.deliver, self.sync.datastore_id, self.sync.feed_id, batch.encoded
        )

    def _settle(
        self,
        report: CycleReport,
        answered: list[tuple[Future[DeliveryResult], _Batch]],
        failed: list[DeliveryResult],
        open_letters: bool,
        committer: _Committer,
        lease: Lease,
    ) -> None:
        """Commit answered batches (in read order) in one state transaction.

        The watermark moves to the last batch before the first failure; batches that
        landed after a failure keep their digests, so they are not sent again.
        """
        move: Cursor | None = None
        feeds: dict[str, Cursor] = {}
        removed: list[tuple[str, str]] = []
        records_of_removals = 0
        sent: list[tuple[str, str]] = []
        acked: list[tuple[str, bytes, bytes]] = []
        refreshed: list[tuple[str, bytes]] = []
        pushes: list[PushRecord] = []
        dead: list[DeadLetter] = []
        resolve: list[str] = []
        for future, batch in answered:
            result = future.result()
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
            if batch.removing:  # removal records: the ACK records the removal, not a digest
                records = [(item[0], batch.removing[item[0]]) for item in landed if item[0] in batch.removing]
                removed.extend(records)
                records_of_removals += len(records)
                landed = [item for item in landed if item[0] not in batch.removing]
            removed.extend(batch.gone)
            if batch.sent:
                sent.extend((key, batch.sent[key]) for key, _, _ in landed if key in batch.sent)
            acked.extend(landed)
            refreshed.extend(batch.refreshed)
            pushes.extend(result.pushes)
            if not result.complete:
                failed.append(result)
            if not failed and batch.cursor is not None:
                move = batch.cursor
            if not failed and batch.feed is not None:
                feeds[batch.feed[0]] = batch.feed[1]
            if open_letters:  # a key whose current payload landed, or was there already, is resolved
                resolve.extend(key for key, _, _ in landed)
                resolve.extend(batch.unchanged_keys)
            report.rows_read += batch.rows
            report.unchanged += len(batch.unchanged_keys)
            report.batches += 1 if batch.encoded else 0
        nothing = move is None and not (acked or refreshed or pushes or dead or resolve or feeds or removed)
        if not nothing or time.monotonic() - self._lease_renewed > self.lease.total_seconds() / 4:
            self._lease_renewed = time.monotonic()
            model: dict[str, Any] = {}  # only what there is: most syncs have no feeds or removals
            if feeds:
                model["feed_cursors"] = list(feeds.items())
            if removed:
                model["removed"] = removed
                self._has_removals = True
            if self._has_removals and acked:
                model["returned"] = [key for key, _, _ in acked]
            if sent:
                model["sent"] = sent
            committer.commit(
                self.sync.name,
                cursor=move,
                acked=acked,
                refreshed=refreshed,
                pushes=pushes,
                dead_letters=dead,
                resolve_keys=resolve,
                lease=lease,  # fenced by owner and generation; renews the lease
                progress=(report.rows_read, report.sent + len(acked)),
                **model,
            )
        report.sent += len(acked) + records_of_removals
        report.removed += len(removed)
        report.dead_lettered += len(dead)
        report.note(pushes, dead)
        report.last_trans_id = next((p.trans_id for p in reversed(pushes) if p.trans_id), report.last_trans_id)
        if move is not None:
            report.watermark = move.watermark
        name = self.sync.name
        self.metrics.rows_read(name, sum(batch.rows for _, batch in answered))
        self.metrics.unchanged_skipped(name, sum(len(batch.unchanged_keys) for _, batch in answered))
        self.metrics.records_sent(name, len(acked))
        self.metrics.dead_lettered(name, len(dead))
        for push in pushes:
            self.metrics.push(name, push.http_status, push.api_code, push.duration_ms / 1000)
        if self.on_progress is not None:
            self.on_progress(report)

    def _fail(self, report: CycleReport, result: DeliveryResult) -> None:
        error = result.failure
        assert error is not None
        report.error = f"{type(error).__name__}: {error.description}" + (
            f" (HTTP {error.http_status}, code {error.api_code})" if error.http_status else ""
        )
        if isinstance(error, AuthError):
            report.outcome = "auth_error"
            self._auth_retry_at = time.monotonic() + self._auth_backoff.total_seconds()
            self._auth_backoff = min(self._auth_backoff * 2, AUTH_BACKOFF_MAX)
        elif isinstance(error, ConfigurationError):
            report.outcome = "config_error"
            self.stopped = report.error
            log.error("sync_stopped", reason=report.error, action="fix the config and reload")
        else:
            report.outcome = "failing"

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
        state = {
            "ok": "ok",
            "paused": "paused",
            "auth_error": "auth_error",
            "skipped": None,
        }.get(report.outcome, "failing")
        # Backlog after every cycle the source can answer, failed ones included: rows pile
        # up while the API is down. Not when the cycle failed before the source gave a bound
        # (the source itself may be what failed; asking again would only wait again).
        source_failed = report.outcome == "failing" and report.bound is None
        if report.kind == "sync" and state not in (None, "paused") and not source_failed:
            try:
                report.backlog = self.reader.backlog(self.state.cursor(name))
            except (SourceError, sa.exc.DBAPIError):
                report.backlog = None
        # Metrics before the state database, which may be what failed this cycle.
        self.metrics.cycle(name, report.duration_s, "ok" if report.outcome == "ok" else "failed")
        if state is not None:
            self.metrics.set_state(name, "config_error" if report.outcome == "config_error" else state)
            if state == "ok":
                self.metrics.set_last_success(name, datetime.now(UTC))
            if report.backlog is not None:
                self.metrics.set_backlog(name, report.backlog)
            self.state.set_state(name, state, error=report.error, backlog=report.backlog)
            self.metrics.set_open_dead_letters(name, self.state.open_dead_letter_count(name))
        elif (stored := self.state.sync_status(name)) is not None:  # another syncd runs it: show its progress
            self.metrics.show_stored(stored)
        if report.outcome not in ("ok", "paused", "skipped"):
            level = "error"
        elif report.dead_lettered:
            level = "warning"  # rows that need someone's attention
        else:
            level = "debug" if report.idle else "info"
        getattr(log, level)("cycle", **report.summary())


class _Committer:
    """Writes answered batches to the state database on a thread of its own, in order.

    The database does its work (SQLite releases the GIL while it writes) while the sync
    thread reads and maps the next batches. Commits still happen only after the ACK and
    in read order; the queue is short, so the state never falls far behind, and
    `close()` waits for the last commit and re-raises any failure (LeaseLost included).
    When commits queue up (a backfill), the waiting ones go into one transaction: they
    were all acknowledged, and one transaction costs less than several.
    """

    def __init__(self, commit: Callable[..., None], *, name: str) -> None:
        self._commit = commit
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run,), name=name, daemon=True)
        self._thread.start()

    def commit(self, sync: str, **outcome: Any) -> None:
        """Queue `StateStore.commit_batch(sync, **outcome)`."""
        self._raise()
        self._queue.put({"sync": sync, **outcome})

    def flush(self) -> None:
        """Wait until everything queued so far is committed."""
        self._queue.join()
        self._raise()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        closing = False
        while not closing:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            taken = 1
            while not closing:  # take what else is waiting into the same transaction
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                taken += 1
                if more is None:
                    closing = True
                else:
                    item = _merged(item, more)
            if self._error is None:  # after a failure nothing more may commit
                try:
                    self._commit(**item)
                except BaseException as error:  # handed to the sync thread
                    self._error = error
            for _ in range(taken):
                self._queue.task_done()


def _merged(first: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    """Two consecutive commits of one sync as one: the later cursor and lease, everything else added up."""
    merged = dict(first)
    for name, value in then.items():
        if name in ("acked", "refreshed", "pushes", "dead_letters", "resolve_keys", "removed", "returned", "sent"):
            merged[name] = [*first.get(name, ()), *value]
        elif name == "feed_cursors":  # the later position of each feed
            merged[name] = list({**dict(first.get(name, ())), **dict(value)}.items())
        elif name != "cursor" or value is not None:
            merged[name] = value
    return merged


def _mapping_hash(sync: SyncConfig, reader: TableReader) -> str:
    """Identifies what stored fingerprints stand for: the mapping, its columns, its target."""
    fields = {name: spec.model_dump() for name, spec in sync.fields.items()}
    target = [sync.datastore_id, sync.feed_id]
    data = orjson.dumps({"fields": fields, "columns": reader.hash_columns, "target": target}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(data).hexdigest()[:32]


def _answered(
    pending: deque[tuple[Future[DeliveryResult], _Batch]], *, wait_for_one: bool
) -> list[tuple[Future[DeliveryResult], _Batch]]:
    """The answered batches at the front of `pending`, in order (waiting for the first if asked)."""
    answered = []
    while pending and (pending[0][0].done() or (wait_for_one and not answered)):
        pending[0][0].result()  # wait
        answered.append(pending.popleft())
    return answered


def _add(value: Any, delta: timedelta) -> Any:
    if isinstance(value, str):  # SQLite's canonical text form
        return (datetime.fromisoformat(value) + delta).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    return value + delta


def _before(value: Any, target: Any) -> bool:
    return value is not None and value < target


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

