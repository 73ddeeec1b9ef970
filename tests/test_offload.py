"""A big cycle handed to a child process: the same rows, the same guarantees, no process left behind.

The API answers slowly here (`latency_s`), so a cycle of a few thousand rows lasts long
enough for the child to start and take over partway; every test checks that it did.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from syncd.config import load_config
from syncd.cycle import CycleReport
from syncd.offload import Offload
from syncd.runtime import Runtime
from syncd.simulator import RunningSimulator, SimulatorConfig
from syncd.source import Source, SourceError
from syncd.state import StateStore

from .crm import TOKEN, Crm, contact, offload_children, wait_for, write_config

ROWS = 3_000
OFFLOAD_AFTER = 200
DATASTORE = "1466"


@pytest.fixture
def api_config() -> SimulatorConfig:
    return SimulatorConfig(tokens=(TOKEN,), key_attribute="accountid", latency_s=0.03)


def config_for(crm: Crm, api: RunningSimulator, tmp_path: Path, *, offload_after: int = OFFLOAD_AFTER) -> Path:
    return write_config(
        tmp_path / "syncd.toml",
        source_url=crm.url,
        api_url=api.url,
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
        batch=25,
        in_flight=2,
        extra_sync=f"offload_after = {offload_after}",
    )


def keys_stored(api: RunningSimulator) -> set[str]:
    return {record["accountid"] for record in api.records(DATASTORE)}


def test_a_big_cycle_is_finished_by_a_child_process_with_every_row_sent_once(crm, api, tmp_path):
    crm.insert([contact(i) for i in range(1, ROWS + 1)])
    config = config_for(crm, api, tmp_path)

    with Runtime.open(load_config(config)) as runtime:
        runner = runtime.runners["contacts"]
        report = runner.run_cycle()
        assert offload_children() == []  # the child is gone when the cycle is
        idle = runner.run_cycle()

    assert (report.outcome, report.rows_read, report.sent) == ("ok", ROWS, ROWS)
    assert report.offloaded_after is not None, "the child never took over: the cycle ended before it was ready"
    assert OFFLOAD_AFTER <= report.offloaded_after < ROWS
    assert api.received(DATASTORE) == ROWS  # nothing sent twice
    api.wait_inserted(DATASTORE, ROWS)
    assert keys_stored(api) == {f"acct-{i}" for i in range(1, ROWS + 1)}
    assert (idle.outcome, idle.rows_read, idle.offloaded_after) == ("ok", 0, None)

    state = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    cursor = state.cursor("contacts")
    assert cursor is not None and int(cursor.key) == ROWS  # every row shares one watermark: the key decides
    assert len(state.known_digests("contacts", [str(i) for i in range(1, ROWS + 1)])) == ROWS


def test_rows_the_child_cannot_map_become_dead_letters(pg_crm, api, tmp_path):
    bad = {2_500, 2_900}
    pg_crm.insert([contact(i, **({"phone": "not a phone"} if i in bad else {})) for i in range(1, ROWS + 1)])
    config = config_for(pg_crm, api, tmp_path)

    with Runtime.open(load_config(config)) as runtime:
        report = runtime.runners["contacts"].run_cycle()
        letters = list(runtime.state.dead_letters("contacts"))

    assert report.offloaded_after is not None and report.offloaded_after < min(bad)
    assert (report.outcome, report.sent, report.dead_lettered) == ("ok", ROWS - len(bad), len(bad))
    assert {letter.key for letter in letters} == {str(i) for i in bad}
    assert all("msisdn" in letter.reason and letter.payload["phone"] == "not a phone" for letter in letters)


def test_a_child_that_dies_fails_the_cycle_and_the_next_one_finishes_without_resending(pg_crm, api, tmp_path):
    pg_crm.insert([contact(i) for i in range(1, ROWS + 1)])
    config = config_for(pg_crm, api, tmp_path)
    killed: list[int] = []

    def kill_the_child(report: CycleReport) -> None:
        if report.offloaded_after is not None and not killed:
            for child in offload_children():
                child.kill()
                killed.append(child.pid)

    with Runtime.open(load_config(config), on_progress=kill_the_child) as runtime:
        runner = runtime.runners["contacts"]
        failed = runner.run_cycle()
        assert killed, "the child never took over"
        assert failed.outcome == "failing" and "reading process stopped" in (failed.error or "")
        assert 0 < failed.sent < ROWS
        finished = runner.run_cycle()

    assert (finished.outcome, failed.sent + finished.sent) == ("ok", ROWS)
    assert api.received(DATASTORE) == ROWS  # batches that landed before the failure are not sent again
    api.wait_inserted(DATASTORE, ROWS)
    assert len(keys_stored(api)) == ROWS


def test_stopping_mid_cycle_stops_the_child_and_keeps_what_was_acknowledged(pg_crm, api, tmp_path):
    pg_crm.insert([contact(i) for i in range(1, ROWS + 1)])
    config = config_for(pg_crm, api, tmp_path)
    stop = threading.Event()

    def stop_after_hand_over(report: CycleReport) -> None:
        if report.offloaded_after is not None and report.sent >= report.offloaded_after + 200:
            stop.set()

    with Runtime.open(load_config(config), should_stop=stop.is_set, on_progress=stop_after_hand_over) as runtime:
        stopped = runtime.runners["contacts"].run_cycle()
        assert offload_children() == []
        cursor = runtime.state.cursor("contacts")
        stored = runtime.state.digest_count("contacts")
    assert stopped.offloaded_after is not None and stopped.sent < ROWS
    assert cursor is None and stored == stopped.sent  # a first backfill: digests of the ACKs, no watermark yet

    with Runtime.open(load_config(config)) as runtime:
        rest = runtime.runners["contacts"].run_cycle()
    assert stopped.sent + rest.sent == ROWS
    assert api.received(DATASTORE) == ROWS


def test_the_child_exits_when_the_parent_is_killed(pg_crm, api, tmp_path):
    pg_crm.insert([contact(i) for i in range(1, ROWS + 1)])
    config = config_for(pg_crm, api, tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from syncd.cli import main; sys.exit(main())", "once", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        parent = psutil.Process(process.pid)

        def started() -> list[psutil.Process]:
            assert process.poll() is None, "syncd once ended before its child process was seen"
            return offload_children(parent)

        children = wait_for(started, 30, "syncd once to start its child process")
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
        gone, alive = psutil.wait_procs(children, timeout=15)
        assert alive == [], "the child outlived its parent"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_cycle_below_offload_after_stays_in_one_process(pg_crm, api, tmp_path):
    pg_crm.insert([contact(i) for i in range(1, 101)])
    config = config_for(pg_crm, api, tmp_path, offload_after=101)
    with Runtime.open(load_config(config)) as runtime:
        report = runtime.runners["contacts"].run_cycle()
    assert (report.outcome, report.sent, report.offloaded_after) == ("ok", 100, None)


def test_the_child_reports_what_it_cannot_read(sqlite_url, api, tmp_path):
    config = load_config(
        write_config(
            tmp_path / "syncd.toml",
            source_url=sqlite_url,
            api_url=api.url,
            state_url=f"sqlite:///{tmp_path / 'state.db'}",
            table="no_such_table",
        )
    )
    offload = Offload(config.syncs[0], "crm", config.sources["crm"], batch_rows=10, target=b"")
    with offload, pytest.raises(SourceError, match="no_such_table"):
        list(offload.batches(None, bound=None))  # type: ignore[arg-type]


def test_in_memory_sqlite_cannot_be_read_by_another_process(tmp_path):
    from syncd.config import SourceConfig

    assert not Source("mem", SourceConfig(url="sqlite://")).can_offload
    assert not Source("mem", SourceConfig(url="sqlite:///:memory:")).can_offload
    assert Source("file", SourceConfig(url=f"sqlite:///{tmp_path / 'crm.db'}")).can_offload
    assert Source("pg", SourceConfig(url="postgresql+psycopg://u@h/db")).can_offload


@pytest.mark.parametrize("interpreter", ["/bin/false", "/nonexistent/python"])
def test_a_child_that_cannot_start_leaves_the_cycle_in_one_process(pg_crm, api, tmp_path, monkeypatch, interpreter):
    from structlog.testing import capture_logs

    pg_crm.insert([contact(i) for i in range(1, ROWS + 1)])
    config = config_for(pg_crm, api, tmp_path)
    monkeypatch.setattr("syncd.offload.sys.executable", interpreter)
    with Runtime.open(load_config(config)) as runtime, capture_logs() as logs:
        report = runtime.runners["contacts"].run_cycle()
    assert (report.outcome, report.sent, report.offloaded_after) == ("ok", ROWS, None)
    assert api.received(DATASTORE) == ROWS
    assert [entry["event"] for entry in logs if entry["log_level"] == "warning"] == ["offload_failed"]


def test_the_child_reads_the_model_with_its_query_and_filter(source_url, tmp_path):
    """The child reads through the same reader: the query, and the filter's verdict per row."""
    crm = Crm(source_url, deleted=True)
    crm.insert([contact(i, deleted=int(i % 5 == 0)) for i in range(1, 51)])
    query = 'query = "SELECT id, first_name, last_name, phone, account_id, email, deleted, updated_at FROM contacts"'
    config = load_config(
        write_config(
            tmp_path / "syncd.toml",
            source_url=source_url,
            api_url="http://127.0.0.1:9/x",
            state_url=f"sqlite:///{tmp_path / 'state.db'}",
            model=query,
            extra_sync='filter = "deleted = 0"',
        )
    )
    source = Source("crm", config.sources["crm"])
    reader = source.reader(config.syncs[0])
    with source.engine.connect() as conn:
        bound = reader.bound(conn)
    source.dispose()
    with Offload(config.syncs[0], "crm", config.sources["crm"], batch_rows=20, target=b"") as offload:
        batches = list(offload.batches(None, bound))
    crm.dispose()
    assert [rows for _, rows, _, _ in batches] == [20, 20, 10]
    assert sorted(int(key) for *_, mapped, _ in batches for key in mapped.keys) == [i for i in range(1, 51) if i % 5]
    assert sorted(int(key) for *_, outside in batches for key in outside) == list(range(5, 51, 5))
