"""Scale-out on a PostgreSQL state database (DESIGN.md §9): one daemon runs a sync at a time,
another takes it over, and a daemon that lost its lease sends nothing more."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from syncd.cli import main
from syncd.config import load_config
from syncd.errors import LeaseHeldError, LeaseLost, StateError
from syncd.runtime import Runtime
from syncd.simulator import SimulatorConfig, start_in_thread
from syncd.state import Lease, StateStore
from syncd.status import StateUnavailable, collect_status

from .crm import TOKEN, Crm, contact, pushed_records, wait_for, write_config
from .test_delivery import Api, deliverer, records, response

OTHER_TOKEN = "test-token-second-7d2b"  # the second daemon's key: the simulator tells their requests apart
LEASE = 'lease = "3s"'  # api.timeout_s = 1 below: 3 s > 1 s + the 1 s margin


@pytest.fixture
def api_config() -> SimulatorConfig:
    return SimulatorConfig(tokens=(TOKEN, OTHER_TOKEN), key_attribute="accountid")


@pytest.fixture
def crm(postgres_url) -> Iterator[Crm]:
    crm = Crm(postgres_url)
    yield crm
    crm.dispose()


def scale_out_config(
    directory: Path, crm: Crm, api: Any, *, token: str = TOKEN, lease: str = LEASE, **kwargs: Any
) -> Path:
    """One daemon's config: CRM and state on PostgreSQL, a short lease, its own API key."""
    directory.mkdir(exist_ok=True)
    token_file = directory / "api-token"
    token_file.write_text(token + "\n")
    path = write_config(
        directory / "syncd.toml", source_url=crm.url, api_url=api.url, state_url=crm.url, token_file=token_file, **kwargs
    )
    text = path.read_text().replace('level = "warning"', 'level = "info"').replace("timeout_s = 5", "timeout_s = 1")
    path.write_text(text.replace("[state]\n", f"[state]\n{lease}\n"))
    return path


def sent_by(api: Any, key: str, *, after: float = 0.0) -> list[dict[str, Any]]:
    """The accepted requests sent with one daemon's key ("key#1" = TOKEN, "key#2" = OTHER_TOKEN)."""
    return [r for r in api.requests() if r["key"] == key and r["status"] == 200 and r["time"] > after]


def old(crm: Crm, hours: float) -> Any:
    """A watermark well in the past: the CRM shares its database with other tests, whose open
    transactions hold the read bound back (DESIGN.md §1); rows older than those are readable."""
    return crm.stamp(age=timedelta(hours=hours))


def stored_names(api: Any) -> dict[str, str]:
    return {record["accountid"]: record["firstname"] for record in api.records("1466")}


def test_a_sync_runs_on_one_daemon_and_moves_when_it_dies(crm, api, tmp_path):
    crm.insert([contact(i) for i in range(1, 41)], stamp=old(crm, 3))
    config = load_config(scale_out_config(tmp_path, crm, api, batch=10))
    first, second = Runtime.open(config), Runtime.open(config)
    try:
        assert first.runners["contacts"].run_cycle().outcome == "ok"
        skipped = second.runners["contacts"].run_cycle()
        assert skipped.outcome == "skipped" and "running on" in skipped.error
        assert pushed_records(api) == 40

        # The first daemon dies without releasing its lease; new rows arrive.
        crm.insert([contact(i) for i in range(41, 61)], stamp=old(crm, 2))
        report = wait_for(
            lambda: (r := second.runners["contacts"].run_cycle()).outcome == "ok" and r, what="the lease to run out"
        )
        assert report.sent == 20  # continues from the shared watermark
        assert pushed_records(api) == 60
        assert first.runners["contacts"].run_cycle().outcome == "skipped"  # and the first cannot come back
    finally:
        second.close()
        first.client.close()


@pytest.mark.parametrize("seed", [1, 2])  # where the pause falls
def test_an_owner_paused_past_its_lease_delivers_nothing_stale_when_it_resumes(crm, api, tmp_path, daemons, seed):
    """SIGSTOP mid-backfill (a paused VM) at a random point, rows change, another daemon takes
    over and sends the new values; after SIGCONT the first must not post the old values it had
    read, was writing or was retrying: the API ends with the newest value of every row."""
    rng = random.Random(seed)
    crm.insert([contact(i) for i in range(1, 601)], stamp=old(crm, 3))
    # Batches always on the wire, some throttled (waiting on Retry-After) or failed (retrying).
    api.set_faults(latency_s=0.05, throttle_rate=0.1, fail_rate=0.1, retry_after=1)
    first = daemons(scale_out_config(tmp_path / "a", crm, api, batch=10, in_flight=4))
    accepted = rng.randint(5, 35)
    wait_for(lambda: len(sent_by(api, "key#1")) >= accepted, timeout=60, what=f"{accepted} requests accepted")
    # The pause falls wherever its threads are then: reading, mapping, proving the lease, writing
    # a request, waiting for answers or on Retry-After. (A random instant, not a wait for an event.)
    time.sleep(rng.uniform(0, 0.1))
    first.signal(signal.SIGSTOP)
    api.set_faults(throttle_rate=0.0, fail_rate=0.0)
    crm.update(range(1, 601), bump=False, first_name="After", updated_at=old(crm, 2))
    daemons(scale_out_config(tmp_path / "b", crm, api, token=OTHER_TOKEN, batch=50))
    wait_for(
        lambda: set(stored_names(api).values()) == {"After"} and len(stored_names(api)) == 600,
        timeout=60,
        what="the second daemon to deliver every new value",
    )
    resumed = time.time()
    first.signal(signal.SIGCONT)
    # The cycle it was in ends without sending: it finds the lease taken over, or (paused inside a
    # state transaction) its session ended by the server; the lease then cannot be renewed either.
    interrupted = first.wait_event("cycle", timeout=30)
    assert interrupted["outcome"] in ("skipped", "failing") and interrupted["rows_read"] > 0

    assert sent_by(api, "key#1", after=resumed) == []  # not one request after the pause
    assert len(sent_by(api, "key#2")) > 0
    crm.update([7], bump=False, first_name="Later", updated_at=old(crm, 1))  # and the new owner goes on
    wait_for(lambda: stored_names(api)["acct-7"] == "Later", what="the new owner's next cycle")
    newest = {f"acct-{i}": "Later" if i == 7 else "After" for i in range(1, 601)}
    assert stored_names(api) == newest  # the API's last record of every row is the row's newest value


def test_a_stalled_state_transaction_neither_blocks_a_takeover_nor_lives_on(postgres_url):
    lease = timedelta(seconds=2)
    first, second = StateStore(postgres_url, lease=lease), StateStore(postgres_url, lease=lease)
    first.migrate()
    first.ensure_syncs(["contacts"])
    held = first.acquire_lease("contacts", lease)
    stalled = first.engine.connect()  # the first daemon, stopped inside a state transaction
    stalled.execute(sa.text("SELECT 1 FROM syncs WHERE name = 'contacts' FOR UPDATE"))
    pid = stalled.connection.driver_connection.info.backend_pid
    try:
        with pytest.raises(LeaseHeldError):  # held: answered at once ...
            second.acquire_lease("contacts", lease)
        with second.engine.connect() as conn:  # ... while the stalled session still holds the row
            state = conn.scalar(sa.text("SELECT state FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid})
        assert state == "idle in transaction"
        with pytest.raises(StateError, match="lock_timeout"):  # a write waits a bounded time, then says why
            held.renew()

        def takeover() -> Lease | None:
            try:
                return second.acquire_lease("contacts", lease)
            except LeaseHeldError:
                return None

        taken = wait_for(takeover, what="the takeover")
        assert taken.generation == held.generation + 1
        with pytest.raises(sa.exc.DBAPIError, match="idle-in-transaction"):  # the server ended it
            stalled.execute(sa.text("SELECT 1"))
    finally:
        stalled.invalidate()
        stalled.close()
        first.close()
        second.close()


def test_three_daemons_started_at_once_on_an_empty_state_database_all_run(crm, api, tmp_path, daemons):
    crm.insert([contact(i) for i in range(1, 31)], stamp=old(crm, 3))
    started = [daemons(scale_out_config(tmp_path / name, crm, api)) for name in "abc"]
    for daemon in started:
        daemon.wait_event("started", timeout=60)
    wait_for(lambda: len(stored_names(api)) == 30, what="the 30 contacts")
    assert all(daemon.proc.poll() is None for daemon in started)
    assert pushed_records(api) == 30  # one of them ran the sync, once


def test_requests_per_second_holds_for_the_deployment(crm, api, tmp_path, daemons):
    """Two daemons, each running its own sync, share one ceiling, counted at the simulator."""
    crm.insert([contact(i) for i in range(1, 301)], stamp=old(crm, 3))
    rate = 'requests_per_second = 10\n'
    a = scale_out_config(tmp_path / "a", crm, api, batch=10)
    b = scale_out_config(tmp_path / "b", crm, api, token=OTHER_TOKEN, batch=10)
    b.write_text(b.read_text().replace('name = "contacts"', 'name = "others"').replace('"1466"', '"1467"'))
    for path in (a, b):
        path.write_text(path.read_text().replace("requests_per_second = 0\n", rate))
    for path in (a, b):
        daemons(path)
    wait_for(lambda: api.received("1466") + api.received("1467") == 600, timeout=60, what="both backfills")

    times = sorted(r["time"] for r in api.requests() if r["status"] == 200)
    busiest = max(sum(1 for t in times if start <= t < start + 2.0) for start in times)
    assert busiest <= 2 * 10 + 1  # at most 10 per second, over any 2 s window
    overlap = min(max(r["time"] for r in sent_by(api, key)) for key in ("key#1", "key#2"))
    assert min(r["time"] for r in sent_by(api, "key#2")) < overlap  # the two really sent at once


def test_status_shows_a_first_backfill_running_with_its_progress_and_owner(tmp_path, daemons):
    crm = Crm(f"sqlite:///{tmp_path / 'crm.db'}")
    crm.insert([contact(i) for i in range(1, 301)])
    with start_in_thread(SimulatorConfig(tokens=(TOKEN,), key_attribute="accountid", latency_s=0.1)) as api:
        path = write_config(
            tmp_path / "syncd.toml", source_url=crm.url, api_url=api.url, state_url=f"sqlite:///{tmp_path / 'state.db'}", batch=10
        )
        daemon = daemons(path)
        config = load_config(path)

        def running() -> dict[str, Any] | None:
            try:
                (entry,) = collect_status(config, live_backlog=False)
            except StateUnavailable:  # the daemon has not created or migrated it yet
                return None
            return entry if entry["running"] and entry["progress"]["sent"] > 0 else None

        entry = wait_for(running, timeout=30, what="status to show the backfill running")
        assert entry["state"] == "running"  # not never_run, with records already delivered
        assert f":{daemon.proc.pid}:" in entry["owner"]
        assert 0 < entry["progress"]["sent"] <= entry["progress"]["rows_read"] < 300
        assert entry["last_success_at"] is None

        wait_for(lambda: api.received("1466") == 300, timeout=30, what="the backfill")
        done = wait_for(lambda: (e := collect_status(config, live_backlog=False)[0])["state"] == "ok" and e)
        assert done["running"] is False and done["last_success_at"] is not None
    crm.dispose()


def test_a_lease_shorter_than_a_request_is_a_config_error(crm, api, tmp_path, capsys):
    path = scale_out_config(tmp_path, crm, api, lease='lease = "2s"')  # not more than 1 s + 1 s
    assert main(["check", "-c", str(path)]) == 2
    error = capsys.readouterr().err
    assert "state.lease (2s)" in error and "api.timeout_s (1s)" in error


def test_migrate_run_five_times_at_once_on_an_empty_state_database_all_succeed(crm, api, tmp_path):
    """The start-up of N daemons without their other work: migrations and sync rows, concurrently."""
    path = scale_out_config(tmp_path, crm, api)
    command = [sys.executable, "-m", "syncd.cli", "migrate", "-c", str(path)]
    started = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(5)]
    outputs = [process.communicate(timeout=120)[0] for process in started]
    assert [process.returncode for process in started] == [0] * 5, outputs
    assert all("is up to date" in output for output in outputs)
    state = StateStore(crm.url)
    assert [row.name for row in state.status()] == ["contacts"]
    state.close()


class Fence:
    """A lease as the Deliverer sees it: held for `holds` checks, lost after (a takeover)."""

    def __init__(self, holds: int) -> None:
        self.holds = holds
        self.checked: list[float] = []

    def ensure(self, seconds: float) -> float:
        self.checked.append(seconds)
        if len(self.checked) > self.holds:
            raise LeaseLost("contacts")
        return time.monotonic() + 60

    def check(self) -> None:
        pass


@pytest.mark.parametrize("holds", [1, 2])
def test_every_attempt_retries_included_proves_the_lease_first(tmp_path, holds):
    endpoint = Api()
    endpoint.answers = [response(429, {"statuscode": 429}, headers={"retry-after": "0.2"})]
    deliver, _ = deliverer(tmp_path, endpoint)  # api.timeout_s = 1
    deliver.fence = fence = Fence(holds)
    if holds == 1:  # taken over while the batch waited on Retry-After: the retry never goes out
        with pytest.raises(LeaseLost):
            deliver.deliver("1466", "1499", records(3))
        assert len(endpoint.requests) == 1
    else:
        assert deliver.deliver("1466", "1499", records(3)).complete
        assert len(endpoint.requests) == 2
    assert fence.checked == [2.0, 2.0]  # before each attempt: the request's timeout plus the 1 s margin
