"""Failover: how long a sync stands still when its owner dies or stalls, and what it costs.

Two `syncd run` daemons share one PostgreSQL state database (the CRM lives in the same
database, in a throwaway schema) and push to the in-process simulator, each with its own
API key so the simulator tells their requests apart. Per trial:

1. daemon A starts a backfill of `--rows` rows (simulator latency keeps batches in flight,
   and the backfill takes ~10 s); daemon B starts and stands by;
2. when A has delivered a third of the rows, A gets `kill -9` or SIGSTOP (t0);
3. measured: the time until B's first accepted request (t1), in leases: (t1 - t0) / lease;
   the duplicates (records received minus distinct keys, once every row has arrived);
   for SIGSTOP, A is then resumed (SIGCONT) and every request it posts afterwards is counted
   (it must be 0: a stale owner sends nothing).

    .venv/bin/python bench/failover.py                       # lease 4 s, 3 trials of each fault
    .venv/bin/python bench/failover.py --lease 10 --trials 5

A `kill -9` on the same host is noticed at once (the owner's process is gone, `state.py`
checks its pid); across hosts it costs what a SIGSTOP costs: the lease running out, then
the standby's next cycle (`interval`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from syncd.config_text import render_config
from syncd.simulator import SimulatorConfig, start_in_thread

TOKENS = ("bench-key-a", "bench-key-b")  # key#1 = daemon A, key#2 = daemon B


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=os.environ.get("BENCH_DSN", "postgresql+psycopg://root@127.0.0.1:5432/test"))
    parser.add_argument("--lease", type=float, default=4.0, help="state.lease in seconds")
    parser.add_argument("--interval", type=float, default=1.0, help="the sync's interval in seconds")
    parser.add_argument("--rows", type=int, default=20_000, help="the backfill A is in the middle of")
    parser.add_argument("--trials", type=int, default=3, help="per fault")
    args = parser.parse_args()
    # A killed daemon drops its connections mid-request: expected here, not worth a traceback.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    results: dict[str, list[dict[str, Any]]] = {"kill -9": [], "SIGSTOP": []}
    for trial in range(args.trials):
        for fault in results:
            result = run_trial(args, fault)
            results[fault].append(result)
            print(f"trial {trial + 1} {fault}: {result}", file=sys.stderr, flush=True)
    print(f"\nlease {args.lease:g} s, interval {args.interval:g} s, api.timeout_s 1 s, {args.rows:,} rows, "
          f"batches of 50, max_in_flight 2, simulator latency 50 ms; {args.trials} trials per fault\n")
    print("| fault | failover s (median, max) | in leases (max) | duplicates (median, max) "
          "| posts by the stalled owner after SIGCONT |")
    print("|---|---:|---:|---:|---:|")
    for fault, runs in results.items():
        seconds = [r["failover_s"] for r in runs]
        dups = [r["duplicates"] for r in runs]
        stale = "n/a" if fault == "kill -9" else str(sum(r["stale_posts"] for r in runs))
        print(
            f"| {fault} | {statistics.median(seconds):.2f}, {max(seconds):.2f} | {max(seconds) / args.lease:.2f} "
            f"| {statistics.median(dups):g}, {max(dups)} | {stale} |"
        )
    return 0


def run_trial(args: argparse.Namespace, fault: str) -> dict[str, Any]:
    schema = f"failover_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(args.dsn)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = sa.make_url(args.dsn).update_query_dict({"options": f"-csearch_path={schema}"})
    crm = sa.create_engine(url)
    daemons: list[subprocess.Popen[bytes]] = []
    tmp, done = "", None
    try:
        seed(crm, args.rows)
        tmp = tempfile.mkdtemp(prefix="syncd-failover-")  # the daemons' logs stay there
        with start_in_thread(SimulatorConfig(tokens=TOKENS, key_attribute="accountid", latency_s=0.05)) as api:
            configs = [write_config(Path(tmp) / name, url, api.url, token, args) for name, token in zip("ab", TOKENS, strict=True)]
            daemons.append(start(configs[0]))
            wait(lambda: first_request(api, "key#1"), 60, "daemon A's first request")  # A holds the lease
            daemons.append(start(configs[1]))
            wait(lambda: '"event":"started"' in (configs[1].parent / "daemon.log").read_text(), 60, "daemon B")
            wait(lambda: api.received("1466") >= args.rows // 3, 120, "daemon A's backfill")
            daemons[0].send_signal(signal.SIGKILL if fault == "kill -9" else signal.SIGSTOP)
            stopped = time.time()
            if fault == "kill -9":
                daemons[0].wait()  # reaped, as systemd reaps it: a zombie would still look alive
            first_b = wait(lambda: first_request(api, "key#2"), 120, "daemon B's first request")
            wait(lambda: len(api.records("1466")) >= args.rows, 120, "every row")
            result: dict[str, Any] = {"failover_s": round(first_b - stopped, 3)}
            if fault == "SIGSTOP":
                resumed = time.time()
                daemons[0].send_signal(signal.SIGCONT)
                time.sleep(args.lease)  # a lease for A to notice; anything it posts shows up by then
                result["stale_posts"] = sum(
                    1 for r in api.requests() if r["key"] == "key#1" and r["time"] > resumed and r["status"] == 200
                )
            result["duplicates"] = api.received("1466") - len(api.records("1466"))
        done = result
        return result
    finally:
        for daemon in daemons:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGCONT)
                daemon.kill()
            daemon.wait()
        if done is not None:
            shutil.rmtree(tmp)  # the daemons' logs stay only when a trial fails
        crm.dispose()
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def seed(engine: sa.Engine, rows: int) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(
            "CREATE TABLE contacts (id integer PRIMARY KEY, first_name text, phone text, account_id text, "
            "updated_at timestamp NOT NULL)"
        ))
        # An hour old: other sessions' open transactions on a shared server must not hold the bound back.
        conn.execute(sa.text(
            "INSERT INTO contacts SELECT i, 'First' || i, '+4420' || (79460000 + i), 'acct-' || i, "
            "localtimestamp - interval '1 hour' FROM generate_series(1, :rows) AS i"
        ), {"rows": rows})


def write_config(directory: Path, url: sa.URL, api_url: str, token: str, args: argparse.Namespace) -> Path:
    directory.mkdir()
    (directory / "api-token").write_text(token + "\n")
    dsn = url.render_as_string(hide_password=False)
    path = directory / "syncd.toml"
    path.write_text(render_config(
        state={"url": dsn, "lease": f"{args.lease}s"},
        log={"level": "info"},
        api={
            "url": api_url,
            "token_file": str(directory / "api-token"),
            "timeout_s": 1,
            "requests_per_second": 0,
            "max_in_flight": 2,
            "max_batch_records": 50,
        },
        sources={"crm": {"url": dsn}},
        syncs=[{
            "name": "contacts",
            "source": "crm",
            "table": "contacts",
            "key": "id",
            "watermark": "updated_at",
            "interval": f"{args.interval}s",
            "settle": "0s",
            "datastore_id": "1466",
            "feed_id": "1499",
            "fields": {
                "msisdn": {"column": "phone", "transform": "e164", "required": True},
                "firstname": "first_name",
                "accountid": "account_id",
            },
        }],
    ))
    return path


def start(config: Path) -> subprocess.Popen[bytes]:
    log = (config.parent / "daemon.log").open("wb")
    return subprocess.Popen([sys.executable, "-m", "syncd.cli", "run", "-c", str(config)], stdout=log, stderr=log)


def first_request(api: Any, key: str) -> float | None:
    times = [r["time"] for r in api.requests() if r["key"] == key and r["status"] == 200]
    return min(times) if times else None


def wait(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            logs = f"{tempfile.gettempdir()}/syncd-failover-*"
            raise SystemExit(f"failover bench: timed out waiting for {what} (daemon logs in {logs})")
        time.sleep(0.02)
    return value


if __name__ == "__main__":
    sys.exit(main())
