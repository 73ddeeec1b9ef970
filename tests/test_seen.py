"""SeenKeys: a reconcile pass's keys in fixed memory (syncd/seen.py)."""

from __future__ import annotations

import uuid

from syncd.seen import MAX_BITS, SeenKeys


def test_a_key_the_pass_read_is_never_reported_unseen() -> None:
    keys = [str(uuid.uuid4()) for _ in range(50_000)] + [str(n) for n in range(50_000)]
    seen = SeenKeys(len(keys))
    seen.add(keys)
    assert seen.unseen(keys) == []


def test_keys_the_pass_did_not_read_are_reported_but_for_a_small_share() -> None:
    read = [str(n) for n in range(100_000)]
    gone = [str(n) for n in range(100_000, 110_000)]
    seen = SeenKeys(len(read) + len(gone))
    seen.add(read)
    unseen = seen.unseen(read + gone)
    assert set(unseen) <= set(gone)
    assert len(unseen) >= 0.999 * len(gone)  # two bits per key: about 1 in 4,000 is missed


def test_each_pass_misses_other_keys() -> None:
    """A key taken for seen by chance in one pass is found by the next (a new multiplier)."""
    read = [str(n) for n in range(20_000)]
    gone = [f"gone-{n}" for n in range(20_000)]
    missed = []
    for _ in range(2):
        seen = SeenKeys(40)  # far too small on purpose: many collisions
        seen.add(read)
        missed.append(set(gone) - set(seen.unseen(gone)))
    assert missed[0] and missed[1] and missed[0] != missed[1]


def test_memory_stays_bounded() -> None:
    assert len(SeenKeys(100_000_000)._bits) * 8 == MAX_BITS
