"""syncd.metrics, scraped from its real HTTP endpoint, and wired into the sync cycle."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from syncd.config import load_config
from syncd.metrics import Metrics, MetricsServer, parse_listen, schedule_seconds
from syncd.runtime import Runtime
from syncd.simulator import RunningSimulator
from syncd.state import StateStore

from .crm import Crm, contact, write_config


@pytest.fixture
def served() -> Iterator[tuple[Metrics, MetricsServer]]:
    metrics = Metrics()
    server = metrics.serve("127.0.0.1:0")  # port 0: the kernel picks a free one
    try:
        yield metrics, server
    finally:
        server.close()


def scrape(server: MetricsServer) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{sample name: {sorted labels: value}} from a real GET /metrics."""
    response = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5)
    response.raise_for_status()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def feed(metrics: Metrics, sync: str) -> None:
    metrics.rows_read(sync, 120)
    metrics.records_sent(sync, 100)
    metrics.unchanged_skipped(sync, 15)
    metrics.dead_lettered(sync, 5)
    metrics.push(sync, 200, 0, 0.12)
    metrics.push(sync, 200, 0, 0.3)
    metrics.push(sync, 429, None, 0.01)
    metrics.push(sync, None, None, 30.0)
    metrics.cycle(sync, 2.5, "ok")
    metrics.cycle(sync, 0.4, "failed")
    metrics.set_backlog(sync, 7)
    metrics.set_last_success(sync, datetime(2026, 12, 1, 3, 0, tzinfo=UTC))
    metrics.set_open_dead_letters(sync, 3)
    metrics.set_schedule(SimpleNamespace(name=sync, interval=timedelta(seconds=30), cron=None))
    metrics.set_state(sync, "failing")


def test_scrape_shows_every_family_and_label(served) -> None:
    metrics, server = served
    feed(metrics, "contacts")
    s = scrape(server)
    c = (("sync", "contacts"),)

    assert s["syncd_rows_read_total"][c] == 120
    assert s["syncd_records_sent_total"][c] == 100
    assert s["syncd_unchanged_skipped_total"][c] == 15
    assert s["syncd_dead_letters_total"][c] == 5
    pushes = s["syncd_pushes_total"]
    assert pushes[(("api_code", "0"), ("http_status", "200"), ("sync", "contacts"))] == 2
    assert pushes[(("api_code", ""), ("http_status", "429"), ("sync", "contacts"))] == 1
    assert pushes[(("api_code", ""), ("http_status", ""), ("sync", "contacts"))] == 1
    assert s["syncd_push_duration_seconds_count"][c] == 4
    assert s["syncd_push_duration_seconds_bucket"][(("le", "0.25"), ("sync", "contacts"))] == 2
    assert s["syncd_cycle_duration_seconds_count"][c] == 2
    assert s["syncd_cycles_total"][(("outcome", "ok"), ("sync", "contacts"))] == 1
    assert s["syncd_cycles_total"][(("outcome", "failed"), ("sync", "contacts"))] == 1
    assert s["syncd_backlog_rows"][c] == 7
    assert s["syncd_last_success_timestamp_seconds"][c] == datetime(2026, 12, 1, 3, 0, tzinfo=UTC).timestamp()
    assert s["syncd_dead_letters_open"][c] == 3
    assert s["syncd_schedule_interval_seconds"][c] == 30
    assert "syncd_watermark_lag_seconds" not in s  # grew on every idle healthy table: gone
    states = {dict(k)["state"]: v for k, v in s["syncd_sync_state"].items()}
    assert states == {"ok": 0, "failing": 1, "auth_error": 0, "config_error": 0, "paused": 0, "never_run": 0}


def test_help_texts_are_exported(served) -> None:
    _, server = served
    text = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5).text
    assert "# HELP syncd_records_sent_total Records the API acknowledged" in text
    assert "# TYPE syncd_push_duration_seconds histogram" in text


def test_state_moves_and_unknowns_are_rejected(served) -> None:
    metrics, server = served
    metrics.set_state("contacts", "never_run")
    metrics.set_state("contacts", "auth_error")
    states = {dict(k)["state"]: v for k, v in scrape(server)["syncd_sync_state"].items()}
    assert [state for state, value in states.items() if value == 1] == ["auth_error"]
    with pytest.raises(ValueError, match="unknown sync state"):
        metrics.set_state("contacts", "sleeping")


def test_none_removes_a_gauge_series(served) -> None:
    metrics, server = served
    metrics.set_last_success("contacts", datetime.now(UTC))
    metrics.set_backlog("contacts", 9)
    metrics.set_last_success("contacts", None)
    metrics.set_backlog("contacts", None)
    metrics.set_backlog("never_set", None)  # removing what is not there is fine
    s = scrape(server)
    assert "syncd_last_success_timestamp_seconds" not in s
    assert "syncd_backlog_rows" not in s


def test_build_info_and_process_metrics_are_exported(served) -> None:
    _, server = served
    s = scrape(server)
    assert s["syncd_build_info"] == {(("version", version("syncd")),): 1}
    assert s["process_resident_memory_bytes"][()] > 0
    assert s["process_start_time_seconds"][()] > 0
    assert "python_info" in s
    assert "python_gc_collections_total" in s


@pytest.mark.parametrize(
    ("interval", "cron", "seconds"),
    [
        (timedelta(seconds=30), None, 30),
        (None, "*/5 * * * *", 300),
        (None, "0 3 * * *", 86_400),
        (None, "0 9 * * 1-5", 72 * 3600),  # Friday 09:00 to Monday 09:00
        (None, "*/10 9-17 * * 1-5", (24 + 24 + 15) * 3600 + 10 * 60),  # Friday 17:50 to Monday 09:00
    ],
)
def test_schedule_is_the_longest_wait_between_two_cycles(interval, cron, seconds) -> None:
    assert schedule_seconds(SimpleNamespace(interval=interval, cron=cron)) == seconds


def test_forget_drops_only_that_sync(served) -> None:
    metrics, server = served
    feed(metrics, "contacts")
    feed(metrics, "leads")
    metrics.forget("contacts")
    syncs = {
        dict(labels).get("sync")
        for series in scrape(server).values()
        for labels in series
    }
    assert syncs == {"leads", None}  # None: build info and process metrics, which no sync owns


def test_registries_are_independent() -> None:
    first, second = Metrics(), Metrics()  # a second one would clash on a shared registry
    first.rows_read("contacts", 1)
    assert second.registry.get_sample_value("syncd_rows_read_total", {"sync": "contacts"}) is None
    assert first.registry.get_sample_value("syncd_rows_read_total", {"sync": "contacts"}) == 1


def test_close_frees_the_port() -> None:
    metrics = Metrics()
    server = metrics.serve("127.0.0.1:0")
    port = server.port
    server.close()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
    again = metrics.serve(f"127.0.0.1:{port}")  # a reload re-serving on the same port
    again.close()


def test_ipv6_loopback() -> None:
    try:
        server = Metrics().serve("[::1]:0")
    except OSError as error:
        pytest.skip(f"no IPv6 loopback here: {error}")
    try:
        response = httpx.get(f"http://[::1]:{server.port}/metrics", timeout=5)
        assert response.status_code == 200
    finally:
        server.close()


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("[::1]:9464", ("::1", 9464)),
        (":9464", ("0.0.0.0", 9464)),
        ("localhost:9464", ("localhost", 9464)),
    ],
)
def test_parse_listen(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["9464", "host:", "host:http", "::1:9464", "h:70000"])
def test_parse_listen_rejects(listen: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(listen)


# ---------------------------------------------------------------------------- wired into the cycle

LEADS = {
    "name": "leads",
    "source": "crm",
    "table": "contacts",
    "key": "id",
    "watermark": "updated_at",
    "cron": "0 3 * * *",
    "datastore_id": "1467",
    "feed_id": "1499",
    "fields": {"msisdn": {"column": "phone", "transform": "e164", "required": True}},
}


@pytest.fixture
def crm(sqlite_url: str) -> Iterator[Crm]:
    crm = Crm(sqlite_url)
    yield crm
    crm.dispose()


@pytest.fixture
def config(crm: Crm, api: RunningSimulator, tmp_path: Path) -> Path:
    """Two syncs: `contacts` every second, `leads` daily by cron (never run in these tests)."""
    return write_config(
        tmp_path / "syncd.toml",
        source_url=crm.url,
        api_url=api.url,
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
        more_syncs=[LEADS],
    )


def sample(runtime: Runtime, name: str, sync: str, **labels: str) -> float | None:
    return runtime.metrics.registry.get_sample_value(name, {"sync": sync, **labels})


def test_every_sync_has_its_series_from_start_up_before_any_cycle(crm, config) -> None:
    crm.insert([contact(i) for i in range(1, 9)] + [contact(9, phone="not a phone"), contact(10, phone="")])
    with Runtime.open(load_config(config)) as runtime:
        assert runtime.runners["contacts"].run_cycle().outcome == "ok"
    stored = {row.name: row for row in StateStore(load_config(config).state.url).status()}
    assert stored["contacts"].dead_letters == 2

    with Runtime.open(load_config(config)) as restarted:  # no cycle runs from here on
        assert sample(restarted, "syncd_sync_state", "contacts", state="ok") == 1
        assert sample(restarted, "syncd_last_success_timestamp_seconds", "contacts") == (
            stored["contacts"].last_success_at.timestamp()
        )
        assert sample(restarted, "syncd_backlog_rows", "contacts") == 0
        assert sample(restarted, "syncd_dead_letters_open", "contacts") == 2
        assert sample(restarted, "syncd_schedule_interval_seconds", "contacts") == 1
        assert sample(restarted, "syncd_records_sent_total", "contacts") == 0  # counters start at 0, present
        assert sample(restarted, "syncd_cycles_total", "contacts", outcome="failed") == 0

        assert sample(restarted, "syncd_sync_state", "leads", state="never_run") == 1
        assert sample(restarted, "syncd_schedule_interval_seconds", "leads") == 86_400
        assert sample(restarted, "syncd_dead_letters_open", "leads") == 0
        # Unknown until measured or first successful: absent, never a reassuring 0.
        assert sample(restarted, "syncd_backlog_rows", "leads") is None
        assert sample(restarted, "syncd_last_success_timestamp_seconds", "leads") is None


def test_backlog_is_measured_while_the_api_is_down(crm, api, config) -> None:
    crm.insert([contact(i) for i in range(1, 31)])
    with Runtime.open(load_config(config)) as runtime:
        runner = runtime.runners["contacts"]
        api.set_faults(fail_rate=1.0)  # every request answered 500

        assert runner.run_cycle().outcome == "failing"
        assert sample(runtime, "syncd_backlog_rows", "contacts") == 30
        crm.insert([contact(i) for i in range(31, 51)])
        assert runner.run_cycle().outcome == "failing"
        assert sample(runtime, "syncd_backlog_rows", "contacts") == 50  # rows pile up, and it shows
        assert sample(runtime, "syncd_sync_state", "contacts", state="failing") == 1
        assert sample(runtime, "syncd_last_success_timestamp_seconds", "contacts") is None
        assert runtime.state.status()[0].backlog == 50  # `syncd status` says the same

        api.set_faults(fail_rate=0.0)
        before = datetime.now(UTC).timestamp()
        assert runner.run_cycle().outcome == "ok"
        assert sample(runtime, "syncd_backlog_rows", "contacts") == 0
        assert sample(runtime, "syncd_sync_state", "contacts", state="ok") == 1
        assert sample(runtime, "syncd_last_success_timestamp_seconds", "contacts") >= before


def test_open_dead_letters_follow_the_source_rows(crm, config) -> None:
    crm.insert([contact(1), contact(2, phone="not a phone"), contact(3, phone="nor this")])
    with Runtime.open(load_config(config)) as runtime:
        runner = runtime.runners["contacts"]
        runner.run_cycle()
        assert sample(runtime, "syncd_dead_letters_open", "contacts") == 2
        assert sample(runtime, "syncd_dead_letters_total", "contacts") == 2
        crm.update([2], phone="+442079460002")  # fixed in the CRM: its next push resolves it
        runner.run_cycle()
        assert sample(runtime, "syncd_dead_letters_open", "contacts") == 1
        assert sample(runtime, "syncd_dead_letters_total", "contacts") == 2


def test_a_sync_stopped_by_a_configuration_error_says_so(crm, api, config) -> None:
    crm.insert([contact(1)])
    api.queue_faults({"status": 405})
    with Runtime.open(load_config(config)) as runtime:
        assert runtime.runners["contacts"].run_cycle().outcome == "config_error"
        assert sample(runtime, "syncd_sync_state", "contacts", state="config_error") == 1
        assert sample(runtime, "syncd_sync_state", "contacts", state="failing") == 0
        assert sample(runtime, "syncd_backlog_rows", "contacts") == 1


def test_a_sync_run_by_another_syncd_shows_that_ones_progress(crm, config) -> None:
    crm.insert([contact(1), contact(2, phone="not a phone")])
    with Runtime.open(load_config(config)) as owner, Runtime.open(load_config(config)) as standby:
        assert owner.runners["contacts"].run_cycle().outcome == "ok"  # holds the lease now
        assert standby.runners["contacts"].run_cycle().outcome == "skipped"
        row = standby.state.status()[0]
        assert sample(standby, "syncd_last_success_timestamp_seconds", "contacts") == row.last_success_at.timestamp()
        assert sample(standby, "syncd_sync_state", "contacts", state="ok") == 1
        assert sample(standby, "syncd_dead_letters_open", "contacts") == 1
