"""The cycle's machinery (`pipeline.py`) on its own: the committer and the hand-over to a child.

The cycle tests drive whole cycles; here the committer is held back on purpose, so
commits queue up behind it the way they do in a fast backfill, and the child process is
a stand-in that becomes ready when told.
"""

from __future__ import annotations

import threading

import pytest

from syncd.errors import LeaseLost
from syncd.pipeline import BatchOutcome, Committer, handing_over
from syncd.source import SourceError
from syncd.values import Cursor, DeadLetter


def test_commits_that_queue_up_are_written_together_in_order():
    calls: list[BatchOutcome] = []
    first_started, release = threading.Event(), threading.Event()

    def commit(outcome: BatchOutcome) -> None:
        calls.append(outcome)
        first_started.set()
        release.wait(5)

    committer = Committer(commit, name="test-commit")
    committer.commit(BatchOutcome(cursor=Cursor("w1", 1), acked=[("1", b"d1", b"s1")], progress=(1, 1)))
    assert first_started.wait(5)
    committer.commit(BatchOutcome(cursor=Cursor("w2", 2), acked=[("2", b"d2", b"s2")], progress=(2, 2)))
    committer.commit(BatchOutcome(cursor=None, dead_letters=[DeadLetter(key="3", reason="bad")], progress=(3, 2)))
    committer.commit(BatchOutcome(cursor=Cursor("w4", 4), acked=[("4", b"d4", b"s4")], progress=(4, 3)))
    release.set()
    committer.close()

    assert len(calls) == 2  # the first alone, the three that waited for it in one transaction
    assert calls[0].cursor == Cursor("w1", 1)
    merged = calls[1]
    assert merged.cursor == Cursor("w4", 4)  # the newest position; a batch without one keeps it
    assert [key for key, _, _ in merged.acked] == ["2", "4"]
    assert [letter.key for letter in merged.dead_letters] == ["3"]
    assert merged.progress == (4, 3)


def test_after_a_failed_commit_nothing_more_is_written_and_the_error_surfaces_once():
    calls: list[BatchOutcome] = []

    def commit(outcome: BatchOutcome) -> None:
        calls.append(outcome)
        raise LeaseLost("s")

    committer = Committer(commit, name="test-commit")
    committer.commit(BatchOutcome(cursor=Cursor("w1", 1), acked=[("1", b"d", b"s")]))
    with pytest.raises(LeaseLost):
        for position in range(2, 50):  # the failure surfaces on a later call, or on close
            committer.commit(BatchOutcome(cursor=Cursor(f"w{position}", position), acked=[(str(position), b"d", b"s")]))
        committer.close()
    committer.commit(BatchOutcome(cursor=Cursor("w99", 99), acked=[("99", b"d", b"s")]))  # e.g. a batch still landing
    committer.close()
    assert len(calls) == 1


class Child:
    def __init__(self, ready_after: int, *, fails: bool = False) -> None:
        self.asked, self.ready_after, self.fails, self.closed = 0, ready_after, fails, False

    def ready(self) -> bool:
        self.asked += 1
        if self.fails:
            raise SourceError("cannot start")
        return self.asked >= self.ready_after

    def close(self) -> None:
        self.closed = True


def reads(rows: int, events: list[str]):
    try:
        for start in range(0, rows, 2):
            yield list(range(start, min(start + 2, rows)))
    finally:
        events.append("in-process read closed")


def test_a_big_cycle_goes_on_in_the_child_from_where_the_parent_stopped_in_order():
    events: list[str] = []
    child = Child(ready_after=2)

    def rest(handover: Child, last: list[int], read: int):
        events.append(f"child reads after {last[-1]} ({read} rows read here)")
        yield from ([n, n + 1] for n in range(last[-1] + 1, 10, 2))

    batches = list(handing_over(reads(10, events), list, full=2, start=lambda batch: child, rest=rest))

    assert [n for batch in batches for n in batch] == list(range(10))  # every row once, in order
    assert events == ["in-process read closed", "child reads after 3 (4 rows read here)"]


def test_a_small_cycle_never_starts_a_child_and_a_failing_one_leaves_the_cycle_here():
    started: list[list[int]] = []
    never = list(handing_over(reads(1, []), list, full=2, start=started.append, rest=None))  # type: ignore[arg-type]
    assert never == [[0]] and started == []

    child = Child(ready_after=1, fails=True)
    batches = list(handing_over(reads(6, []), list, full=2, start=lambda batch: child, rest=None))  # type: ignore[arg-type]
    assert [n for batch in batches for n in batch] == list(range(6))
    assert child.closed
