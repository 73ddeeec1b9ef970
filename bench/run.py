"""syncd's benchmark, in one command: `make bench` (or `.venv/bin/python bench/run.py`).

Seeds N contacts in PostgreSQL, starts the API simulator as its own process, and measures
in one run, on the same rows, mapping and batch size (500):

1. backfill throughput and peak RSS of the limit (bench/limit.py), the dlt peer
   (bench/dlt_peer.py) and `syncd once`, interleaved round-robin `--repeat` times so that
   a burst of load from a neighbour hits all three alike; medians are reported;
2. syncd's idle cycle (nothing changed), a cycle after 1% of the rows changed, and a
   reconcile pass over unchanged rows, each timed inside syncd (the `cycle` log line);
3. optionally (`--scale-rows`) syncd's backfill peak RSS on a bigger table, to show that
   memory does not grow with the table.

Then it rewrites the results section of `--out` (bench/README.md) and `bench/results.json`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import secrets
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil
from common import write_config
from measure import Measured, run_measured
from seed import TABLE, change_fraction, postgres_version, seed

HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
PYTHON = sys.executable
SYNCD = str(VENV_BIN / "syncd")
START, END = "<!-- results:start -->", "<!-- results:end -->"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="contacts to seed (default 1,000,000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each backfill and cycle; medians reported (default 3)")
    parser.add_argument("--dlt-repeat", type=int, default=1, help="runs of the dlt backfill, ~5x slower than the others (default 1)")
    parser.add_argument("--reconcile-repeat", type=int, default=1, help="reconcile passes over the whole table (default 1)")
    parser.add_argument("--max-in-flight", type=int, default=3, help="syncd's api.max_in_flight (default 3)")
    parser.add_argument("--changed-every", type=int, default=100, help="change one row in N for the delta cycle (default 100 = 1%%)")
    parser.add_argument("--scale-rows", type=int, default=0, help="also measure syncd's backfill RSS at this many rows (default off)")
    parser.add_argument("--skip-dlt", action="store_true", help="leave the dlt peer out (no syncd/dlt ratio)")
    parser.add_argument(
        "--dlt-python",
        default=PYTHON,
        help="the interpreter of a venv with syncd[bench] (make bench keeps dlt out of syncd's own venv)",
    )
    parser.add_argument("--dsn", default=os.environ.get("BENCH_DSN", "postgresql://root@127.0.0.1:5432/test"))
    parser.add_argument("--schema", default="bench", help="PostgreSQL schema for the table (dropped and recreated)")
    parser.add_argument("--out", type=Path, default=HERE / "README.md", help="README whose results section is rewritten")
    args = parser.parse_args(argv)

    shown = _without(sys.argv[1:], "--dlt-python")  # make bench adds it itself
    command = "make bench BENCH_ARGS=" + shlex.quote(" ".join(shown)) if shown else "make bench"
    bench = Bench(args)
    try:
        results = bench.run()
    finally:
        shutil.rmtree(bench.work, ignore_errors=True)  # state dbs: ~65 MB per million rows each
    results["command"] = command
    (args.out.parent / "results.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")
    write_section(args.out, render(results))
    print(render(results))
    return 0


@dataclass
class Bench:
    """One benchmark run: a work dir, the simulator's URL once it is up, the syncd state in use."""

    args: argparse.Namespace
    work: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="syncd-bench-")))
    api_url: str = ""
    state: Path = Path()  # the state db the cycle measurements continue from

    @property
    def source_url(self) -> str:
        return re.sub(r"^postgresql(\+\w+)?://", "postgresql+psycopg://", self.args.dsn)

    def config(self, state: Path) -> Path:
        """The bench config (fields, endpoint, batch size) pointing at the state db `state`."""
        return write_config(
            self.work / "bench-config.toml",
            source_url=self.source_url,
            table=f"{self.args.schema}.{TABLE}",
            api_url=self.api_url,
            token_file=self.work / "api-token",
            state_url=f"sqlite:///{state}",
            max_in_flight=self.args.max_in_flight,
        )

    def run(self) -> dict[str, Any]:
        args = self.args
        results: dict[str, Any] = {"machine": machine(args.dsn), "rows": args.rows, "params": vars(args) | {"out": str(args.out)}}
        token = secrets.token_hex(16)
        (self.work / "api-token").write_text(token + "\n")
        with simulator(token) as self.api_url:
            say(f"seeding {args.rows:,} rows")
            seed(args.dsn, args.schema, args.rows)
            results["backfill"] = self.backfills()
            results["syncd_cycles"] = self.cycles()
            if args.scale_rows:
                say(f"seeding {args.scale_rows:,} rows for the memory scale check")
                seed(args.dsn, args.schema, args.scale_rows)
                results["scale"] = {"rows": args.scale_rows, "syncd": self.syncd_backfill(self.work / "scale.db")}
        return results

    # -- backfills

    def backfills(self) -> dict[str, list[dict[str, float]]]:
        """Each contender `--repeat` times, round-robin, each run from scratch."""
        args = self.args
        runs: dict[str, list[dict[str, float]]] = {"limit": [], "dlt": [], "syncd": []}
        config = self.config(self.work / "unused.db")  # limit and dlt read the fields and endpoint
        dlt_runs = 0 if args.skip_dlt else args.dlt_repeat
        for round_ in range(args.repeat):
            say(f"backfill round {round_ + 1}/{args.repeat}: limit")
            limit = run_measured([PYTHON, str(HERE / "limit.py"), str(config), args.dsn, args.schema]).check()
            runs["limit"].append(figures(limit, limit.result()))
            if round_ < dlt_runs:
                say(f"backfill round {round_ + 1}/{args.repeat}: dlt")
                pipelines = tempfile.mkdtemp(prefix="dlt-", dir=self.work)
                peer = run_measured(
                    [args.dlt_python, str(HERE / "dlt_peer.py"), str(config), self.source_url, args.schema, pipelines]
                ).check()
                runs["dlt"].append(figures(peer, peer.result()))
            say(f"backfill round {round_ + 1}/{args.repeat}: syncd")
            state = self.work / f"state-{round_}.db"
            runs["syncd"].append(self.syncd_backfill(state))
            self.state = state  # the cycle measurements continue from the last backfill
        for name, samples in runs.items():
            if samples and any(sample["rows"] != args.rows for sample in samples):
                raise RuntimeError(f"{name} pushed {[s['rows'] for s in samples]} rows, expected {args.rows}")
        return runs

    def syncd_backfill(self, state: Path) -> dict[str, float]:
        state.unlink(missing_ok=True)
        run = self.syncd("once", state)
        cycles = run.json_lines("cycle")
        return figures(run, {"rows": sum(c["sent"] for c in cycles), "seconds": sum(c["duration_s"] for c in cycles)})

    # -- syncd's cycles after the backfill

    def cycles(self) -> dict[str, list[dict[str, float]]]:
        args = self.args
        out: dict[str, list[dict[str, float]]] = {"idle": [], "idle_warm": [], "changed": [], "reconcile": []}
        for round_ in range(args.repeat):
            say(f"syncd cycles round {round_ + 1}/{args.repeat}: idle, {100 / args.changed_every:g}% changed, reconcile")
            out["idle"].append(self.cycle("once"))
            warm = run_measured([PYTHON, str(HERE / "warm_idle.py"), str(self.config(self.state)), "5"]).check()
            out["idle_warm"] += [{"duration_s": seconds} for seconds in warm.result()["warm_s"]]
            changed = change_fraction(args.dsn, args.schema, args.changed_every, tag=str(round_))
            sample = self.cycle("once")
            if sample["sent"] != changed:
                raise RuntimeError(f"changed {changed} rows but syncd sent {sample['sent']}")
            out["changed"].append(sample)
            if round_ < args.reconcile_repeat:
                out["reconcile"].append(self.cycle("reconcile"))
        return out

    def cycle(self, command: str) -> dict[str, float]:
        """One `syncd once` / `syncd reconcile`, from its `cycle` log line(s); with
        `settle = "0s"` a caught-up `once` is a single cycle, more would be summed."""
        run = self.syncd(command, self.state)
        cycles = run.json_lines("cycle")
        if not cycles:
            raise RuntimeError(f"syncd {command} logged no cycle line:\n{run.stderr[-2000:]}")
        duration = sum(c["duration_s"] for c in cycles)
        rows = sum(c["rows_read"] for c in cycles)
        return {
            "duration_s": duration,
            "rows_read": rows,
            "sent": sum(c["sent"] for c in cycles),
            "rows_per_s": rows / max(duration, 1e-9),
            "peak_rss_mb": run.peak_rss_mb,
            "peak_pss_mb": run.peak_pss_mb,
            "wall_s": run.wall_s,
        }

    def syncd(self, command: str, state: Path) -> Measured:
        config = self.config(state)
        extra = ["--no-progress"] if command == "once" else []
        return run_measured([SYNCD, command, "-c", str(config), *extra]).check()


def figures(run: Measured, result: dict[str, Any]) -> dict[str, float]:
    """rows/s over the contender's own work time (start-up excluded) and over its wall time."""
    return {
        "rows": result["rows"],
        "seconds": result["seconds"],
        "rows_per_s": result["rows"] / result["seconds"],
        "wall_s": run.wall_s,
        "wall_rows_per_s": result["rows"] / run.wall_s,
        "peak_rss_mb": run.peak_rss_mb,
        "peak_pss_mb": run.peak_pss_mb,
    }


@contextmanager
def simulator(token: str) -> Iterator[str]:
    """`syncd simulate-api` in its own process; yields the URL it prints on its first line."""
    process = subprocess.Popen(
        [SYNCD, "simulate-api", "--port", "0", "--store", "count", "--token", token, "--mandatory", ""],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        if not url.startswith("http"):
            raise RuntimeError(f"simulator did not start (said {url!r})")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def machine(dsn: str) -> dict[str, Any]:
    model = "?"
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": model,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "postgres": postgres_version(dsn),
        "python": platform.python_version(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# -- the README section


def med(samples: list[dict[str, float]], key: str) -> float:
    return statistics.median(sample[key] for sample in samples)


def each(samples: list[dict[str, float]], key: str, spec: str, scale: float = 1) -> str:
    """Every run's figure, so a reader sees the spread behind a median."""
    return ", ".join(format(sample[key] * scale, spec) for sample in samples)


def render(results: dict[str, Any]) -> str:
    m, n = results["machine"], results["rows"]
    backfill, cycles = results["backfill"], results["syncd_cycles"]
    lines = [
        f"Run {m['date']} on {m['nproc']} × {m['cpu']}, {m['ram_gib']} GiB RAM, PostgreSQL {m['postgres']}, "
        f"Python {m['python']} (load average at start {', '.join(map(str, m['load_avg_at_start']))}).",
        f"N = {n:,} rows, batches of 500, syncd `max_in_flight` = {results['params']['max_in_flight']}, "
        f"{len(backfill['limit'])} backfill run(s) of limit and syncd, {len(backfill['dlt'])} of dlt, "
        f"{len(cycles['idle'])} of each syncd cycle, {len(cycles['reconcile'])} reconcile pass(es); medians.",
        "",
        f"Command: `{results['command']}`",
        "",
        "| backfill | rows/s (work) | rows/s (wall, incl. start-up) | peak memory MB (PSS) | peak RSS MB (summed) | runs (rows/s) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name in ("limit", "dlt", "syncd"):
        samples = backfill[name]
        if not samples:
            continue
        lines.append(
            f"| {name} | {med(samples, 'rows_per_s'):,.0f} | {med(samples, 'wall_rows_per_s'):,.0f} | "
            f"{med(samples, 'peak_pss_mb'):.0f} | {med(samples, 'peak_rss_mb'):.0f} | {each(samples, 'rows_per_s', ',.0f')} |"
        )
    syncd_rate = med(backfill["syncd"], "rows_per_s")
    ratios = [("syncd / limit", syncd_rate / med(backfill["limit"], "rows_per_s"), "≥ 0.6")]
    # The two run back to back in each round, so a round's ratio sees the same machine load.
    paired = [ours["rows_per_s"] / theirs["rows_per_s"] for ours, theirs in zip(backfill["syncd"], backfill["limit"], strict=False)]
    if len(paired) > 1:
        ratios.append(("syncd / limit, per round (median)", statistics.median(paired), "≥ 0.6"))
    if backfill["dlt"]:
        ratios.append(("syncd / dlt", syncd_rate / med(backfill["dlt"], "rows_per_s"), "≥ 5"))
    lines += ["", "| ratio (work rows/s) | measured | target |", "|---|---:|---|"]
    lines += [f"| {name} | {value:.2f} | {target} |" for name, value, target in ratios]

    changed_rows = med(cycles["changed"], "sent")
    reconcile_rate = med(cycles["reconcile"], "rows_per_s")
    lines += [
        "",
        "| syncd | measured (median) | target | runs |",
        "|---|---:|---|---|",
        f"| backfill peak memory (PSS, process tree), {n:,} rows | {med(backfill['syncd'], 'peak_pss_mb'):.0f} MB | ≤ 150 MB | "
        f"{each(backfill['syncd'], 'peak_pss_mb', '.0f')} |",
        f"| backfill peak RSS summed over the tree (shared pages twice), {n:,} rows | "
        f"{med(backfill['syncd'], 'peak_rss_mb'):.0f} MB | | {each(backfill['syncd'], 'peak_rss_mb', '.0f')} |",
    ]
    if "scale" in results:
        scale = results["scale"]
        lines.append(
            f"| backfill peak memory (PSS), {scale['rows']:,} rows | {scale['syncd']['peak_pss_mb']:.0f} MB | "
            f"flat vs {n:,} | RSS summed {scale['syncd']['peak_rss_mb']:.0f} MB; {scale['syncd']['rows_per_s']:,.0f} rows/s |"
        )
    lines += [
        f"| idle cycle, `syncd once` (cold process) | {med(cycles['idle'], 'duration_s') * 1000:.0f} ms | ≤ 20 ms | "
        f"{each(cycles['idle'], 'duration_s', '.0f', 1000)} |",
        f"| idle cycle, warm (daemon: 2nd+ cycle in one process) | {med(cycles['idle_warm'], 'duration_s') * 1000:.1f} ms | ≤ 20 ms | "
        f"{each(cycles['idle_warm'], 'duration_s', '.1f', 1000)} |",
        f"| cycle after {changed_rows:,.0f} rows changed | {med(cycles['changed'], 'duration_s'):.2f} s | ≤ 1 s | "
        f"{each(cycles['changed'], 'duration_s', '.2f')} |",
        f"| reconcile, nothing changed | {reconcile_rate:,.0f} rows/s | ≥ 200,000 rows/s | "
        f"{each(cycles['reconcile'], 'rows_per_s', ',.0f')} |",
        f"| reconcile peak memory (PSS) | {med(cycles['reconcile'], 'peak_pss_mb'):.0f} MB | | "
        f"RSS {med(cycles['reconcile'], 'peak_rss_mb'):.0f} MB |",
    ]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace what lies between the results markers, keeping the README's prose."""
    text = path.read_text() if path.exists() else f"# syncd benchmark\n\n## Results\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text += f"\n## Results\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{section}\n{END}{tail}")


def _without(argv: list[str], option: str) -> list[str]:
    """`argv` without `option` and its value (given as two words or as option=value)."""
    kept, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == option:
            skip = True
        elif not word.startswith(option + "="):
            kept.append(word)
    return kept


def say(message: str) -> None:
    print(f"[bench {dt.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
