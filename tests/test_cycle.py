"""The sync cycle's rules (DESIGN.md §2, §3, §5, §6), one test each, over in-memory fakes.

No database and no HTTP server: the model, the state and the API are the fakes of
`tests/fakes.py`; the cycle, the mapping and the response-code policy (`Deliverer`) are the
real ones. The end-to-end tests (test_pipeline, test_reliability, ...) run the same rules
over real databases and the simulator.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any

import pytest

from syncd import cycle
from syncd.config import ApiConfig, SyncConfig
from syncd.cycle import CycleReport, SyncRunner
from syncd.metrics import Metrics
from syncd.pipeline import _MERGE, BatchOutcome
from syncd.state import StateStore
from syncd.values import Cursor

from .fakes import Crash, FakeApi, FakeFeed, FakeSource, FakeState

FIELDS = {"id": "id", "msisdn": {"column": "phone", "required": True}, "firstname": "first_name"}


@dataclass
class Sync:
    runner: SyncRunner
    source: FakeSource
    state: FakeState
    api: FakeApi

    def cycle(self) -> CycleReport:
        return self.runner.run_cycle()

    def restart(self) -> Sync:
        """A new process on the same model, state and API."""
        self.state.crash_after = None
        runner = SyncRunner(
            self.runner.sync,
            reader=self.source,
            state=self.state,
            client=self.api,
            api=self.runner.api,
            metrics=Metrics(),
            lease=timedelta(seconds=60),
        )
        return Sync(runner, self.source, self.state, self.api)


def make_sync(
    rows: int = 0,
    *,
    batch: int = 500,
    in_flight: int = 2,
    attempts: int = 3,
    filter: Any = None,
    **options: Any,
) -> Sync:
    sync = SyncConfig(
        name="contacts",
        source="crm",
        table="contacts",
        key="id",
        watermark="updated_at",
        datastore_id="1466",
        feed_id="1499",
        fields=options.pop("fields", FIELDS),
        filter="active = 1" if filter else None,
        **options,
    )
    api_config = ApiConfig(
        url="http://api.invalid/add",
        token="unused",  # the fake API has its own key
        max_in_flight=in_flight,
        max_batch_records=batch,
        max_attempts=attempts,
        backoff_base_s=0.001,
        backoff_max_s=0.001,
    )
    source = FakeSource(sync.columns, filter=filter)
    source.feeds = [(feed, FakeFeed()) for feed in sync.changes]
    for n in range(1, rows + 1):
        source.put(n, n, phone=f"+4479460{n:05d}", first_name=f"name {n}", active=1)
    state, api = FakeState(), FakeApi()
    runner = SyncRunner(
        sync, reader=source, state=state, client=api, api=api_config, metrics=Metrics(), lease=timedelta(seconds=60)
    )
    return Sync(runner, source, state, api)


# -- §2 Only deltas are pushed


def test_a_row_whose_payload_is_unchanged_is_not_sent_again():
    sync = make_sync(3)
    assert sync.cycle().sent == 3
    sync.source.put(2, 10, phone="+447946000002", first_name="name 2")  # touched, same values

    report = sync.cycle()

    assert (report.rows_read, report.unchanged, report.sent) == (1, 1, 0)
    assert len(sync.api.requests) == 1  # the first cycle's only
    assert sync.state.cursor_ == Cursor(10, 2)  # the watermark still moves past it


# -- §3 State advances only after the ACK


def test_watermark_digests_and_push_record_are_committed_together_after_the_ack():
    sync = make_sync(2)
    cursors_while_sending: list[Cursor | None] = []
    sync.api.on_request = lambda request: cursors_while_sending.append(sync.state.cursor_)

    sync.cycle()

    assert cursors_while_sending == [None]
    [commit] = [c for c in sync.state.commits if c.acked]
    assert commit.cursor == Cursor(2, 2)
    assert [key for key, _, _ in commit.acked] == ["1", "2"]
    assert [(p.outcome, p.trans_id) for p in commit.pushes] == [("ack", "t-1")]


def test_batches_commit_in_read_order_even_when_a_later_ack_comes_first():
    sync = make_sync(2, batch=1, in_flight=2)
    sync.api.hold("1", until="2")  # the second batch's ACK arrives first

    sync.cycle()

    assert sync.api.acked_keys == ["2", "1"]
    acked: set[str] = set()
    for commit in sync.state.commits:
        acked.update(key for key, _, _ in commit.acked)
        if commit.cursor is not None:  # never past a batch that is not acknowledged yet
            assert {str(n) for n in range(1, commit.cursor.key + 1)} <= acked
    assert sync.state.cursor_ == Cursor(2, 2)


def test_a_failed_batch_holds_the_watermark_before_it_and_later_acks_keep_their_digests():
    sync = make_sync(1, batch=1, in_flight=2, attempts=2)
    assert sync.cycle().outcome == "ok"  # the first backfill; what follows is read in watermark order
    for n in range(2, 7):
        sync.source.put(n, n, phone=f"+4479460{n:05d}", first_name=f"name {n}")
    sync.api.fail = {"3": (500, 500)}

    report = sync.cycle()

    assert report.outcome == "failing"
    assert sync.state.cursor_ == Cursor(2, 2)
    assert "3" not in sync.state.digests
    assert {key for request in sync.api.requests for key in request.keys} == {"1", "2", "3", "4"}  # none after it
    sync.api.fail = {}
    assert sync.cycle().outcome == "ok"
    assert sync.state.cursor_ == Cursor(6, 6)
    assert sorted(sync.api.acked_keys) == ["1", "2", "3", "4", "5", "6"]  # 4 landed once: its digest was kept


def test_a_first_backfill_sets_the_watermark_once_at_its_end_and_a_failed_one_resends_nothing():
    """Read in key order, a first backfill cannot move the watermark batch by batch: it moves
    after the last batch, to the newest row below the bound. One that fails keeps the digests
    of what landed, so the next cycle (in watermark order) sends only the rest."""
    sync = make_sync(5, batch=1, in_flight=2, attempts=2)
    sync.source.put(1, 9, phone="+447946000001", first_name="newest")  # key order is not watermark order
    sync.api.fail = {"2": (500, 500)}
    cursors: list[Cursor | None] = []
    sync.api.on_request = lambda request: cursors.append(sync.state.cursor_)

    failed = sync.cycle()

    assert failed.outcome == "failing"
    assert set(cursors) == {None} and sync.state.cursor_ is None
    assert set(sync.state.digests) == {"1", "3"}  # 2 failed, 3 landed beside it, nothing after
    sync.api.fail = {}
    assert sync.cycle().outcome == "ok"
    assert sync.state.cursor_ == Cursor(9, 1)
    assert sorted(sync.api.acked_keys) == ["1", "2", "3", "4", "5"]  # each landed once


def test_a_crash_resends_only_what_was_acknowledged_and_not_yet_committed():
    sync = make_sync(30, batch=1, in_flight=2)
    sync.state.crash_after = 3

    with pytest.raises(Crash):
        sync.cycle()
    acked_before = set(sync.api.acked_keys)
    committed = set(sync.state.digests)
    sync = sync.restart()
    assert sync.cycle().outcome == "ok"

    acked = sync.api.acked_keys
    assert sorted(set(acked), key=int) == [str(n) for n in range(1, 31)]  # nothing lost
    resent = {key for key in acked if acked.count(key) > 1}
    assert resent == acked_before - committed
    # DESIGN §3: at most the in-flight batches (2 of 1 record); a batch is in flight until committed.
    assert 0 < len(resent) <= 2


def test_a_batch_is_in_flight_until_committed_also_when_answers_come_together():
    """DESIGN §3 again, when one commit carries several answered batches: sent and not yet
    committed never exceeds max_in_flight (counting outcomes instead of batches let a third out)."""
    sync = make_sync(12, batch=1, in_flight=2)
    for n in range(1, 12, 2):
        sync.api.hold(str(n), until=str(n + 1))  # answers come in pairs: one outcome of two batches
    commit_batch = sync.state.commit_batch

    def slow_commit(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.05)
        return commit_batch(*args, **kwargs)

    sync.state.commit_batch = slow_commit  # type: ignore[method-assign]
    uncommitted: list[int] = []  # at each request: batches sent (this one included) and not committed
    sync.api.on_request = lambda request: uncommitted.append(len(sync.api.requests) - len(sync.state.digests))

    assert sync.cycle().outcome == "ok"
    assert len(sync.api.acked_keys) == 12
    assert max(uncommitted) <= 2


def test_one_key_is_never_twice_in_flight():
    sync = make_sync(40, batch=3, in_flight=4)
    sync.cycle()
    for round_ in range(3):  # every key changes between cycles, some twice
        for n in range(1, 41):
            sync.source.put(n, 100 * (round_ + 1) + n, phone=f"+4479460{n:05d}", first_name=f"v{round_} {n}")
        sync.cycle()

    assert sync.api.twice_in_flight == []
    assert len(sync.api.acked_keys) == 160


def test_a_lost_lease_sends_nothing_more_and_commits_nothing_more():
    sync = make_sync(10, batch=1, in_flight=2)

    def taken_over_after_three(request: Any) -> None:
        if len(sync.api.requests) == 3:
            assert sync.state.lease is not None
            sync.state.lease.lose("another syncd took this sync over")

    sync.api.on_request = taken_over_after_three

    report = sync.cycle()

    assert report.outcome == "skipped"
    assert len(sync.api.requests) == 3  # every later send proves the lease first
    assert sync.state.cursor_ is None or sync.state.cursor_.key < 3


# -- §5 Failures by code


@pytest.mark.parametrize("answer", [(429, 429), (500, 500), (503, 503), (200, 1010)], ids=str)
def test_throttling_and_server_errors_are_retried(answer):
    sync = make_sync(2)
    sync.api.script = [answer]

    report = sync.cycle()

    assert (report.outcome, report.sent) == ("ok", 2)
    assert [p.attempt for p in sync.state.pushes] == [1, 2]
    assert sync.state.cursor_ == Cursor(2, 2)


@pytest.mark.parametrize("refusal", [(401, 401), (200, 430), (200, 498)], ids=str)
def test_a_refused_key_stops_pushing_until_a_valid_key_is_in_the_token_file(refusal):
    sync = make_sync(2)
    sync.api.refusal = refusal
    sync.api.tokens.key = "revoked"

    assert sync.cycle().outcome == "auth_error"
    assert sync.state.status == "auth_error"
    assert sync.cycle().outcome == "auth_error"  # waits: no request with the same key
    assert len(sync.api.requests) == 1
    sync.api.tokens.key = "key-1"  # rotated

    report = sync.cycle()

    assert (report.outcome, report.sent) == ("ok", 2)
    assert sync.state.status == "ok"


def test_405_stops_the_sync_with_a_config_error():
    sync = make_sync(2)
    sync.api.script = [(405, 405)]

    report = sync.cycle()

    assert report.outcome == "config_error"
    assert "api.url" in (report.error or "")
    assert sync.cycle().outcome == "config_error"  # stays stopped until a reload
    assert len(sync.api.requests) == 1
    assert sync.state.cursor_ is None


@pytest.mark.parametrize("code", [1001, 1002, 499, 413])
def test_rejected_records_are_isolated_and_dead_lettered_and_the_rest_is_delivered(code):
    sync = make_sync(5)
    sync.api.reject, sync.api.reject_code = {"2", "4"}, code

    report = sync.cycle()

    assert report.outcome == "ok"
    assert sorted(sync.api.acked_keys) == ["1", "3", "5"]
    assert sorted(sync.state.open_letters) == ["2", "4"]
    assert sync.state.open_letters["2"].reason.startswith("rejected by the API")
    assert sync.state.open_letters["2"].api_code == code
    assert sync.state.cursor_ == Cursor(5, 5)


# -- §6 Bad rows never block the feed


def test_an_invalid_row_is_dead_lettered_without_an_api_call():
    sync = make_sync()
    sync.source.put(1, 1, phone=None, first_name="no phone")

    report = sync.cycle()

    assert report.dead_lettered == 1
    assert sync.api.requests == []
    assert "msisdn" in sync.state.open_letters["1"].reason
    assert sync.state.cursor_ == Cursor(1, 1)


def test_a_fixed_row_resolves_its_dead_letter():
    sync = make_sync()
    sync.source.put(1, 1, phone=None, first_name="no phone")
    sync.cycle()
    sync.source.put(1, 2, phone="+447946000001", first_name="fixed")

    sync.cycle()

    assert sync.api.acked_keys == ["1"]
    assert sync.state.open_letters == {}
    assert sync.state.resolved == ["1"]


# -- models: duplicate keys and removals


def test_a_key_the_model_holds_twice_is_dead_lettered_and_neither_row_is_sent():
    sync = make_sync(2)
    sync.source.key_is_unique = False  # a view or a query
    sync.source.add(2, 3, phone="+447946000099", first_name="second row of 2")

    sync.cycle()

    assert sync.api.acked_keys == ["1"]
    assert "duplicate key" in sync.state.open_letters["2"].reason


def test_an_acknowledged_row_that_fails_the_filter_is_recorded_as_removed():
    sync = make_sync(2, filter=lambda row: row["active"] == 1, fields={**FIELDS, "active": "active"})
    sync.cycle()
    sync.source.put(1, 5, phone="+447946000001", first_name="name 1", active=0)

    report = sync.cycle()

    assert report.removed == 1
    assert sync.state.removals == {"1": "filter"}
    assert "1" not in sync.state.digests  # when it comes back, it is sent again


def test_a_removed_key_is_pushed_as_the_removed_record():
    sync = make_sync(
        1,
        filter=lambda row: row["active"] == 1,
        fields={**FIELDS, "active": "active"},
        removed={"id": {"sent": "id"}, "status": "unsubscribed"},
    )
    sync.cycle()
    sync.source.put(1, 5, phone="+447946000001", first_name="name 1", active=0)

    sync.cycle()

    assert sync.api.records[-1] == {"id": 1, "status": "unsubscribed"}
    assert sync.state.removals == {"1": "filter"}


def test_a_change_feed_re_reads_the_keys_it_names_and_its_cursor_moves_only_after_their_ack():
    sync = make_sync(3, attempts=1, changes=[{"table": "emails", "key": "contact_id", "watermark": "changed"}])
    emails = sync.source.feeds[0][1]
    emails.rows = [(1, 1)]
    sync.cycle()  # the backfill reads the whole model: the feed starts at its end
    assert sync.state.feed_cursors == {"emails": Cursor(1, 1)}
    sync.source.put(2, 2, phone="+447946000002", first_name="from the other table")  # the model's watermark stays
    emails.rows.append((2, 7))
    sync.api.fail = {"2": (500, 500)}

    assert sync.cycle().outcome == "failing"
    assert sync.state.feed_cursors == {"emails": Cursor(1, 1)}
    sync.api.fail = {}
    assert sync.cycle().outcome == "ok"

    assert sync.api.records[-1]["firstname"] == "from the other table"
    assert sync.state.feed_cursors == {"emails": Cursor(7, 2)}


def test_a_change_feeds_keys_go_out_each_once_in_batches_in_flight_together():
    """One read of a feed names each key twice; each key is sent once, in batches of
    max_batch_records that are in flight together (no wait for a commit between them)."""
    sync = make_sync(6, batch=2, in_flight=3, changes=[{"table": "emails", "key": "contact_id", "watermark": "changed"}])
    emails = sync.source.feeds[0][1]
    assert sync.cycle().sent == 6  # the backfill
    for n in range(1, 7):  # changed in the other table only: the model's watermark stays
        sync.source.put(n, n, phone=f"+4479460{n:05d}", first_name=f"changed {n}")
        emails.rows += [(n, 10 + n), (n, 20 + n)]
    sync.api.hold("1", until="3")  # the batch with key 1 is answered only after the one with key 3
    before = len(sync.api.requests)

    report = sync.cycle()

    assert (report.outcome, report.sent) == ("ok", 6)
    requests = [request.keys for request in sync.api.requests[before:]]
    assert sorted(key for keys in requests for key in keys) == ["1", "2", "3", "4", "5", "6"]
    assert all(len(keys) <= 2 for keys in requests)
    assert sync.api.twice_in_flight == []
    assert sync.state.feed_cursors == {"emails": Cursor(26, 6)}


# -- the commit


def test_every_commit_parameter_is_a_batch_outcome_field():
    parameters = set(inspect.signature(StateStore.commit_batch).parameters) - {"self", "sync"}
    assert parameters == {f.name for f in fields(BatchOutcome)}


def test_every_batch_outcome_field_says_how_two_commits_merge():
    assert set(_MERGE) == {f.name for f in fields(BatchOutcome)}


def test_merging_two_outcomes_keeps_the_later_position_and_adds_up_the_rest():
    first = BatchOutcome(cursor=Cursor(1, 1), acked=[("1", b"d", b"s")], feed_cursors=[("a", Cursor(1, 1))])
    then = BatchOutcome(cursor=None, acked=[("2", b"d", b"s")], feed_cursors=[("a", Cursor(2, 2)), ("b", Cursor(1, 1))])

    merged = first.then(then)

    assert merged.cursor == Cursor(1, 1)  # a batch without a position keeps the one before
    assert [key for key, _, _ in merged.acked] == ["1", "2"]
    assert dict(merged.feed_cursors) == {"a": Cursor(2, 2), "b": Cursor(1, 1)}


# -- a quiet sync (nothing past its watermark): one probe per cycle, §1 and §9 kept


def quiet_sync() -> Sync:
    sync = make_sync(2)
    sync.cycle()  # the backfill
    sync.cycle()  # an ok cycle that found nothing: quiet from here on
    return sync


def test_a_quiet_sync_still_sends_the_next_change():
    sync = quiet_sync()
    sync.source.put(3, 3, phone="+447946000003", first_name="name 3")

    assert sync.cycle().sent == 1
    assert sync.state.cursor_ == Cursor(3, 3)


def test_a_quiet_sync_renews_its_lease_without_a_full_cycle():
    sync = quiet_sync()
    commits, lease = len(sync.state.commits), sync.state.lease
    assert lease is not None
    lease.held_until = time.monotonic() + 1  # past half its 60 s

    report = sync.cycle()

    assert report.outcome == "ok"
    assert sync.state.lease is lease and len(sync.state.commits) == commits  # no full cycle
    assert lease.held_until > time.monotonic() + 30


def test_a_quiet_sync_runs_a_full_cycle_now_and_then(monkeypatch):
    sync = quiet_sync()
    lease = sync.state.lease
    monkeypatch.setattr(cycle, "QUIET_FULL_CYCLE_S", 0.0)

    sync.cycle()

    assert sync.state.lease is not lease  # the full cycle took the lease again
