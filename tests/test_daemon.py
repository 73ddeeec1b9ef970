"""`syncd run` as an operator meets it: a real subprocess, signals, sd_notify, logs, metrics.

Each test starts the daemon on a SQLite CRM with the simulator in-process, waits for
conditions by polling (every wait has a timeout) and kills the daemon in a finally.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from syncd.cycle import CycleReport
from syncd.daemon import _warn_if_drain_outlasts_stop
from syncd.progress import ProgressLog
from syncd.reload import effective_config

from .crm import TOKEN, Crm, RunningDaemon, contact, offload_children, stored, syncd, wait_for, write_config

WRONG_KEY = "wrong-key-0c4a7d"


# ---------------------------------------------------------------------------- harness


@pytest.fixture
def crm(request: pytest.FixtureRequest) -> Iterator[Crm]:
    """A SQLite CRM, or `@pytest.mark.parametrize("crm", [...], indirect=True)` for others."""
    database = getattr(request, "param", "sqlite")
    crm = Crm(request.getfixturevalue(f"{database}_url"))
    yield crm
    crm.dispose()


def daemon_config(
    tmp_path: Path,
    crm: Crm,
    api: Any,
    *,
    interval: str = "1s",
    top: str = "",
    extra_fields: str = "",
    **kwargs: Any,
) -> Path:
    """tests/crm.py's config, at log level info, with top-level keys and extra fields."""
    path = write_config(
        tmp_path / "syncd.toml",
        source_url=crm.url,
        api_url=api.url,
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
        **kwargs,
    )
    text = path.read_text().replace('level = "warning"', 'level = "info"')
    text = text.replace('interval = "1s"', f'interval = "{interval}"')
    return _rewrite(path, top + "\n" + text + extra_fields)


def _rewrite(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def assert_clean_logs(daemon: RunningDaemon, *secrets: str) -> None:
    """What an operator piping the journal into jq relies on: JSON only, no key anywhere."""
    lines = daemon.lines()
    assert lines, "the daemon logged nothing"
    for line in lines:
        event = json.loads(line)  # raises on a non-JSON line
        assert {"event", "level", "timestamp"} <= set(event), line
        for secret in secrets:
            assert secret not in line, f"secret in log line: {line}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class NotifySocket:
    """A stand-in for systemd's notify socket: collects every datagram the daemon sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[dict[str, str]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, OSError):
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(fields)

    def index(self, key: str, value: str | None = None, after: int = -1) -> int | None:
        for i, message in enumerate(list(self.messages)):
            if i > after and key in message and (value is None or message[key] == value):
                return i
        return None

    def wait(self, key: str, value: str | None = None, after: int = -1, timeout: float = 5) -> int:
        """The index of the first matching message after `after` (0 is a valid index)."""
        found = wait_for(lambda: (i := self.index(key, value, after)) is not None and (i,), timeout, f"{key}={value}")
        return found[0]

    def count(self, key: str) -> int:
        return sum(1 for message in list(self.messages) if key in message)

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=2)
        self.sock.close()


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("crm", ["sqlite", "postgres"], indirect=True)
def test_sigterm_under_load_drains_in_time_and_loses_nothing(crm, api, tmp_path, daemons):
    api.set_faults(latency_s=0.03)
    crm.insert([contact(i) for i in range(1, 3001)])
    config = daemon_config(tmp_path, crm, api, batch=20, top='drain_timeout = "4s"')
    daemon = daemons(config)

    wait_for(lambda: api.received("1466") >= 300, 20, "the backfill to be under way")
    stopped_at = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(timeout=4 + 5) == 0
    assert time.monotonic() - stopped_at < 4 + 3
    assert daemon.events("stopping") and daemon.events("stopped")
    assert len(stored(api)) < 3000, "the backfill finished before SIGTERM; the test proves nothing"

    api.set_faults(latency_s=0)
    done = syncd("once", "-c", str(config), "--no-progress")
    assert done.returncode == 0, done.stderr
    api.wait_inserted("1466", 3000)
    assert len(stored(api)) == 3000
    assert_clean_logs(daemon, TOKEN)


def test_sigterm_during_a_cycle_handed_to_a_child_process_stops_both(crm, api, tmp_path, daemons):
    api.set_faults(latency_s=0.03)
    crm.insert([contact(i) for i in range(1, 3001)])
    config = daemon_config(tmp_path, crm, api, batch=20, top='drain_timeout = "4s"', extra_sync="offload_after = 100")
    daemon = daemons(config)

    children = wait_for(lambda: offload_children(psutil.Process(daemon.proc.pid)), 20, "the big cycle's child process")
    wait_for(lambda: api.received("1466") >= 600, 20, "the backfill to be under way")
    daemon.signal(signal.SIGTERM)  # systemd sends it to the whole cgroup: the child ignores it
    for process in children:
        process.send_signal(signal.SIGTERM)
    assert daemon.wait_exit(timeout=4 + 5) == 0
    _, alive = psutil.wait_procs(children, timeout=5)
    assert alive == [], "the child outlived the daemon"
    assert len(stored(api)) < 3000, "the backfill finished before SIGTERM; the test proves nothing"

    api.set_faults(latency_s=0)
    done = syncd("once", "-c", str(config), "--no-progress")
    assert done.returncode == 0, done.stderr
    api.wait_inserted("1466", 3000)
    assert api.received("1466") == 3000  # what landed before the stop was not sent again
    assert_clean_logs(daemon, TOKEN)


def test_sighup_applies_mapping_and_interval_and_rejects_a_broken_config(crm, api, tmp_path, daemons):
    crm.insert([contact(i) for i in range(1, 21)])
    config = daemon_config(tmp_path, crm, api, interval="60s")
    daemon = daemons(config)
    wait_for(lambda: len(stored(api)) == 20, 15, "the first cycle, run at start")
    good = config.read_text()

    # A new constant attribute, and a 60s interval down to 1s.
    _rewrite(config, good.replace('interval = "60s"', 'interval = "1s"') + '\norigin = { value = "crm" }\n')
    daemon.signal(signal.SIGHUP)
    daemon.wait_event("config_reloaded", where=lambda e: e["changed"] == ["contacts"])
    for i in (21, 22):  # each arrives within seconds: the 60s interval is gone
        crm.insert([contact(i)])
        wait_for(lambda i=i: f"acct-{i}" in stored(api), 6, f"row {i} after the reload")
        assert stored(api)[f"acct-{i}"]["origin"] == "crm"

    # A broken file is refused with the reason; the running config keeps syncing.
    _rewrite(config, config.read_text().replace('interval = "1s"', 'interval = "soon"'))
    daemon.signal(signal.SIGHUP)
    rejected = daemon.wait_event("reload_rejected")
    assert rejected["level"] == "error"
    assert "interval" in rejected["problem"] and str(config) in rejected["problem"]
    crm.insert([contact(23)])
    wait_for(lambda: "acct-23" in stored(api), 6, "row 23 with the old config still running")
    assert stored(api)["acct-23"]["origin"] == "crm"
    assert daemon.proc.poll() is None
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(timeout=15) == 0
    assert_clean_logs(daemon, TOKEN)


def test_systemd_notify_protocol(crm, api, tmp_path, daemons):
    crm.insert([contact(i) for i in range(1, 6)])
    config = daemon_config(tmp_path, crm, api)
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000", "SYNCD_STOP_TIMEOUT": "30"}
        daemon = daemons(config, env)
        ready = notify.wait("READY", "1", timeout=15)
        # A fresh state database is migrated before READY=1, asking for more start time.
        extend = notify.index("EXTEND_TIMEOUT_USEC")
        assert extend is not None and extend < ready, notify.messages[:ready + 1]
        assert int(notify.messages[extend]["EXTEND_TIMEOUT_USEC"]) >= 10_000_000
        started = daemon.wait_event("started")
        assert started["pid"] == daemon.proc.pid
        assert started["version"] == importlib.metadata.version("syncd")
        assert not daemon.events("drain_timeout_exceeds_stop_timeout")  # 10 s fits in 30 s
        wait_for(lambda: notify.count("WATCHDOG") >= 3, 5, "repeated WATCHDOG=1")
        wait_for(lambda: any("1 ok" in m.get("STATUS", "") for m in notify.messages), 10, "STATUS with the sync ok")

        daemon.signal(signal.SIGHUP)
        reloading = notify.wait("RELOADING", "1", after=ready)
        assert int(notify.messages[reloading]["MONOTONIC_USEC"]) > 0
        notify.wait("READY", "1", after=reloading)
        beats = notify.count("WATCHDOG")
        wait_for(lambda: notify.count("WATCHDOG") > beats, 3, "WATCHDOG=1 after the reload")

        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(timeout=15) == 0
        notify.wait("STOPPING", "1", after=reloading, timeout=1)
        assert_clean_logs(daemon, TOKEN)
    finally:
        notify.close()


def test_wrong_key_is_auth_error_and_a_new_key_in_the_file_resumes(crm, api, tmp_path, daemons):
    crm.insert([contact(i) for i in range(1, 11)])
    token_file = tmp_path / "api-token"
    token_file.write_text(WRONG_KEY + "\n")
    config = daemon_config(tmp_path, crm, api, token_file=token_file)
    daemon = daemons(config)

    def state() -> str | None:
        result = syncd("status", "-c", str(config), "--json")
        if result.returncode == 1 and ("no state database" in result.stderr or "migrate" in result.stderr):
            return None  # the daemon has not created or migrated it yet
        value = json.loads(result.stdout)["syncs"][0]["state"]
        assert result.returncode == (3 if value == "auth_error" else 0), result.stderr
        return value

    wait_for(lambda: state() == "auth_error", 20, "state auth_error", every=0.3)
    assert not stored(api)

    token_file.write_text(TOKEN + "\n")  # the rotated key, no restart, no reload
    wait_for(lambda: len(stored(api)) == 10, 20, "records after the key was fixed")
    wait_for(lambda: state() == "ok", 10, "state ok", every=0.3)
    assert daemon.proc.poll() is None
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(timeout=15) == 0
    assert_clean_logs(daemon, TOKEN, WRONG_KEY)


SECOND_SYNC = """
[[syncs]]
name = "copy"
source = "crm"
table = "contacts"
key = "id"
watermark = "updated_at"
interval = "1s"
settle = "0s"
datastore_id = "1467"
feed_id = "1499"

[syncs.fields]
msisdn    = { column = "phone", transform = "e164", required = true }
accountid = "account_id"
"""


def test_metrics_and_syncs_added_and_removed_by_reload(crm, api, tmp_path, daemons):
    crm.insert([contact(i) for i in range(1, 6)])
    port = free_port()
    config = daemon_config(tmp_path, crm, api)
    _rewrite(config, config.read_text().replace("[api]", f'[metrics]\nlisten = "127.0.0.1:{port}"\n\n[api]'))
    daemon = daemons(config)
    wait_for(lambda: len(stored(api)) == 5, 15, "the first cycle")

    def scrape() -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                return response.read().decode()
        except OSError:
            return ""

    families = (
        "syncd_rows_read_total",
        "syncd_records_sent_total",
        "syncd_pushes_total",
        "syncd_push_duration_seconds",
        "syncd_cycle_duration_seconds",
        "syncd_last_success_timestamp_seconds",
        "syncd_backlog_rows",
        "syncd_sync_state",
    )
    # Samples appear as the cycle goes: counters per committed batch, gauges at its end.
    text = wait_for(
        lambda: (t := scrape()) and all(f"\n{family}" in t for family in families) and t, 10, "every family's samples"
    )
    assert 'syncd_records_sent_total{sync="contacts"} 5.0' in text
    assert 'syncd_sync_state{state="ok",sync="contacts"} 1.0' in text

    # A sync added by a reload is scheduled (and exported); removed again, its series go.
    one_sync = config.read_text()
    _rewrite(config, one_sync + SECOND_SYNC)
    daemon.signal(signal.SIGHUP)
    daemon.wait_event("config_reloaded", where=lambda e: e["added"] == ["copy"])
    wait_for(lambda: len(api.records("1467")) == 5, 10, "the added sync's records")
    wait_for(lambda: 'syncd_records_sent_total{sync="copy"} 5.0' in scrape(), 5, "the added sync's metrics")
    _rewrite(config, one_sync)
    daemon.signal(signal.SIGHUP)
    daemon.wait_event("sync_removed", where=lambda e: e["sync"] == "copy")
    text = scrape()
    assert 'sync="copy"' not in text and 'sync="contacts"' in text
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(timeout=15) == 0
    assert_clean_logs(daemon, TOKEN)


def test_a_broken_config_exits_2_with_the_reason(tmp_path):
    config = tmp_path / "syncd.toml"
    config.write_text('[api]\nurl = "ftp://nowhere"\ntoken = "x"\n')
    result = syncd("run", "-c", str(config))
    assert result.returncode == 2
    assert "api.url" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------- units


def test_drain_timeout_longer_than_the_units_stop_timeout_is_a_warning(tmp_path):
    from syncd.config import load_config
    from syncd.logs import configure_logging

    path = write_config(
        tmp_path / "syncd.toml", source_url="sqlite://", api_url="http://127.0.0.1:9/x", state_url="sqlite://"
    )
    path.write_text('drain_timeout = "45s"\n' + path.read_text())
    config = load_config(path)
    out = io.StringIO()
    configure_logging("info", "json", out)

    def capture_log(event: str) -> list[dict]:
        return [e for e in map(json.loads, out.getvalue().splitlines()) if e["event"] == event]

    _warn_if_drain_outlasts_stop(config, {"SYNCD_STOP_TIMEOUT": "30"})
    [warning] = capture_log("drain_timeout_exceeds_stop_timeout")
    assert warning["level"] == "warning"
    assert (warning["drain_timeout_s"], warning["stop_timeout_s"]) == (45, 30)

    _warn_if_drain_outlasts_stop(config, {"SYNCD_STOP_TIMEOUT": "60"})
    _warn_if_drain_outlasts_stop(config, {})  # not under the shipped unit: nothing to compare with
    assert len(capture_log("drain_timeout_exceeds_stop_timeout")) == 1


def test_an_idle_daemon_says_how_its_syncs_stand_once_in_a_while(tmp_path, monkeypatch):
    """Idle cycles log at debug; one info line per SUMMARY_EVERY_S still shows it is alive."""
    import syncd.daemon
    from syncd.config import load_config
    from syncd.logs import configure_logging

    path = write_config(
        tmp_path / "syncd.toml", source_url="sqlite://", api_url="http://127.0.0.1:9/x", state_url="sqlite://"
    )
    daemon = syncd.daemon.Daemon(path, load_config(path))
    monkeypatch.setattr(daemon, "_ended_loops", lambda: [])
    out = io.StringIO()
    configure_logging("info", "json", out)

    daemon._tick()  # just started: no summary yet
    monkeypatch.setattr(syncd.daemon, "SUMMARY_EVERY_S", 0.0)
    daemon._tick()
    summaries = [e for e in map(json.loads, out.getvalue().splitlines()) if e["event"] == "status"]
    assert [(e["level"], e["status"]) for e in summaries] == [("info", "0 syncs")]


def test_reload_keeps_restart_only_settings(tmp_path):
    from syncd.config import load_config
    from syncd.config_text import render_config

    def config(state: str, url: str, rate: int) -> Any:
        path = tmp_path / "c.toml"
        path.write_text(
            render_config(
                state={"url": state},
                api={"url": url, "token_file": "/t", "requests_per_second": rate},
                sources={"crm": {"url": "sqlite://"}},
                syncs=[
                    {
                        "name": "a",
                        "source": "crm",
                        "table": "t",
                        "key": "id",
                        "watermark": "w",
                        "datastore_id": "1",
                        "feed_id": "2",
                        "fields": {"x": "y"},
                    }
                ],
            )
        )
        return load_config(path)

    running = config("sqlite:///a.db", "http://a/x", 5)
    effective, needs_restart = effective_config(running, config("sqlite:///b.db", "http://b/x", 7))
    assert needs_restart == ["state", "api.url"]
    assert effective.state.url == "sqlite:///a.db" and effective.api.url == "http://a/x"
    assert effective.api.requests_per_second == 7  # applied live


def test_progress_is_rate_limited_and_estimates_the_rest():
    class Reader:
        def backlog(self, cursor: Any) -> int:
            return 900

    class Runner:
        reader = Reader()

        class state:
            @staticmethod
            def cursor(name: str) -> None:
                return None

    import structlog

    progress = ProgressLog(lambda: {"contacts": Runner()}, every=0.0)
    with structlog.testing.capture_logs() as logged:
        progress(CycleReport("contacts", rows_read=10))  # no cycle begun: ignored
        progress.begin("contacts", "sync")
        progress(CycleReport("contacts", rows_read=100))
        progress(CycleReport("contacts", rows_read=400))
    lines = [e for e in logged if e["event"] == "progress"]
    assert [e["rows_done"] for e in lines] == [100, 400]
    assert lines[1]["remaining"] == 600 and lines[1]["eta_s"] is not None

    slow = ProgressLog(lambda: {}, every=60.0)
    with structlog.testing.capture_logs() as logged:
        slow.begin("contacts", "sync")
        slow(CycleReport("contacts", rows_read=100))
    assert not logged  # shorter than the interval: nothing to report


def test_each_sync_runs_its_cycles_one_at_a_time_and_a_slow_one_holds_up_no_other(tmp_path):
    from datetime import timedelta

    from syncd.config import load_config
    from syncd.daemon import SyncLoop

    path = write_config(
        tmp_path / "syncd.toml", source_url="sqlite://", api_url="http://127.0.0.1:9/x", state_url="sqlite://"
    )
    base = load_config(path).syncs[0]
    release = threading.Event()

    class Runner:
        stopped = None

        def __init__(self, name: str, slow: bool) -> None:
            self.name, self.slow = name, slow
            self.running = self.most_at_once = self.cycles = 0

        def run_cycle(self) -> CycleReport:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            if self.slow:
                release.wait(30)
            self.running -= 1
            self.cycles += 1
            return CycleReport(self.name)

    stop = threading.Event()
    slow, fast = Runner("slow", slow=True), Runner("fast", slow=False)
    loops = [
        SyncLoop(
            base.model_copy(update={"name": runner.name, "interval": timedelta(milliseconds=20), "reconcile": "off"}),
            runner,  # type: ignore[arg-type]
            runners={},
            progress=ProgressLog(lambda: {}),
            should_stop=stop.is_set,
        )
        for runner in (slow, fast)
    ]
    for loop in loops:
        loop.start()
    try:
        wait_for(lambda: fast.cycles >= 5, 10, "the fast sync's cycles while the slow one's first is running")
        assert (slow.cycles, slow.running) == (0, 1)
        release.set()
        wait_for(lambda: slow.cycles >= 3, 10, "the slow sync's next cycles")
        assert loops[0].state == loops[1].state == "ok"
    finally:
        release.set()
        stop.set()
        for loop in loops:
            loop.wake()
            loop.thread.join(5)
    assert not any(loop.thread.is_alive() for loop in loops)  # a stop ends every loop
    assert slow.most_at_once == fast.most_at_once == 1


@pytest.mark.parametrize("crm", ["sqlite", "postgres", "mysql"], indirect=True)
def test_a_quiet_sync_cycles_without_writing_the_state_and_still_sends_the_next_change(crm, api, tmp_path):
    """Between the full cycles that renew the lease (every half lease), a sync with nothing
    past its watermark neither renews its lease nor rewrites its status row."""
    from syncd.config import load_config
    from syncd.runtime import Runtime

    crm.insert([contact(i) for i in range(1, 4)])
    path = write_config(
        tmp_path / "syncd.toml", source_url=crm.url, api_url=api.url, state_url=f"sqlite:///{tmp_path / 'state.db'}"
    )
    with Runtime.open(load_config(path)) as runtime:
        runner = runtime.runners["contacts"]
        assert runner.run_cycle().sent == 3
        runner.run_cycle()  # nothing new: a full cycle, which takes the lease
        lease, [status] = runtime.state.lease_holder("contacts"), runtime.state.status()
        quiet = [runner.run_cycle() for _ in range(3)]
        assert [(r.outcome, r.rows_read, r.backlog) for r in quiet] == [("ok", 0, 0)] * 3
        assert runtime.state.lease_holder("contacts") == lease
        assert runtime.state.status()[0].last_run_at == status.last_run_at

        crm.update([2], first_name="Changed")
        wait_for(lambda: runner.run_cycle().sent == 1, 10, "the changed row sent by a cycle")
    assert stored(api)["acct-2"]["firstname"] == "Changed"
