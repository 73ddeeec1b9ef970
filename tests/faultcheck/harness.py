"""One seeded run: fresh databases, the simulator, 1 to 3 `syncd run` daemons behind cuttable
proxies, writers and faults for a few seconds, then heal, catch up, stop and judge.

Each daemon reaches both databases through a proxy of its own, so a cut isolates one daemon
from the state database or from the source while the others go on. Everything a run leaves
is in its work directory: the configs, each daemon's log, the plan and the result.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from .checker import FIELDS, KEY, Verdict, judge
from .plan import LEASE_S, Fault, Plan
from .proxy import Proxy
from .writers import Writers, create_source, read_rows

ADMIN_URL = os.environ.get("SYNCD_TEST_POSTGRES", "postgresql+psycopg://root@127.0.0.1:5432/test")
TOKEN = "faultcheck-token-3b7e"
DATASTORE = "1466"
CATCH_UP_S = 2 * LEASE_S + 10  # after the heal: two leases for a takeover, then the backlog
STOP_S = 10


def syncd_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "syncd.cli", *args]


def filter_supported(workdir: Path) -> bool:
    """Whether this syncd knows the `filter` key (built on another branch): soft deletes
    are only written when the sync can exclude them."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "api-token").write_text(TOKEN + "\n")
    probe = write_config(
        workdir / "filter-probe.toml",
        state_url="postgresql+psycopg://root@127.0.0.1:1/x",
        source_url="postgresql+psycopg://root@127.0.0.1:1/x",
        api_url="http://127.0.0.1:1/v1",
        token_file=workdir / "api-token",
        interval_ms=500,
        settle_ms=200,
        batch=10,
        soft_deletes=True,
    )
    result = subprocess.run(syncd_command("check", "--config-only", "-c", str(probe)), capture_output=True, timeout=60)
    return result.returncode == 0


def write_config(
    path: Path,
    *,
    state_url: str,
    source_url: str,
    api_url: str,
    token_file: Path,
    interval_ms: int,
    settle_ms: int,
    batch: int,
    soft_deletes: bool,
) -> Path:
    # api.timeout_s well below the lease: a request stalled after the accept times out
    # and is retried while the lease still holds.
    path.write_text(
        f"""
[state]
url = "{state_url}"
lease = "{LEASE_S:g}s"

[log]
level = "info"

[api]
url = "{api_url}"
token_file = "{token_file}"
timeout_s = 1
requests_per_second = 0
max_in_flight = 2
max_batch_records = {batch}
backoff_base_s = 0.05
backoff_max_s = 0.5

[sources.crm]
url = "{source_url}"

[[syncs]]
name = "contacts"
source = "crm"
table = "contacts"
key = "id"
watermark = "updated_at"
interval = "{interval_ms}ms"
settle = "{settle_ms}ms"
reconcile = "off"
datastore_id = "{DATASTORE}"
feed_id = "1499"
{'filter = "deleted = 0"' if soft_deletes else ""}

[syncs.fields]
{FIELDS}
"""
    )
    return path


# ------------------------------------------------------------------------ processes


class Simulator:
    """`syncd simulate-api` as a subprocess, keeping every record it receives."""

    def __init__(self, workdir: Path, seed: int) -> None:
        self.log = (workdir / "simulator.log").open("wb")
        self.proc = subprocess.Popen(
            syncd_command(
                "simulate-api", "--port", "0", "--token", TOKEN, "--key-attribute", KEY,
                "--store", "history", "--retry-after", "0.2", "--seed", str(seed),
            ),
            stdout=subprocess.PIPE,
            stderr=self.log,
        )
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().decode().strip()
        if not self.url.startswith("http://"):
            raise RuntimeError(f"the simulator did not start: {self.url!r} (exit {self.proc.poll()})")
        self.base = self.url.split("/v1/")[0]
        self.client = httpx.Client(base_url=self.base, timeout=10)

    def set_faults(self, **rates: float) -> None:
        self.client.post("/_sim/faults", json=rates).raise_for_status()

    def heal(self) -> None:
        self.set_faults(fail_rate=0, drop_rate=0, throttle_rate=0, stall_rate=0, stall_s=0)

    def history(self) -> list[dict[str, Any]]:
        return self.client.get("/_sim/history", params={"datastore-id": DATASTORE}).json()["records"]

    def stats(self) -> dict[str, Any]:
        return self.client.get("/_sim/stats").json()

    def close(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self.log.close()


class Daemon:
    """One `syncd run`, restartable after a kill; every incarnation logs to the same file."""

    def __init__(self, index: int, config: Path, log_path: Path) -> None:
        self.index = index
        self.config = config
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped = False  # SIGSTOPped
        self.unexpected_exits: list[int] = []
        self.start()

    def start(self) -> None:
        self._noted = False
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                syncd_command("run", "-c", str(self.config)),
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def started(self) -> bool:
        """Whether the current incarnation has logged `daemon_started` (or exited)."""
        return not self.alive or b'"daemon_started"' in self.log_path.read_bytes()

    def kill(self) -> None:
        self.note_exit()
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self._noted = True  # asked for
            self.stopped = False

    def pause(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGSTOP)
            self.stopped = True

    def resume(self) -> None:
        if self.alive and self.stopped:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)
        self.stopped = False

    def ensure_running(self) -> None:
        """Resume a stopped daemon, restart a dead one (noting an exit nobody asked for)."""
        self.resume()
        if not self.alive:
            self.start()

    def note_exit(self) -> None:
        """Record an exit nobody asked for (once per incarnation)."""
        if self.proc is not None and self.proc.poll() is not None and not self._noted:
            self.unexpected_exits.append(self.proc.returncode)
            self._noted = True

    def terminate(self) -> int | None:
        if self.proc is None:
            return None
        self.resume()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# ------------------------------------------------------------------------ one run


@dataclass
class Result:
    seed: int
    daemons: int
    rows: int
    writes: int
    faults: list[str]
    filter: bool
    verdict: Verdict
    caught_up: bool
    catch_up_s: float
    elapsed_s: float
    requests: dict[str, int] = field(default_factory=dict)
    daemon_exits: list[str] = field(default_factory=list)
    writer_errors: list[str] = field(default_factory=list)
    workdir: str = ""

    @property
    def ok(self) -> bool:
        return self.verdict.ok

    def line(self) -> str:
        data = asdict(self)
        verdict = data.pop("verdict")
        examples = verdict.pop("examples")
        return json.dumps({**data, **verdict, "ok": self.ok, "examples": examples}, default=str)


class _Database:
    """A throwaway PostgreSQL database, dropped on close."""

    def __init__(self, admin: sa.Engine, name: str) -> None:
        self.admin, self.name = admin, name
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        self.url = sa.make_url(ADMIN_URL).set(database=name)
        self.port = self.url.port or 5432

    def via(self, port: int) -> str:
        return self.url.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)

    def direct(self) -> str:
        return self.url.render_as_string(hide_password=False)

    def drop(self) -> None:
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def run(plan: Plan, workdir: Path, *, say: Callable[[str], None] = lambda line: None) -> Result:
    """Play ``plan`` and judge it; everything is stopped and dropped on the way out."""
    began = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "plan.json").write_text(json.dumps(asdict(plan), indent=1, default=str))
    token_file = workdir / "api-token"
    token_file.write_text(TOKEN + "\n")
    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    tag = f"fc{plan.seed}_{uuid.uuid4().hex[:6]}"
    cleanups: list[Callable[[], Any]] = [admin.dispose]
    try:
        source_db = _Database(admin, f"{tag}_src")
        cleanups.append(source_db.drop)
        state_db = _Database(admin, f"{tag}_state")
        cleanups.append(state_db.drop)
        source = sa.create_engine(source_db.direct(), pool_size=8)
        cleanups.append(source.dispose)
        create_source(source, plan.rows)

        simulator = Simulator(workdir, plan.seed)
        cleanups.append(simulator.close)
        common = dict(
            api_url=simulator.url,
            token_file=token_file,
            interval_ms=plan.interval_ms,
            settle_ms=plan.settle_ms,
            batch=plan.batch,
            soft_deletes=plan.soft_deletes,
        )
        # An observer's view (no proxies) for status and the one migration before the start.
        observer = write_config(
            workdir / "observer.toml", state_url=state_db.direct(), source_url=source_db.direct(), **common
        )
        # Migrating once first: N daemons starting at once on an empty state database is a
        # case of its own (issue 10), not what this harness checks.
        subprocess.run(syncd_command("migrate", "-c", str(observer)), check=True, capture_output=True, timeout=120)

        proxies: dict[tuple[int, str], Proxy] = {}
        daemons: list[Daemon] = []
        for index in range(plan.daemons):
            for link, database in (("state", state_db), ("source", source_db)):
                proxy = proxies[index, link] = Proxy(database.port)
                cleanups.append(proxy.close)
            config = write_config(
                workdir / f"daemon{index}.toml",
                state_url=state_db.via(proxies[index, "state"].port),
                source_url=source_db.via(proxies[index, "source"].port),
                **common,
            )
            daemons.append(Daemon(index, config, workdir / f"daemon{index}.log"))

        def stop_daemons() -> None:
            for daemon in daemons:
                daemon.terminate()

        cleanups.append(stop_daemons)
        _wait(lambda: all(d.started() for d in daemons), 60)
        for fault in plan.faults:
            say(f"seed {plan.seed} fault {fault.describe()}")

        writers = Writers(source, plan)
        started = time.monotonic()
        writers.start(started)
        _play_faults(plan.faults, started, simulator, daemons, proxies)
        writers.join()

        # Heal everything, then let the daemons catch up.
        simulator.heal()
        for proxy in proxies.values():
            proxy.heal()
        for daemon in daemons:
            daemon.note_exit()
            daemon.ensure_running()
        healed = time.monotonic()
        rows = read_rows(source)
        caught_up = _catch_up(rows, simulator, observer)
        catch_up_s = time.monotonic() - healed
        exits = [f"daemon {d.index} exited {code}" for d in daemons for code in d.unexpected_exits]
        stop_daemons()
        verdict = judge(read_rows(source), simulator.history())
        return Result(
            seed=plan.seed,
            daemons=plan.daemons,
            rows=len(rows),
            writes=len(plan.writes),
            faults=[fault.describe() for fault in plan.faults],
            filter=plan.soft_deletes,
            verdict=verdict,
            caught_up=caught_up,
            catch_up_s=round(catch_up_s, 2),
            elapsed_s=round(time.monotonic() - began, 2),
            requests=simulator.stats()["by_status"],
            daemon_exits=exits,
            writer_errors=writers.errors,
            workdir=str(workdir),
        )
    finally:
        for cleanup in reversed(cleanups):
            try:
                cleanup()
            except Exception as error:  # one failed cleanup must not leave the others undone
                say(f"cleanup {getattr(cleanup, '__qualname__', cleanup)}: {error}")


def _play_faults(
    faults: tuple[Fault, ...], started: float, simulator: Simulator, daemons: list[Daemon], proxies: dict[tuple[int, str], Proxy]
) -> None:
    """Start and end each fault on time (faults on one target never overlap, plan.py)."""
    events: list[tuple[float, int, Callable[[], None]]] = []
    for fault in faults:
        begin, end = _actions(fault, simulator, daemons, proxies)
        events.append((fault.at, len(events), begin))
        events.append((fault.at + fault.duration, len(events), end))
    for at, _, action in sorted(events):
        delay = started + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        action()


def _actions(
    fault: Fault, simulator: Simulator, daemons: list[Daemon], proxies: dict[tuple[int, str], Proxy]
) -> tuple[Callable[[], None], Callable[[], None]]:
    if fault.kind == "api":
        stall = {"stall_s": 2.0} if "stall_rate" in fault.detail else {}  # > api.timeout_s
        return (lambda: simulator.set_faults(**fault.detail, **stall)), simulator.heal
    assert fault.target is not None
    daemon = daemons[fault.target]
    if fault.kind == "kill":
        return daemon.kill, daemon.ensure_running
    if fault.kind == "stop":
        return daemon.pause, daemon.resume
    proxy = proxies[fault.target, fault.detail["link"]]
    if fault.detail["mode"] == "reset":
        return proxy.reset, lambda: None
    return (lambda: proxy.set_mode(fault.detail["mode"])), proxy.heal


def _catch_up(rows: list[dict[str, Any]], simulator: Simulator, observer: Path) -> bool:
    """Wait until the datastore matches the source, or until nothing more arrives and
    `syncd status` says there is no backlog (a wrong final state then stays wrong), bounded."""
    deadline = time.monotonic() + CATCH_UP_S
    delivered, quiet_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        history = simulator.history()
        if judge(rows, history).ok:
            return True
        if len(history) != delivered:
            delivered, quiet_since = len(history), time.monotonic()
        elif time.monotonic() - quiet_since > LEASE_S and _no_backlog(observer):
            return False
        time.sleep(0.2)
    return False


def _no_backlog(observer: Path) -> bool:
    result = subprocess.run(syncd_command("status", "--json", "-c", str(observer)), capture_output=True, timeout=60)
    try:
        syncs = json.loads(result.stdout)["syncs"]
    except (ValueError, KeyError):
        return False
    return all(entry.get("backlog") == 0 for entry in syncs)


def _wait(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout}s")
        time.sleep(0.05)


__all__ = ["Result", "filter_supported", "run"]
