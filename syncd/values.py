"""The values every layer passes around, at the bottom of the import graph.

Source, mapping, delivery, the cycle and the state store all speak of cursors, push
records, dead letters and a sync's status; they live here so that none of them has to
import another's module to name them. This module imports nothing from syncd but errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

__all__ = [
    "Cursor",
    "DeadLetter",
    "PushRecord",
    "SyncStatus",
    "db_error_line",
    "display_value",
    "key_text",
    "utcnow",
]


@dataclass(frozen=True, slots=True)
class Cursor:
    """The keyset position: every row at or before `(watermark, key)` has been handled."""

    watermark: Any
    key: Any


@dataclass(slots=True)
class PushRecord:
    """One HTTP request to the API and what it answered."""

    kind: str  # sync | reconcile | retry
    sent_at: datetime
    record_count: int
    attempt: int
    duration_ms: float
    outcome: str  # ack | retry | rejected | auth_error | config_error | failed
    http_status: int | None = None
    api_code: int | None = None
    description: str | None = None
    trans_id: str | None = None
    correlation_id: str | None = None


@dataclass(slots=True)
class DeadLetter:
    """A row that could not become an accepted record, and why (kept until delivered or discarded)."""

    key: str
    reason: str
    payload: dict[str, Any] | None = None
    http_status: int | None = None
    api_code: int | None = None
    # filled when read back
    id: int | None = None
    sync: str | None = None
    first_seen: datetime | None = None
    last_seen: datetime | None = None
    attempts: int = 1
    resolved_at: datetime | None = None
    resolution: str | None = None


@dataclass(slots=True)
class SyncStatus:
    """Where one sync stands, as the state database records it."""

    name: str
    state: str
    watermark: Any
    watermark_key: Any
    last_run_at: datetime | None
    last_success_at: datetime | None
    last_error: str | None
    records_sent: int
    backlog: int | None
    dead_letters: int
    owner: str | None = None
    lease_until: datetime | None = None
    removed: int = 0  # keys that left the model (and have not come back)
    running: bool = False  # a cycle runs now, under a lease that has not run out (by the database's clock)
    cycle_started_at: datetime | None = None
    cycle_rows_read: int | None = None
    cycle_sent: int | None = None


def utcnow() -> datetime:
    return datetime.now(UTC)


def key_text(key: Any) -> str:
    """Keys are stored as text so one digests table serves integer and string keys."""
    return key if isinstance(key, str) else str(key)


def display_value(value: Any) -> Any:
    """The JSON-friendly form `status` shows: ISO text for times, numbers as they are."""
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


def db_error_line(error: BaseException) -> str:
    """A database error's first line: the driver's reason, without statement or parameters."""
    original = getattr(error, "orig", None) or error
    text = str(original).strip()
    return text.splitlines()[0] if text else type(original).__name__
