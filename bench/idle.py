"""What `syncd run` costs while nothing changes: CPU and memory of one daemon with N syncs.

Creates `--max` small PostgreSQL tables (`--rows` contacts each, the shape of
`bench/seed.py`), starts the API simulator, and for each sync count (`--syncs`, default
1, 20, 100) runs `syncd run` with that many syncs at `interval = "1s"`: after a warm-up
(every sync has run three ok cycles: its backfill of a few rows, then idle ones) it measures the
daemon's CPU time (process and children, psutil) and the cycles it ran (its
`syncd_cycles_total`) over a fixed window, and samples its RSS
every second. Sync counts are interleaved round-robin `--repeat` times so that a burst of
load from a neighbour hits them alike; medians are printed.

Usage: .venv/bin/python bench/idle.py [--syncs 1,20,100] [--window 30] [--repeat 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import psycopg
from common import FIELDS
from psycopg import sql
from run import SYNCD, simulator

from syncd.config_text import render_config

SCHEMA = "bench_idle"


def create_tables(dsn: str, count: int, rows: int) -> None:
    """(Re)create `count` tables `bench_idle.t000`... with `rows` contacts each."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(SCHEMA)))
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SCHEMA)))
        for n in range(count):
            table = sql.Identifier(SCHEMA, f"t{n:03d}")
            conn.execute(
                sql.SQL(
                    """CREATE TABLE {} (
                        id integer PRIMARY KEY, first_name varchar(100), last_name varchar(100),
                        email varchar(200), phone varchar(40), account_id varchar(40),
                        updated_at timestamptz NOT NULL
                    )"""
                ).format(table)
            )
            conn.execute(
                sql.SQL(
                    """INSERT INTO {} SELECT
                        i, 'First' || i, 'Last' || i, 'Person' || i || '@Example.COM',
                        '+4420' || lpad((79460000 + i)::text, 8, '0'), 'acct-' || i,
                        now() - interval '1 day' + i * interval '1 second'
                    FROM generate_series(1, %s) AS i"""
                ).format(table),
                (rows,),
            )
            conn.execute(sql.SQL("CREATE INDEX ON {} (updated_at, id)").format(table))
            conn.execute(sql.SQL("ANALYZE {}").format(table))


def write_config(
    path: Path, *, syncs: int, source_url: str, api_url: str, token_file: Path, state: Path, metrics: str
) -> Path:
    path.write_text(
        render_config(
            comment="written by bench/idle.py",
            state={"url": f"sqlite:///{state}"},
            metrics={"listen": metrics},
            log={"level": "warning", "format": "json"},
            api={"url": api_url, "token_file": str(token_file), "requests_per_second": 0},
            sources={"crm": {"url": source_url}},
            syncs=[
                {
                    "name": f"t{n:03d}",
                    "source": "crm",
                    "table": f"{SCHEMA}.t{n:03d}",
                    "key": "id",
                    "watermark": "updated_at",
                    "interval": "1s",
                    "settle": "0s",
                    "reconcile": "off",
                    "datastore_id": str(1000 + n),
                    "feed_id": str(2000 + n),
                    "fields": FIELDS,
                }
                for n in range(syncs)
            ],
        )
    )
    return path


def cpu_s(process: psutil.Process) -> float:
    """CPU seconds of the process and its (live) children."""
    total = 0.0
    for proc in [process, *process.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
        if proc is process:
            total += times.children_user + times.children_system  # children already reaped
    return total


def rss_mb(process: psutil.Process) -> float:
    total = 0
    for proc in [process, *process.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cycles_run(metrics: str) -> dict[tuple[str, str], float]:
    """syncd_cycles_total by (sync, outcome), from the daemon's /metrics."""
    text = httpx.get(f"http://{metrics}/metrics", timeout=30).text
    totals: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if line.startswith("syncd_cycles_total{"):
            labels = dict(part.split("=", 1) for part in line[line.index("{") + 1 : line.index("}")].split(","))
            totals[(labels["sync"].strip('"'), labels["outcome"].strip('"'))] = float(line.rsplit(" ", 1)[1])
    return totals


def count(totals: dict[tuple[str, str], float], outcome: str) -> float:
    return sum(n for (_, kind), n in totals.items() if kind == outcome)


def warm_up(daemon: subprocess.Popen[str], metrics: str, syncs: int, settle_s: float) -> None:
    """Until every sync has run a few ok cycles (its backfill and first idle ones), then `settle_s`."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"syncd run exited {daemon.returncode}: {daemon.stderr.read() if daemon.stderr else ''}")
        try:
            totals = cycles_run(metrics)
        except httpx.HTTPError:
            totals = {}
        if sum(1 for (_, kind), n in totals.items() if kind == "ok" and n >= 3) >= syncs:
            time.sleep(settle_s)
            return
        time.sleep(1.0)
    raise RuntimeError("the syncs did not all settle into idle cycles within 300 s")


def measure(syncd: str, config: Path, metrics: str, syncs: int, *, warmup_s: float, window_s: float) -> dict[str, float]:
    """One `syncd run`: CPU % of one core over the window after the warm-up, cycles, peak RSS."""
    daemon = subprocess.Popen([syncd, "run", "-c", str(config)], stderr=subprocess.PIPE, text=True)
    process = psutil.Process(daemon.pid)
    try:
        warm_up(daemon, metrics, syncs, warmup_s)
        cycles_before = cycles_run(metrics)
        cpu_before, started = cpu_s(process), time.monotonic()
        peak = rss_mb(process)
        while time.monotonic() - started < window_s:
            time.sleep(1.0)
            peak = max(peak, rss_mb(process))
        cpu_after, elapsed = cpu_s(process), time.monotonic() - started
        cycles_after = cycles_run(metrics)
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, errors = daemon.communicate(timeout=60)
    if daemon.returncode != 0:
        raise RuntimeError(f"syncd run exited {daemon.returncode}: {errors[-2000:]}")
    problems = [line for line in errors.splitlines() if '"level": "error"' in line or '"level":"error"' in line]
    if problems:
        raise RuntimeError(f"syncd logged errors, not an idle run: {problems[0]}")
    if count(cycles_after, "failed") > count(cycles_before, "failed"):
        raise RuntimeError("cycles failed: not an idle run")
    cycles = count(cycles_after, "ok") - count(cycles_before, "ok")
    cpu = cpu_after - cpu_before
    return {
        "cpu_pct": 100 * cpu / elapsed,
        "cycles_per_s": cycles / elapsed,
        "cpu_ms_per_cycle": 1000 * cpu / cycles if cycles else float("nan"),
        "rss_mb": peak,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=os.environ.get("BENCH_DSN", "postgresql://root@127.0.0.1:5432/test"))
    parser.add_argument("--syncs", default="1,20,100", help="sync counts to measure (default 1,20,100)")
    parser.add_argument("--rows", type=int, default=10, help="rows per table (default 10)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds between every sync's third cycle and the window (default 5)")
    parser.add_argument("--window", type=float, default=30.0, help="seconds measured (default 30)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each count, round-robin (default 3)")
    parser.add_argument("--syncd", default=SYNCD, help="the syncd executable (default: this venv's)")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.syncs.split(",")]
    source_url = re.sub(r"^postgresql(\+\w+)?://", "postgresql+psycopg://", args.dsn)
    create_tables(args.dsn, max(counts), args.rows)
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory(prefix="syncd-idle-") as tmp:
        work = Path(tmp)
        token = secrets.token_hex(16)
        (work / "api-token").write_text(token + "\n")
        with simulator(token) as api_url:
            for round_ in range(args.repeat):
                for n in counts:
                    state = work / f"state-{n}-{round_}.db"
                    metrics = f"127.0.0.1:{free_port()}"
                    config = write_config(
                        work / f"idle-{n}.toml",
                        syncs=n,
                        source_url=source_url,
                        api_url=api_url,
                        token_file=work / "api-token",
                        state=state,
                        metrics=metrics,
                    )
                    result = measure(args.syncd, config, metrics, n, warmup_s=args.warmup, window_s=args.window)
                    runs[n].append(result)
                    print(f"# {n} syncs, run {round_ + 1}: {result}", file=sys.stderr)
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{args.syncd}: idle `syncd run`, interval 1s, {args.window:g}s window, {date}, load {os.getloadavg()[0]:.1f}")
    print("| syncs | CPU (% of a core) | cycles/s | CPU per cycle | peak RSS | runs (CPU %) |")
    print("|---:|---:|---:|---:|---:|---|")
    for n in counts:
        cpu = statistics.median(r["cpu_pct"] for r in runs[n])
        rate = statistics.median(r["cycles_per_s"] for r in runs[n])
        per_cycle = statistics.median(r["cpu_ms_per_cycle"] for r in runs[n])
        rss = statistics.median(r["rss_mb"] for r in runs[n])
        each = ", ".join(f"{r['cpu_pct']:.1f}" for r in runs[n])
        print(f"| {n} | {cpu:.1f}% | {rate:.1f} | {per_cycle:.2f} ms | {rss:.0f} MB | {each} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
