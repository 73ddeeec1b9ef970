"""One seeded run: fresh databases, the simulator, 1 to 3 `syncd run` daemons behind cuttable
proxies, writers and faults for a few seconds, then heal, catch up, stop and judge.

Each daemon reaches both databases through a proxy of its own, so a cut isolates one daemon
from the state database or from the source while the others go on. Everything a run leaves
is in its work directory: the configs, each daemon's log, the plan and the result.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from syncd.config_text import render_config

from .checker import FIELDS, KEY, Verdict, judge
from .plan import LEASE_S, Fault, Plan
from .proxy import Proxy
from .writers import Writers, create_source, read_rows

__all__ = ["ADMIN_URL", "Database", "Result", "filter_supported", "run"]

ADMIN_URL = os.environ.get("SYNCD_TEST_POSTGRES", "postgresql+psycopg://root@127.0.0.1:5432/test")
TOKEN = "faultcheck-token-3b7e"
DATASTORE = "1466"
CATCH_UP_S = 2 * LEASE_S + 10  # after the heal: two leases for a takeover, then the backlog
STOP_S = 10
_BUSY_LATENCY_S = 0.3
_STATUS_KEYS = ("state", "records_sent", "dead_letters", "removed")


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
        render_config(
            state={"url": state_url, "lease": f"{LEASE_S:g}s"},
            log={"level": "info"},
            api={
                "url": api_url,
                "token_file": str(token_file),
                "timeout_s": 1,
                "requests_per_second": 0,
                "max_in_flight": 2,
                "max_batch_records": batch,
                "backoff_base_s": 0.05,
                "backoff_max_s": 0.5,
            },
            sources={"crm": {"url": source_url}},
            syncs=[
                {
                    "name": "contacts",
                    "source": "crm",
                    "table": "contacts",
                    "key": "id",
                    "watermark": "updated_at",
                    "interval": f"{interval_ms}ms",
                    "settle": f"{settle_ms}ms",
                    "reconcile": "off",
                    "datastore_id": DATASTORE,
                    "feed_id": "1499",
                    "filter": "deleted = 0" if soft_deletes else None,
                    "fields": tomllib.loads(FIELDS),
                }
            ],
        )
    )
    return path


# ------------------------------------------------------------------------ processes


class Simulator:
    """`syncd simulate-api` as a subprocess, keeping every record it receives."""

    def __init__(self, workdir: Path, seed: int, latency_s: float) -> None:
        self.log = (workdir / "simulator.log").open("wb")
        self.proc = subprocess.Popen(
            syncd_command(
                "simulate-api", "--port", "0", "--token", TOKEN, "--key-attribute", KEY,
                "--store", "history", "--retry-after", "0.2", "--seed", str(seed), "--latency", str(latency_s),
            ),
            stdout=subprocess.PIPE,
            stderr=self.log,
        )
        self.client = httpx.Client(timeout=10)

    def wait_ready(self) -> None:
        """Read the URL it prints once listening (it starts while the databases are made)."""
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().decode().strip()
        if not self.url.startswith("http://"):
            raise RuntimeError(f"the simulator did not start: {self.url!r} (exit {self.proc.poll()})")
        self.client.base_url = httpx.URL(self.url.split("/v1/")[0])

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
        self.incarnations = 0
        self.start()

    def start(self) -> None:
        self._noted = False
        self.incarnations += 1
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
        """Whether the current incarnation has logged `started` (or exited)."""
        return not self.alive or self.log_path.read_bytes().count(b'"event":"started"') >= self.incarnations

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
        self.note_exit()
        if not self.alive:
            self.start()

    def note_exit(self) -> None:
        """Record an exit nobody asked for (once per incarnation)."""
        if self.proc is not None and self.proc.poll() is not None and not self._noted:
            self.unexpected_exits.append(self.proc.returncode)
            self._noted = True

    def signal_stop(self) -> None:
        """SIGTERM without waiting, so several daemons drain at once."""
        self.resume()
        if self.alive:
            assert self.proc is not None
            self.proc.terminate()

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
    hits: list[str]  # what each fault hit, when
    filter: bool
    verdict: Verdict
    caught_up: bool
    catch_up_s: float
    elapsed_s: float
    requests: dict[str, int] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)  # `syncd status --json` at the end
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


class Database:
    """A throwaway PostgreSQL database (dropped by ``drop``): the open-transaction gate only
    looks at its own database, so other sessions on the server do not hold a run back."""

    def __init__(self, admin: sa.Engine, name: str) -> None:
        self.admin, self.name = admin, name
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE template0')
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
        simulator = Simulator(workdir, plan.seed, plan.latency_s)
        cleanups.append(simulator.close)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            made = [pool.submit(Database, admin, f"{tag}_{what}") for what in ("src", "state")]
        for future in made:  # each one made is dropped, even if the other failed
            if future.exception() is None:
                cleanups.append(future.result().drop)
        source_db, state_db = (future.result() for future in made)
        source = sa.create_engine(source_db.direct(), pool_size=8)
        cleanups.append(source.dispose)
        state = sa.create_engine(state_db.direct(), poolclass=sa.pool.NullPool)
        cleanups.append(state.dispose)
        create_source(source, plan.rows)

        simulator.wait_ready()
        common = {
            "api_url": simulator.url,
            "token_file": token_file,
            "interval_ms": plan.interval_ms,
            "settle_ms": plan.settle_ms,
            "batch": plan.batch,
            "soft_deletes": plan.soft_deletes,
        }
        # An observer's view (no proxies), for `syncd status`.
        observer = write_config(
            workdir / "observer.toml", state_url=state_db.direct(), source_url=source_db.direct(), **common
        )

        proxies: dict[tuple[int, str], Proxy] = {}
        daemons: list[Daemon] = []

        def stop_daemons() -> None:
            for daemon in daemons:
                daemon.signal_stop()
            for daemon in daemons:
                daemon.terminate()

        cleanups.append(stop_daemons)
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
            if index == 0:
                # The first one migrates the empty state database before the others start:
                # N daemons starting at once on an empty state database is a case of its own
                # (issue 10), not what this harness checks. The others may still be starting
                # when the writes begin, as after a deployment.
                _wait(daemons[0].started, 60)

        for fault in plan.faults:
            say(f"seed {plan.seed} fault {fault.describe()}")

        writers = Writers(source, plan)
        cleanups.append(writers.stop)  # before the source engine is disposed, if a fault failed
        started = time.monotonic()
        writers.start(started)
        faults = _Faults(simulator, daemons, proxies, state, plan.latency_s)
        faults.play(plan.faults, started)
        writers.join()

        # Heal everything, then let the daemons catch up.
        simulator.heal()
        for proxy in proxies.values():
            proxy.heal()
        for daemon in daemons:
            daemon.ensure_running()
        healed = time.monotonic()
        rows = read_rows(source)
        caught_up = _catch_up(rows, simulator, observer, daemons)
        catch_up_s = time.monotonic() - healed
        exits = [f"daemon {d.index} exited {code}" for d in daemons for code in d.unexpected_exits]
        stop_daemons()
        final_rows, history = read_rows(source), simulator.history()
        verdict = judge(final_rows, history)
        if not verdict.ok:
            _keep_evidence(workdir / "evidence.json", final_rows, history, simulator, state)
        # What syncd itself says, beside the harness's own count (removed: where `filter` exists).
        status = {k: v for k, v in (_status(observer) or [{}])[0].items() if k in _STATUS_KEYS}
        return Result(
            seed=plan.seed,
            daemons=plan.daemons,
            rows=len(rows),
            writes=len(plan.writes),
            faults=[fault.describe() for fault in plan.faults],
            hits=faults.log,
            filter=plan.soft_deletes,
            verdict=verdict,
            caught_up=caught_up,
            catch_up_s=round(catch_up_s, 2),
            elapsed_s=round(time.monotonic() - began, 2),
            requests=simulator.stats()["by_status"],
            status=status,
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


class _Faults:
    """Plays the plan's faults on time and notes what each one hit."""

    def __init__(
        self,
        simulator: Simulator,
        daemons: list[Daemon],
        proxies: dict[tuple[int, str], Proxy],
        state: sa.Engine,
        latency_s: float,
    ) -> None:
        self.simulator, self.daemons, self.proxies, self.state = simulator, daemons, proxies, state
        self.latency_s = latency_s
        self.log: list[str] = []

    def play(self, faults: tuple[Fault, ...], started: float) -> None:
        """Start and end each fault on time (faults on one target never overlap, plan.py)."""
        events: list[tuple[float, int, Fault, bool]] = []
        for fault in faults:
            events.append((fault.at, len(events), fault, True))
            events.append((fault.at + fault.duration, len(events), fault, False))
        hit: dict[int, int] = {}  # id(fault) -> the daemon it hit
        for at, _, fault, begin in sorted(events, key=lambda event: event[:2]):
            delay = started + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if begin and fault.target is not None:
                hit[id(fault)] = self._aim(fault)
                self.log.append(f"+{time.monotonic() - started:.2f}s {fault.kind} hits daemon {hit[id(fault)]}")
            self._apply(fault, hit.get(id(fault)), begin)

    def _aim(self, fault: Fault) -> int:
        assert fault.target is not None
        if fault.detail.get("aim") != "owner":
            return fault.target
        try:
            with self.state.connect() as conn:
                owner = conn.exec_driver_sql("SELECT owner FROM syncs WHERE name = 'contacts'").scalar()
        except sa.exc.SQLAlchemyError:
            owner = None
        pid = owner.split(":")[1] if owner else None
        for daemon in self.daemons:
            if daemon.alive and daemon.proc is not None and str(daemon.proc.pid) == pid:
                return daemon.index
        return fault.target

    def _apply(self, fault: Fault, target: int | None, begin: bool) -> None:
        if fault.kind == "api":
            if begin:
                stall = {"stall_s": 2.0} if "stall_rate" in fault.detail else {}  # > api.timeout_s
                self.simulator.set_faults(**fault.detail, **stall)
            else:
                self.simulator.heal()
            return
        assert target is not None
        daemon = self.daemons[target]
        if fault.kind == "kill":
            daemon.kill() if begin else daemon.ensure_running()
        elif fault.kind == "stop":
            if begin and fault.detail.get("busy"):
                self.simulator.set_faults(latency_s=_BUSY_LATENCY_S)
                time.sleep(_BUSY_LATENCY_S * 1.5)  # a request on the wire, the next batches read
                daemon.pause()
                self.simulator.set_faults(latency_s=self.latency_s)
            else:
                daemon.pause() if begin else daemon.resume()
        else:
            proxy = self.proxies[target, fault.detail["link"]]
            if fault.detail["mode"] == "reset":
                if begin:
                    proxy.reset()
            elif begin:
                proxy.set_mode(fault.detail["mode"])
            else:
                proxy.heal()


def _catch_up(rows: list[dict[str, Any]], simulator: Simulator, observer: Path, daemons: list[Daemon]) -> bool:
    """Wait until the datastore matches the source, or until every daemon is up, nothing more
    arrives and `syncd status` says there is no backlog (a wrong final state then stays wrong);
    bounded."""
    deadline = time.monotonic() + CATCH_UP_S
    hard_deadline = deadline + 60  # for daemons still starting on a loaded machine
    delivered, quiet_since = -1, time.monotonic()
    while time.monotonic() < min(deadline, hard_deadline):
        history = simulator.history()
        if judge(rows, history).ok:
            return True
        if not all(daemon.started() for daemon in daemons):
            deadline = time.monotonic() + CATCH_UP_S  # the time to catch up starts when they are up
            quiet_since = time.monotonic()
        elif len(history) != delivered:
            delivered, quiet_since = len(history), time.monotonic()
        elif time.monotonic() - quiet_since > LEASE_S and _no_backlog(observer):
            return False
        time.sleep(0.2)
    return False


def _keep_evidence(
    path: Path, rows: list[dict[str, Any]], history: list[dict[str, Any]], simulator: Simulator, state: sa.Engine
) -> None:
    """What a failed seed leaves for its post-mortem, beside the daemons' logs: the source rows,
    every record received, the simulator's request log, and the state database's syncs and pushes."""
    tables: dict[str, Any] = {}
    with state.connect() as conn:
        for table in ("syncs", "pushes"):
            tables[table] = [dict(row._mapping) for row in conn.exec_driver_sql(f"SELECT * FROM {table}")]
    requests = simulator.client.get("/_sim/requests").json()["requests"]
    evidence = {"rows": rows, "history": history, "requests": requests, **tables}
    path.write_text(json.dumps(evidence, indent=1, default=str))


def _no_backlog(observer: Path) -> bool:
    syncs = _status(observer)
    return bool(syncs) and all(entry.get("backlog") == 0 for entry in syncs)


def _status(observer: Path) -> list[dict[str, Any]]:
    """`syncd status --json`'s syncs, [] if it cannot say."""
    result = subprocess.run(syncd_command("status", "--json", "-c", str(observer)), capture_output=True, timeout=60)
    try:
        return json.loads(result.stdout)["syncs"]
    except (ValueError, KeyError):
        return []


def _wait(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout}s")
        time.sleep(0.05)

