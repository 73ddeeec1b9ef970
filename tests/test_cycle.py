"""The sync cycle's committer: answered batches reach the state in order, none lost, none twice.

The pipeline tests drive whole cycles; here the committer is held back on purpose, so
commits queue up behind it the way they do in a fast backfill.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest

from syncd.cycle import _Committer
from syncd.state import Cursor, DeadLetter, LeaseLost


def test_commits_that_queue_up_are_written_together_in_order():
    calls: list[dict[str, Any]] = []
    first_started, release = threading.Event(), threading.Event()

    def commit(**outcome: Any) -> None:
        calls.append(outcome)
        first_started.set()
        release.wait(5)

    committer = _Committer(commit, name="test-commit")
    committer.commit("s", cursor=Cursor("w1", 1), acked=[("1", b"d1", b"s1")], pushes=["p1"], lease_ttl=timedelta(1))
    assert first_started.wait(5)
    committer.commit("s", cursor=Cursor("w2", 2), acked=[("2", b"d2", b"s2")], pushes=["p2"], lease_ttl=timedelta(2))
    committer.commit("s", cursor=None, acked=[], dead_letters=[DeadLetter(key="3", reason="bad")], lease_ttl=timedelta(3))
    committer.commit("s", cursor=Cursor("w4", 4), acked=[("4", b"d4", b"s4")], pushes=["p4"], lease_ttl=timedelta(4))
    release.set()
    committer.close()

    assert len(calls) == 2  # the first alone, the three that waited for it in one transaction
    assert calls[0]["cursor"] == Cursor("w1", 1)
    merged = calls[1]
    assert merged["sync"] == "s"
    assert merged["cursor"] == Cursor("w4", 4)  # the newest position; a batch without one keeps it
    assert [key for key, _, _ in merged["acked"]] == ["2", "4"]
    assert merged["pushes"] == ["p2", "p4"]
    assert [letter.key for letter in merged["dead_letters"]] == ["3"]
    assert merged["lease_ttl"] == timedelta(4)


def test_after_a_failed_commit_nothing_more_is_written_and_the_error_surfaces():
    calls: list[dict[str, Any]] = []

    def commit(**outcome: Any) -> None:
        calls.append(outcome)
        raise LeaseLost(outcome["sync"])

    committer = _Committer(commit, name="test-commit")
    committer.commit("s", cursor=Cursor("w1", 1), acked=[("1", b"d", b"s")])
    with pytest.raises(LeaseLost):
        for position in range(2, 50):  # the failure surfaces on a later call, or on close
            committer.commit("s", cursor=Cursor(f"w{position}", position), acked=[(str(position), b"d", b"s")])
        committer.close()
    assert len(calls) == 1
