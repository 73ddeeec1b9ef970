"""The cycle's committer (`pipeline.Committer`): answered batches reach the state in order, none lost, none twice.

The cycle tests drive whole cycles; here the committer is held back on purpose, so
commits queue up behind it the way they do in a fast backfill.
"""

from __future__ import annotations

import threading

import pytest

from syncd.pipeline import BatchOutcome, Committer
from syncd.state import Cursor, DeadLetter, LeaseLost


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
