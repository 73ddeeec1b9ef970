"""`syncd demo`: the whole pipeline in one command, with nothing to set up.

It creates a small CRM in SQLite, starts the API simulator on a free local port, runs a
backfill, keeps the sync running while contacts change underneath it (a real change, an
edit that changes nothing the datastore sees, a broken phone number and its fix), and
prints what was sent, skipped as unchanged, dead-lettered and acknowledged.

The files stay in the demo directory (`./syncd-demo` unless `--dir`), so `syncd status`,
`syncd dead-letters list` and `syncd once` can be tried on them afterwards, together
with `config.example.toml`, which points at the same files.

The demo never deletes a directory, and never a file it did not write: it uses a new or
empty directory, or one an earlier demo left (marked by `.syncd-demo`), where it removes
only its own files before starting again. Anything else is refused.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from syncd.config import load_config
from syncd.config_text import render_config
from syncd.cycle import CycleReport
from syncd.errors import SyncdError
from syncd.logs import configure_logging
from syncd.runtime import Runtime
from syncd.simulator import SimulatorConfig, start_in_thread

__all__ = ["DemoDirectoryError", "run_demo"]

MARKER = ".syncd-demo"
# Everything the demo writes, SQLite's companions included: all it ever removes.
DEMO_FILES = tuple(
    f"{name}{suffix}" for name in ("crm.db", "state.db") for suffix in ("", "-wal", "-shm", "-journal")
) + ("api-token", "syncd.toml", MARKER)

DEMO_TOKEN = "demo-token"
FIRST_NAMES = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Margaret", "Ken", "Frances", "Dennis")
LAST_NAMES = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Hamilton", "Thompson", "Allen", "Ritchie")


class DemoDirectoryError(SyncdError):
    """The directory given to the demo holds files the demo did not write."""


def run_demo(rows: int = 200, directory: Path | None = None, cycle_every_s: float = 1.0) -> int:
    """Run the demo; `cycle_every_s` paces the live sync (its config says "1s"; tests go faster)."""
    directory = Path(directory or "syncd-demo").resolve()
    _prepare(directory)
    configure_logging("warning", "console")

    crm_url = f"sqlite:///{directory / 'crm.db'}"
    _create_crm(crm_url, rows)
    (directory / "api-token").write_text(DEMO_TOKEN + "\n")
    out = print

    with start_in_thread(SimulatorConfig(tokens=(DEMO_TOKEN,), key_attribute="accountid", insert_delay_s=0.2)) as api:
        config_path = _write_config(directory, crm_url, api.url)
        config = load_config(config_path)
        out(f"syncd demo: {rows} contacts in {directory / 'crm.db'}, API simulator at {api.url}\n")
        with Runtime.open(config) as runtime:
            runner = runtime.runners["contacts"]

            out("1. backfill")
            first = runner.run_cycle()
            _describe(out, first)

            out("\n2. the sync keeps running (every second) while the CRM changes:")
            reports: list[CycleReport] = []
            read = threading.Condition()  # notified after each cycle that read rows
            stop = threading.Event()

            def loop() -> None:
                while not stop.wait(cycle_every_s):
                    report = runner.run_cycle()
                    with read:
                        reports.append(report)
                        read.notify_all()

            def wait_until_read(before: int) -> None:
                """Each step waits for the sync to pick it up (settle first), so each change is
                its own cycle and the broken number is dead-lettered before it is fixed."""
                with read:
                    read.wait_for(lambda: any(r.rows_read for r in reports[before:]), timeout=30)

            thread = threading.Thread(target=loop, name="demo-sync")
            thread.start()
            engine = sa.create_engine(crm_url)
            steps = (
                ("   - contact 1 changes phone number", {"id": 1, "phone": "+44 20 7946 0999"}),
                ("   - contacts 2-5 are saved without any change the datastore would see", None),
                ("   - contact 6 gets a phone number that is not a number", {"id": 6, "phone": "12"}),
                ("   - contact 7 changes email", {"id": 7, "email": "New.Address@Example.org"}),
            )
            for text, change in steps:
                out(text)
                before = len(reports)
                with engine.begin() as conn:
                    now = _now()
                    if change is None:
                        conn.execute(sa.text("UPDATE contacts SET updated_at = :now WHERE id BETWEEN 2 AND 5"), {"now": now})
                    else:
                        conn.execute(
                            sa.text(
                                f"UPDATE contacts SET {next(k for k in change if k != 'id')} = :value, "
                                "updated_at = :now WHERE id = :id"
                            ),
                            {"value": next(v for k, v in change.items() if k != "id"), "now": now, "id": change["id"]},
                        )
                wait_until_read(before)
            out("   - contact 6's phone number is fixed")
            before = len(reports)
            with engine.begin() as conn:
                conn.execute(
                    sa.text("UPDATE contacts SET phone = '+44 20 7946 0606', updated_at = :now WHERE id = 6"),
                    {"now": _now()},
                )
            wait_until_read(before)
            stop.set()
            thread.join()
            engine.dispose()
            final = runner.run_until_caught_up()
            reports.append(final)

            changed = [r for r in reports if r.rows_read]
            for report in changed:
                _describe(out, report)

            api.wait_inserted("1466", rows - 1)
            stored = {record["accountid"]: record for record in api.records("1466")}
            status = runtime.state.status()[0]
            pushes = runtime.state.pushes("contacts", limit=1000)
            letters = list(runtime.state.dead_letters("contacts", include_resolved=True))

        out("\nSummary")
        out(f"  records acknowledged by the API : {status.records_sent}")
        out(f"  HTTP pushes                      : {len(pushes)} (each recorded with its code and trans_id)")
        out(f"  rows skipped as unchanged        : {sum(r.unchanged for r in reports)}")
        resolved = sum(1 for letter in letters if letter.resolved_at)
        out(f"  dead letters                     : {len(letters)} ({resolved} resolved by the fix)")
        out(f"  contacts in the datastore        : {len(stored)} of {rows}")
        out(f"  contact 1 in the datastore       : {stored.get('acct-00001')}")
        out("  last pushes:")
        for push in pushes[:3]:
            out(
                f"    {push['sent_at']:%H:%M:%S}  {push['record_count']:>4} records  HTTP {push['http_status']}  "
                f"code {push['api_code']}  trans_id {push['trans_id']}"
            )
        command = _command_name()
        out(f"\nTry: {command} status -c {config_path}")
        out(f"     {command} dead-letters list -c {config_path} --all")
    ok = status.records_sent >= rows and len(stored) == rows
    return 0 if ok else 1


def _prepare(directory: Path) -> None:
    """Make `directory` ready for a fresh demo, deleting nothing the demo did not write."""
    if directory.exists() and not directory.is_dir():
        raise DemoDirectoryError(f"{directory} is not a directory")
    if directory.is_dir() and not (directory / MARKER).is_file() and any(directory.iterdir()):
        raise DemoDirectoryError(
            f"{directory} is not empty and was not made by `syncd demo` (no {MARKER} in it); "
            "give a new or empty directory"
        )
    directory.mkdir(parents=True, exist_ok=True)
    for name in DEMO_FILES:
        (directory / name).unlink(missing_ok=True)
    (directory / MARKER).write_text("Written by `syncd demo`, which may remove the files it wrote here.\n")


def _describe(out, report: CycleReport) -> None:  # type: ignore[no-untyped-def]
    out(
        f"   cycle: read {report.rows_read}, sent {report.sent}, unchanged {report.unchanged}, "
        f"dead-lettered {report.dead_lettered}, {report.batches} push(es), "
        f"trans_id {report.last_trans_id or '-'}"
    )


def _command_name() -> str:
    """How the user can run syncd again: by the path they ran it by, if it is not on PATH."""
    program = sys.argv[0]
    if os.path.basename(program) == "syncd" and shutil.which("syncd") != os.path.abspath(program):
        return os.path.relpath(program)
    return "syncd"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _create_crm(url: str, rows: int) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE contacts (id INTEGER PRIMARY KEY, first_name TEXT, last_name TEXT, "
                "email TEXT, phone TEXT, account_id TEXT NOT NULL, updated_at TIMESTAMP NOT NULL)"
            )
        )
        conn.execute(sa.text("CREATE INDEX ix_contacts_updated_at_id ON contacts (updated_at, id)"))
        start = datetime.now(UTC) - timedelta(days=30)
        conn.execute(
            sa.text("INSERT INTO contacts VALUES (:id, :first, :last, :email, :phone, :account, :updated_at)"),
            [
                {
                    "id": i,
                    "first": FIRST_NAMES[i % 10],
                    "last": LAST_NAMES[(i // 10) % 10],
                    "email": f"{FIRST_NAMES[i % 10]}.{LAST_NAMES[(i // 10) % 10]}{i}@Example.com",
                    "phone": f"+44 20 7946 {i:04d}",
                    "account": f"acct-{i:05d}",
                    "updated_at": (start + timedelta(minutes=i)).strftime("%Y-%m-%d %H:%M:%S.%f"),
                }
                for i in range(1, rows + 1)
            ],
        )
    engine.dispose()


def _write_config(directory: Path, crm_url: str, api_url: str) -> Path:
    path = directory / "syncd.toml"
    path.write_text(
        render_config(
            comment="Written by `syncd demo`; see config.example.toml for every option.",
            state={"url": f"sqlite:///{directory / 'state.db'}"},
            log={"level": "warning", "format": "console"},
            api={
                "url": api_url,
                "token_file": str(directory / "api-token"),
                "requests_per_second": 50,
                "max_batch_records": 50,
            },
            sources={"crm": {"url": crm_url}},
            syncs=[
                {
                    "name": "contacts",
                    "source": "crm",
                    "table": "contacts",
                    "key": "id",
                    "watermark": "updated_at",
                    "interval": "1s",
                    "settle": "0.5s",
                    "datastore_id": "1466",
                    "feed_id": "1499",
                    "fields": {
                        "msisdn": {"column": "phone", "transform": "e164", "required": True},
                        "firstname": "first_name",
                        "lastname": "last_name",
                        "emailid": {"column": "email", "transform": ["strip", "lower"]},
                        "accountid": "account_id",
                    },
                }
            ],
        )
    )
    return path
