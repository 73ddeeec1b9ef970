"""The sync cycle's machinery: batches on the wire, answers in read order, commits on a thread.

`cycle.py` decides what a batch is and what its answer means (the policy); this module
only moves batches through, with the ordering rules of DESIGN.md §3 that hold whatever
the batches carry:
- up to `max_in_flight` batches are sent and not yet committed while the next one is read
  (a batch counts until its commit, not its ACK: a crash resends at most those);
- answers are handed back in read order, never out of it, even when a later batch's
  ACK comes first, and each one says whether any batch up to it failed (from the first
  failure on, no position may be committed and no new batch is sent);
- what the policy makes of them (a `BatchOutcome`) is committed on a thread of its own,
  in that order, with the lease as fence;
- a lost lease drops what was read under it: queued batches never start;
- a big cycle's reading moves to a child process (`offload.py`) once it is ready, the
  in-process read closed first, in the same order (`handing_over`).
"""

from __future__ import annotations

import contextvars
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from datetime import timedelta
from typing import Any, Generic, Protocol, TypeVar

import structlog

from syncd.delivery import DeliveryResult, Fence
from syncd.source import SourceError
from syncd.values import Cursor, DeadLetter, PushRecord

log = structlog.get_logger(__name__)

__all__ = ["Answer", "BatchOutcome", "Committer", "CycleLease", "Handover", "Outgoing", "Pipeline", "handing_over"]


class CycleLease(Fence, Protocol):
    """The hold on a sync a cycle runs under (`state.Lease`)."""

    lost: str | None  # why, once lost
    ttl: timedelta
    held_until: float  # time.monotonic() until which the lease is provably ours

    def keep(self) -> Callable[[], None]: ...  # renews in the background; returns the stopper
    def renew(self) -> None: ...  # now; a state database error leaves the lease as it was


class Outgoing(Protocol):
    """What the machinery needs of a batch: its records, and whether to stop and commit after it."""

    @property
    def encoded(self) -> Sequence[bytes]: ...  # none: answered at once, no request

    @property
    def barrier(self) -> bool: ...  # answer and commit everything before reading on


B = TypeVar("B", bound=Outgoing)

def _added(first: list[Any], then: list[Any]) -> list[Any]:
    return [*first, *then]


def _later(first: Any, then: Any) -> Any:
    return then


def _later_if_set(first: Any, then: Any) -> Any:
    return first if then is None else then


def _later_per_feed(first: list[tuple[str, Cursor]], then: list[tuple[str, Cursor]]) -> list[tuple[str, Cursor]]:
    return list({**dict(first), **dict(then)}.items())


@dataclass(slots=True)
class BatchOutcome:
    """One state transaction's worth of answered batches: `StateStore.commit_batch`'s arguments.

    A new commit parameter is a field here *and* a rule in `_MERGE` (how two consecutive
    outcomes combine); the tests fail until both exist. Indexes into one batch (a per-key
    push attribution, say) must be offset when outcomes are added up, not just joined.
    """

    cursor: Cursor | None = None  # the watermark's new position; None leaves it
    acked: list[tuple[str, bytes, bytes]] = field(default_factory=list)  # (key, digest, source fingerprint)
    acked_by: list[PushRecord] = field(default_factory=list)  # the ACK push of each of `acked`
    refreshed: list[tuple[str, bytes]] = field(default_factory=list)  # unchanged payload, new fingerprint
    pushes: list[PushRecord] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    resolve_keys: list[str] = field(default_factory=list)
    lease: Any = None  # the fence (state.Lease); renewed by the commit
    progress: tuple[int, int] | None = None  # the running cycle's (rows read, records sent)
    feed_cursors: list[tuple[str, Cursor]] = field(default_factory=list)
    removed: list[tuple[str, str]] = field(default_factory=list)  # (key, why it left the model)
    returned: list[str] = field(default_factory=list)  # acknowledged keys whose removal is over
    sent: list[tuple[str, str]] = field(default_factory=list)  # (key, JSON kept for [syncs.removed])

    def then(self, later: BatchOutcome) -> BatchOutcome:
        """This outcome and the next one as one transaction (both were acknowledged, in this order)."""
        merged = {f.name: _MERGE[f.name](getattr(self, f.name), getattr(later, f.name)) for f in fields(self)}
        return BatchOutcome(**merged)

    def writes_nothing(self) -> bool:
        """Nothing but the lease and the progress would change."""
        return all(not getattr(self, f.name) for f in fields(self) if f.name not in ("lease", "progress"))

    def arguments(self) -> dict[str, Any]:
        """As keyword arguments of `StateStore.commit_batch`."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


# How two consecutive outcomes combine, field by field.
_MERGE: dict[str, Callable[[Any, Any], Any]] = {
    "cursor": _later_if_set,  # a batch without a position keeps the one before
    "acked": _added,
    "acked_by": _added,
    "refreshed": _added,
    "pushes": _added,
    "dead_letters": _added,
    "resolve_keys": _added,
    "lease": _later,
    "progress": _later,
    "feed_cursors": _later_per_feed,
    "removed": _added,
    "returned": _added,
    "sent": _added,
}


@dataclass(slots=True)
class Answer(Generic[B]):
    """A batch and what became of it, handed back in read order."""

    batch: B
    result: DeliveryResult
    in_order: bool  # neither this batch nor one read before it failed: its position may be committed


class Pipeline(Generic[B]):
    """Runs one sync's batches through the API and the state database; one per sync, reused by its cycles."""

    def __init__(
        self,
        name: str,
        *,
        max_in_flight: int,
        commit: Callable[[BatchOutcome], None],
        renew_every: float,
    ) -> None:
        self.name = name
        self.max_in_flight = max_in_flight
        self._commit = commit
        self._renew_every = renew_every  # an outcome that writes nothing is committed only this often
        self._committed_at = 0.0

    def run(
        self,
        batches: Iterable[B],
        *,
        send: Callable[[B], DeliveryResult],
        settle: Callable[[list[Answer[B]]], BatchOutcome],
        lease: CycleLease,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> DeliveryResult | None:
        """Send `batches`, hand their answers to `settle` in read order, commit what it returns.

        Returns the first failed batch's result (None: none failed). After a failure nothing
        more is sent; what is already on the wire still lands and is settled, unless the lease
        was lost. Every answered batch is committed before this returns.
        """
        pending: deque[tuple[Future[DeliveryResult], B]] = deque()
        run = _Run(self, settle, lease)
        committer = Committer(self._commit, name=f"commit-{self.name}")
        stop_keeping = lease.keep()  # renews every quarter lease, however long a read or a retry takes
        with ThreadPoolExecutor(self.max_in_flight, thread_name_prefix=f"push-{self.name}") as pool:
            try:
                for batch in batches:
                    lease.check()  # lost: this batch and the rest of the cycle are dropped
                    # Sent and not yet committed stays within max_in_flight: what a crash resends.
                    committer.wait_uncommitted(at_most=self.max_in_flight - 1 - len(pending))
                    pending.append((_submit(pool, send, batch), batch))
                    full = len(pending) >= self.max_in_flight
                    if full or pending[0][0].done():
                        run.settle(_answered(pending, wait_for_one=full), committer)
                    if batch.barrier:  # what comes next compares with what this committed
                        while pending and run.failure is None:
                            run.settle(_answered(pending, wait_for_one=True), committer)
                        committer.flush()
                    if run.failure is not None or should_stop():
                        break
            finally:
                try:
                    # What is on the wire still lands; its digests are kept. Not under a lost lease.
                    while pending and lease.lost is None:
                        run.settle(_answered(pending, wait_for_one=True), committer)
                finally:
                    for future, _ in pending:  # lost: queued batches never start, running ones fail their fence
                        future.cancel()
                    stop_keeping()
                    committer.close()  # every answered batch is committed before the cycle ends
        return run.failure

    def _due(self, outcome: BatchOutcome) -> bool:
        """Whether to commit: it writes something, or the lease is due a renewal."""
        if outcome.writes_nothing() and time.monotonic() - self._committed_at <= self._renew_every:
            return False
        self._committed_at = time.monotonic()
        return True


class _Run(Generic[B]):
    """One `Pipeline.run`: the first failure, and answers turned into commits."""

    def __init__(self, pipeline: Pipeline[B], settle: Callable[[list[Answer[B]]], BatchOutcome], lease: CycleLease):
        self.pipeline = pipeline
        self.policy = settle
        self.lease = lease
        self.failure: DeliveryResult | None = None

    def settle(self, answered: list[tuple[Future[DeliveryResult], B]], committer: Committer) -> None:
        answers = []
        for future, batch in answered:
            result = future.result()
            if not result.complete and self.failure is None:
                self.failure = result
            answers.append(Answer(batch, result, in_order=self.failure is None))
        outcome = self.policy(answers)
        if self.pipeline._due(outcome):
            outcome.lease = self.lease  # fenced by owner and generation; renews the lease
            committer.commit(outcome, batches=len(answers))


def _submit(pool: ThreadPoolExecutor, send: Callable[[B], DeliveryResult], batch: B) -> Future[DeliveryResult]:
    if not batch.encoded:
        done: Future[DeliveryResult] = Future()
        done.set_result(DeliveryResult())
        return done
    context = contextvars.copy_context()  # keep `sync=` on the push thread's log lines
    return pool.submit(context.run, send, batch)


def _answered(
    pending: deque[tuple[Future[DeliveryResult], B]], *, wait_for_one: bool
) -> list[tuple[Future[DeliveryResult], B]]:
    """The answered batches at the front of `pending`, in order (waiting for the first if asked)."""
    answered: list[tuple[Future[DeliveryResult], B]] = []
    while pending and (pending[0][0].done() or (wait_for_one and not answered)):
        pending[0][0].result()  # wait
        answered.append(pending.popleft())
    return answered


class Committer:
    """Writes outcomes to the state database on a thread of its own, in order.

    The database does its work (SQLite releases the GIL while it writes) while the sync
    thread reads and maps the next batches. Commits still happen only after the ACK and
    in read order. It counts the batches queued or being written (one outcome may carry
    several): the pipeline waits on that count (`wait_uncommitted`) before it sends
    another batch, so the state never falls more than `max_in_flight` batches behind, and
    `flush()` waits for it to reach 0.
    `close()` waits for the last commit and re-raises any failure (LeaseLost included).
    After a failed commit nothing more is written, not even batches answered later: their
    position lies past the batches that failed to commit.
    When commits queue up (a backfill), the waiting ones go into one transaction: they
    were all acknowledged, and one transaction costs less than several.
    """

    def __init__(self, commit: Callable[[BatchOutcome], None], *, name: str) -> None:
        self._commit = commit
        self._queue: queue.Queue[tuple[BatchOutcome, int] | None] = queue.Queue()
        self._uncommitted = 0  # batches queued or being written
        self._committed = threading.Condition()
        self._error: BaseException | None = None
        self._raised = False
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run,), name=name, daemon=True)
        self._thread.start()

    def commit(self, outcome: BatchOutcome, *, batches: int = 1) -> None:
        """Queue one outcome, the answer to `batches` batches."""
        self._raise()
        with self._committed:
            self._uncommitted += batches
        self._queue.put((outcome, batches))

    def wait_uncommitted(self, *, at_most: int) -> None:
        """Wait until at most `at_most` batches are queued or being written (or a commit failed)."""
        with self._committed:
            self._committed.wait_for(lambda: self._uncommitted <= at_most or self._error is not None)
        self._raise()

    def flush(self) -> None:
        """Wait until everything queued so far is committed."""
        self.wait_uncommitted(at_most=0)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise()

    def _raise(self) -> None:
        """Hand a failure to the sync thread, once; the committer stays failed (nothing more is written)."""
        if self._error is not None and not self._raised:
            self._raised = True
            raise self._error

    def _run(self) -> None:
        closing = False
        while not closing:
            first = self._queue.get()
            if first is None:
                return
            item, taken = first
            while not closing:  # take what else is waiting into the same transaction
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    closing = True
                else:
                    item, taken = item.then(more[0]), taken + more[1]
            if self._error is None:  # after a failure nothing more may commit
                try:
                    self._commit(item)
                except BaseException as error:  # handed to the sync thread
                    self._error = error
            with self._committed:
                self._uncommitted -= taken
                self._committed.notify_all()


class Handover(Protocol):
    """A child process taking over the rest of a cycle's reading (`offload.Offload`)."""

    def ready(self) -> bool: ...  # started and connected; raises SourceError when it cannot be
    def close(self) -> None: ...


H = TypeVar("H", bound=Handover)


def handing_over(
    reads: Iterator[Sequence[Any]],
    prepare: Callable[[Sequence[Any]], B],
    *,
    full: int,
    start: Callable[[B], H | None],
    rest: Callable[[H, B, int], Iterator[B]],
) -> Iterator[B]:
    """`prepare` each read, and hand the rest of the cycle to a child process once it is ready.

    `start(batch)` is asked once, after a first read of `full` rows (an idle or small cycle
    never pays for it), for a child to take over from that batch on; reading goes on here
    until the child is ready. Then the in-process read is closed (its transaction ends
    before the child's begins) and `rest(child, last batch)` yields what the child reads
    after it (and the rows read here). A child that fails before it is ready leaves the
    cycle in this process.
    """
    child: H | None = None
    handed_over = False
    read = 0
    last: B | None = None
    try:
        for rows in reads:
            last = prepare(rows)
            yield last
            if read == 0 and len(rows) >= full:
                child = start(last)
            read += len(rows)
            if child is not None:
                try:
                    handed_over = child.ready()
                except SourceError as error:  # not needed to go on: read on here
                    log.warning("offload_failed", reason=str(error), action="the cycle goes on in one process")
                    child.close()
                    child = None
            if handed_over:
                break
    finally:
        if isinstance(reads, Generator):
            reads.close()  # ends its read transaction before the child starts its own
        if child is not None and not handed_over:
            child.close()
    if child is not None and handed_over:
        assert last is not None
        yield from rest(child, last, read)
