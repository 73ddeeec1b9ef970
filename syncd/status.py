"""`syncd status`: where each sync stands, from the state database and a live backlog count.

The JSON shape is part of the contract (DESIGN.md): `{"syncs": [{"name", "state",
"watermark", "last_run_at", "last_error", "records_sent", "backlog", "dead_letters", "removed"}]}`,
and since scale-out `running`, `progress` (`since`, `rows_read`, `sent` of the cycle running
now), `owner` (the daemon running it) and `last_success_at`.

Status only ever reads: a state database that does not exist, or was never migrated, is
reported as such (exit 1), never created. Run from the wrong directory, the default
SQLite path would otherwise be a fresh, empty database that says "never_run".
"""

from __future__ import annotations

import os
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from syncd.config import Config, SecretFileError
from syncd.errors import SyncdError
from syncd.runtime import open_source, open_state
from syncd.source import Source, SourceError
from syncd.state import StateError, StateStore
from syncd.values import Cursor, PushOutcome, SyncState, SyncStatus, display_value

__all__ = [
    "StateUnavailable",
    "collect_status",
    "exit_code",
    "open_existing_state",
    "push_row",
    "push_rows",
    "render",
    "render_pushes",
    "state_path",
]

HEALTHY_STATES = (SyncState.OK, SyncState.PAUSED, SyncState.NEVER_RUN, SyncState.RUNNING)
EXIT_HEALTHY, EXIT_UNREADABLE, EXIT_UNHEALTHY = 0, 1, 3


class StateUnavailable(SyncdError):
    """The state database cannot be read as it is; the message says why and what to do."""

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing  # nothing has run yet: no file, or no schema in it


def state_path(config: Config) -> Path | None:
    """The SQLite file the state url names (absolute), or None for a server database."""
    url = sa.make_url(config.state.url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database).absolute()


def open_existing_state(config: Config) -> StateStore:
    """A StateStore on a state database that exists and carries syncd's schema; creates nothing."""
    shown = config.state.display_url()
    path = state_path(config)
    if path is not None and not path.is_file():
        message = f"no state database at {path}"
        if "url" not in config.state.model_fields_set and not os.environ.get("STATE_DIRECTORY"):
            message += (
                " (the default, relative to the current directory; set STATE_DIRECTORY=/var/lib/syncd"
                " as systemd does, or [state] url)"
            )
        raise StateUnavailable(message, missing=True)
    try:
        state = open_state(config)
    except StateError as error:
        raise StateUnavailable(f"state database {shown}: {error.reason}") from None
    try:
        revision = state.schema_revision()
    except StateError as error:
        state.close()
        raise StateUnavailable(f"state database {shown}: {error.reason}") from None
    if revision is None:
        state.close()
        raise StateUnavailable(
            f"state database {shown} has no syncd schema (never migrated): `syncd migrate -c FILE`, or run the daemon",
            missing=True,
        )
    return state


def collect_status(
    config: Config, *, live_backlog: bool = True, problems: list[str] | None = None
) -> list[dict[str, Any]]:
    """One entry per configured sync, in config order; never fails on an unreachable source.

    Raises StateUnavailable when the state cannot be read. A source that cannot be read
    (down, or its password_file missing) keeps the backlog stored by the last cycle, and
    the reason is appended to `problems`.
    """
    state = open_existing_state(config)
    try:
        known = {row.name: row for row in state.status()}
    except StateError as error:
        raise StateUnavailable(f"state database: {error.reason}; is it migrated (`syncd migrate`)?") from None
    finally:
        state.close()
    sources: dict[str, Source] = {}
    failed_sources: set[str] = set()
    rows = []
    for sync in config.syncs:
        row = known.get(sync.name)
        backlog = row.backlog if row else None
        if live_backlog and sync.source not in failed_sources:
            source = sources.get(sync.source) or sources.setdefault(sync.source, open_source(config, sync.source))
            cursor = Cursor(row.watermark, row.watermark_key) if row and row.watermark is not None else None
            try:
                backlog = source.reader(sync).backlog(cursor)
            except (SourceError, SecretFileError) as error:  # keep the count stored by the last cycle
                failed_sources.add(sync.source)
                if problems is not None:
                    problems.append(_source_problem(sync.source, error))
        rows.append(_entry(sync.name, row, backlog, paused=sync.paused))
    for source in sources.values():
        source.dispose()
    return rows


def _source_problem(name: str, error: Exception) -> str:
    if isinstance(error, SecretFileError):
        error = error.for_key(f"sources.{name}.password_file")
    return f"{error} (backlog not measured)"


def exit_code(rows: list[dict[str, Any]]) -> int:
    """0 when every sync is healthy or idle, 3 when any is failing, in auth_error or stopped."""
    return EXIT_HEALTHY if all(row["state"] in HEALTHY_STATES for row in rows) else EXIT_UNHEALTHY


def _entry(name: str, row: SyncStatus | None, backlog: int | None, *, paused: bool) -> dict[str, Any]:
    # "removed" (keys that left the model) joins these fields with models (issue 9).
    if row is None:
        return {
            "name": name,
            "state": SyncState.PAUSED if paused else SyncState.NEVER_RUN,
            "watermark": None,
            "last_run_at": None,
            "last_error": None,
            "records_sent": 0,
            "backlog": backlog,
            "dead_letters": 0,
            "removed": 0,
            "running": False,
            "progress": None,
            "owner": None,
            "last_success_at": None,
        }
    state = SyncState.RUNNING if row.running and row.state is SyncState.NEVER_RUN else row.state
    return {
        "name": name,
        "state": SyncState.PAUSED if paused else state,
        "watermark": display_value(row.watermark),
        "last_run_at": _iso(row.last_run_at),
        "last_error": row.last_error,
        "records_sent": row.records_sent,
        "backlog": backlog,
        "dead_letters": row.dead_letters,
        "removed": row.removed,
        # The cycle running now (by the state database's clock), with its progress so far.
        "running": row.running,
        "progress": {
            "since": _iso(row.cycle_started_at),
            "rows_read": row.cycle_rows_read or 0,
            "sent": row.cycle_sent or 0,
        }
        if row.running
        else None,
        "owner": row.owner if row.running else None,
        "last_success_at": _iso(row.last_success_at),
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def render(rows: list[dict[str, Any]], width: int = 80) -> str:
    """One block per sync: fits 80 columns whatever the watermark or the error looks like."""
    blocks = []
    for row in rows:
        lines = [f"{row['name']}: {row['state']}"]
        fields = (
            ("watermark", "-" if row["watermark"] is None else str(row["watermark"])),
            ("last run", "-" if row["last_run_at"] is None else row["last_run_at"][:19].replace("T", " ") + " UTC"),
            ("records sent", f"{row['records_sent']:,}"),
            ("backlog", "unknown" if row["backlog"] is None else f"{row['backlog']:,} rows"),
            ("dead letters", f"{row['dead_letters']:,} open"),
            ("removed", f"{row['removed']:,} keys left the model"),
        )
        lines += [f"  {label:<13} {value}" for label, value in fields]
        if row["last_error"]:
            lines += textwrap.wrap(
                row["last_error"], width, initial_indent="  last error    ", subsequent_indent=" " * 16
            )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


# ---------------------------------------------------------------------------- push records


def push_rows(
    state: StateStore, sync: str | None, *, since: datetime | None = None, failed: bool = False, limit: int = 50
) -> list[dict[str, Any]]:
    """The push records (DESIGN §4), newest first, in the form `pushes --json` prints."""
    return [push_row(push) for push in state.pushes(sync, limit, since=since, failed=failed)]


def push_row(push: dict[str, Any]) -> dict[str, Any]:
    """One row of the pushes table as `pushes --json` prints it."""
    return {
        "sync": push["sync"],
        "kind": push["kind"],
        "sent_at": _iso(_utc(push["sent_at"])),
        "records": push["record_count"],
        "outcome": push["outcome"],
        "http_status": push["http_status"],
        "api_code": push["api_code"],
        "description": push["description"],
        "trans_id": push["trans_id"],
        "correlation_id": push["correlation_id"],
        "attempt": push["attempt"],
        "duration_ms": round(push["duration_ms"], 1),
    }


def _utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes for timezone=True columns; they were written as UTC."""
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def render_pushes(rows: list[dict[str, Any]], width: int = 80) -> str:
    """Per push: when, which sync, how many records and how it ended; then how and the API's ids."""
    if not rows:
        return "no pushes\n"
    lines = []
    for push in rows:
        head = (
            f"{push['sent_at'][:19].replace('T', ' ')}  {push['sync']}  {push['records']:,} records  {push['outcome']}"
            f"  HTTP {push['http_status'] or '-'}  code {'-' if push['api_code'] is None else push['api_code']}"
        )
        detail = [f"{push['kind']}, attempt {push['attempt']}, {push['duration_ms']:,.0f} ms"]
        detail += [f"{name} {push[name]}" for name in ("trans_id", "correlation_id") if push[name]]
        if push["description"] and push["outcome"] != PushOutcome.ACK:
            detail.append(push["description"])
        lines += textwrap.wrap(head, width, subsequent_indent="    ")
        lines += textwrap.wrap("; ".join(detail), width, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines) + "\n"
