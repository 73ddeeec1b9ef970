"""`syncd status`: where each sync stands, from the state database and a live backlog count.

The JSON shape is part of the contract (DESIGN.md): `{"syncs": [{"name", "state",
"watermark", "last_run_at", "last_error", "records_sent", "backlog", "dead_letters"}]}`, and
since scale-out `running`, `progress` (`since`, `rows_read`, `sent` of the cycle running now),
`owner` (the daemon running it) and `last_success_at`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa

from syncd.config import Config
from syncd.source import Source, SourceError
from syncd.state import Cursor, StateStore, SyncStatus, display_value

__all__ = ["collect_status", "render_table"]


def collect_status(config: Config, *, live_backlog: bool = True) -> list[dict[str, Any]]:
    """One entry per configured sync, in config order; never fails on an unreachable source."""
    state = StateStore(config.state.url)
    try:
        try:
            known = {row.name: row for row in state.status()}
        except sa.exc.DBAPIError:
            known = {}  # no schema yet: nothing has ever run
    finally:
        state.close()
    sources: dict[str, Source] = {}
    rows = []
    for sync in config.syncs:
        row = known.get(sync.name)
        backlog = row.backlog if row else None
        if live_backlog:
            source = sources.setdefault(sync.source, Source(sync.source, config.sources[sync.source]))
            cursor = Cursor(row.watermark, row.watermark_key) if row and row.watermark is not None else None
            try:
                backlog = source.reader(sync).backlog(cursor)
            except SourceError:
                pass  # keep the count stored by the last cycle
        rows.append(_entry(sync.name, row, backlog, paused=sync.paused))
    for source in sources.values():
        source.dispose()
    return rows


def _entry(name: str, row: SyncStatus | None, backlog: int | None, *, paused: bool) -> dict[str, Any]:
    if row is None:
        return {
            "name": name,
            "state": "paused" if paused else "never_run",
            "watermark": None,
            "last_run_at": None,
            "last_error": None,
            "records_sent": 0,
            "backlog": backlog,
            "dead_letters": 0,
            "running": False,
            "progress": None,
            "owner": None,
            "last_success_at": None,
        }
    state = "running" if row.running and row.state == "never_run" else row.state
    return {
        "name": name,
        "state": "paused" if paused else state,
        "watermark": display_value(row.watermark),
        "last_run_at": _iso(row.last_run_at),
        "last_error": row.last_error,
        "records_sent": row.records_sent,
        "backlog": backlog,
        "dead_letters": row.dead_letters,
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


def render_table(rows: list[dict[str, Any]]) -> str:
    headers = ("SYNC", "STATE", "WATERMARK", "LAST RUN", "SENT", "BACKLOG", "DEAD", "LAST ERROR")
    table = [
        (
            row["name"],
            row["state"],
            "-" if row["watermark"] is None else str(row["watermark"]),
            "-" if row["last_run_at"] is None else row["last_run_at"][:19].replace("T", " ") + "Z",
            f"{row['records_sent']:,}",
            "?" if row["backlog"] is None else f"{row['backlog']:,}",
            str(row["dead_letters"]),
            (row["last_error"] or "-")[:80],
        )
        for row in rows
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *table)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in (headers, *table)]
    return "\n".join(lines) + "\n"
