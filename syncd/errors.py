"""The root of syncd's exceptions, at the bottom of the import graph (it imports nothing).

Each error lives beside the concept it belongs to; all of them derive from `SyncdError`,
so a caller that only needs "syncd failed, and here is why" catches one class:

    SyncdError                 raised on purpose; the message is meant for the operator
    ├── ConfigError            the config cannot be used (the CLI exits 2)       config.py
    ├── SecretFileError        a password_file or token_file cannot be read      config.py
    ├── SourceError            a source cannot be read as configured             source.py
    ├── StateError             the state database failed, said in one line       errors.py
    ├── StateUnavailable       a read-only command finds no usable state db      status.py
    ├── LeaseLost              this syncd lost the sync it was running           errors.py
    ├── LeaseHeldError         the lease is refused: `owner` holds it            errors.py
    ├── ApiError               the API answered a failure (a failed request)     delivery.py
    │   ├── RetryableError     network, timeout, 5xx, a retry code: sent again
    │   │   └── ThrottledError 429, with the Retry-After to wait
    │   ├── AuthError          the key is refused: every sync waits for a new one
    │   ├── ConfigurationError 405: the sync stops until a reload
    │   └── RejectedError      the records cannot be accepted: split, then dead letters
    ├── RowRejected            one row cannot become a record (a dead letter)    mapping.py
    ├── ExplainError           preview / inspect cannot answer                   explain.py
    ├── DemoDirectoryError     the demo's directory holds files it did not write demo.py
    └── CommandError           a command failed at run time (the CLI exits 1)    cli.py

The state store's errors live here rather than in state.py: delivery and the cycle catch
them (a shared rate limit's slot, a fenced send) without depending on the store. The store
raises nothing else: no SQLAlchemy or driver error leaves a `StateStore` method.
"""

from __future__ import annotations

from datetime import datetime

__all__ = ["LeaseHeldError", "LeaseLost", "StateError", "SyncdError"]


class SyncdError(Exception):
    """Every error syncd raises on purpose."""


class StateError(SyncdError):
    """The state database failed or timed out; the message is one line for the operator.

    `reason` is the database's one line (no statement, no parameters), `doing` what the
    store was doing, for callers that say where the database is in their own words.
    """

    def __init__(self, doing: str, reason: str) -> None:
        super().__init__(f"state database, {doing}: {reason}")
        self.doing = doing
        self.reason = reason


class LeaseLost(SyncdError):
    """This daemon can no longer prove it owns the sync: nothing it read may be sent or committed."""

    def __init__(self, sync: str, reason: str = "another syncd took this sync over") -> None:
        super().__init__(f"lease on {sync} lost: {reason}")
        self.sync = sync
        self.reason = reason


class LeaseHeldError(SyncdError):
    """Another syncd holds the sync's lease (until `expires_at`, by the state database's
    clock, when known): this one may not start a cycle of it."""

    def __init__(self, sync: str, owner: str | None, expires_at: datetime | None) -> None:
        until = f" until {expires_at:%Y-%m-%d %H:%M:%S} UTC" if expires_at else ""
        super().__init__(f"sync {sync} is held by {owner or 'another syncd'}{until}")
        self.sync = sync
        self.owner = owner
        self.expires_at = expires_at
