"""The values every layer passes around, at the bottom of the import graph.

Source, mapping, delivery, the cycle and the state store all speak of cursors, push
records, dead letters and a sync's status; they live here so that none of them has to
import another's module to name them. This module imports nothing from syncd but errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

__all__ = [
    "STORED_STATES",
    "CycleKind",
    "CycleOutcome",
    "Cursor",
    "DeadLetter",
    "PushOutcome",
    "PushRecord",
    "SyncState",
    "SyncStatus",
    "db_error_line",
    "display_value",
    "key_text",
    "utcnow",
]


class SyncState(StrEnum):
    """Where a sync stands: the `syncs.state` column, `status` and `syncd_sync_state`."""

    OK = "ok"
    FAILING = "failing"
    AUTH_ERROR = "auth_error"  # the API refuses the key: every sync waits for a working one
    CONFIG_ERROR = "config_error"  # HTTP 405: stopped until a reload; stored as failing
    PAUSED = "paused"
    NEVER_RUN = "never_run"
    RUNNING = "running"  # `status` only: a never_run sync whose first cycle runs now

    @property
    def stored(self) -> SyncState:
        """What the state database records for this state."""
        return SyncState.FAILING if self is SyncState.CONFIG_ERROR else self


STORED_STATES = frozenset({SyncState.OK, SyncState.FAILING, SyncState.AUTH_ERROR, SyncState.PAUSED, SyncState.NEVER_RUN})


class CycleKind(StrEnum):
    SYNC = "sync"  # the changes since the watermark
    RECONCILE = "reconcile"  # every row, compared with what was acknowledged
    RETRY = "retry"  # `dead-letters retry`: the current rows of given keys


class CycleOutcome(StrEnum):
    """How one cycle ended (`CycleReport.outcome`)."""

    OK = "ok"
    FAILING = "failing"
    AUTH_ERROR = "auth_error"
    CONFIG_ERROR = "config_error"
    PAUSED = "paused"
    SKIPPED = "skipped"  # another syncd holds the lease, or it was lost mid-cycle

    @property
    def state(self) -> SyncState | None:
        """The sync state this outcome leaves; None when the cycle did not run here (skipped)."""
        return None if self is CycleOutcome.SKIPPED else SyncState(self.value)


class PushOutcome(StrEnum):
    """What the API answered one request (`pushes.outcome`)."""

    ACK = "ack"
    RETRY = "retry"  # throttled or failed in passing: sent again
    REJECTED = "rejected"  # the records cannot be accepted: dead letters
    AUTH_ERROR = "auth_error"
    CONFIG_ERROR = "config_error"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Cursor:
    """The keyset position: every row at or before `(watermark, key)` has been handled."""

    watermark: Any
    key: Any


@dataclass(slots=True)
class PushRecord:
    """One HTTP request to the API and what it answered."""

    kind: CycleKind
    sent_at: datetime
    record_count: int
    attempt: int
    duration_ms: float
    outcome: PushOutcome
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
    state: SyncState
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
