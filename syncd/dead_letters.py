"""`syncd dead-letters list|retry|discard`: records that could not be delivered.

A dead letter stays open until the key's current payload lands (a later push resolves
it by itself), an operator retries it successfully, or an operator discards it.
Retrying re-reads the *current* source row, not the stored payload: the row may have been
fixed since, and sending a stale version would undo that.
"""

from __future__ import annotations

import textwrap
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from syncd.runtime import Runtime
from syncd.values import CycleOutcome, display_value

__all__ = ["DiscardOutcome", "RetryOutcome", "discard", "listing", "render", "retry"]


def listing(
    runtime: Runtime, sync: str | None, *, include_resolved: bool = False, ids: list[int] | None = None
) -> list[dict[str, Any]]:
    return [
        {
            "id": letter.id,
            "sync": letter.sync,
            "key": letter.key,
            "reason": letter.reason,
            "http_status": letter.http_status,
            "api_code": letter.api_code,
            "attempts": letter.attempts,
            "first_seen": display_value(letter.first_seen),
            "last_seen": display_value(letter.last_seen),
            "resolved_at": display_value(letter.resolved_at),
            "resolution": letter.resolution,
            "payload": letter.payload,
        }
        for letter in runtime.state.dead_letters(sync, include_resolved=include_resolved, ids=ids or ())
    ]


def render(letters: list[dict[str, Any]]) -> str:
    """Per dead letter: id, sync, key, status and attempts; then the reason, wrapped at 80 columns."""
    if not letters:
        return "no dead letters\n"
    lines = []
    for letter in letters:
        status = f"{letter['resolution']} {str(letter['resolved_at'])[:19]}" if letter["resolution"] else "open"
        lines.append(
            f"#{letter['id']}  {letter['sync']}  key={letter['key']}  {status}  attempts={letter['attempts']}  "
            f"last={str(letter['last_seen'])[:19]}"
        )
        code = f" (HTTP {letter['http_status']}, code {letter['api_code']})" if letter["http_status"] else ""
        lines += textwrap.wrap(f"{letter['reason']}{code}", 80, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines) + "\n"


@dataclass
class DiscardOutcome:
    discarded: list[dict[str, Any]] = field(default_factory=list)  # as `listing` shows them
    not_open: list[int] = field(default_factory=list)  # asked for, but unknown or already resolved
    everything: bool = False

    def summary(self) -> str:
        if self.everything:
            lines = [f"discarded {len(self.discarded)} open dead letter(s) (--all)"]
        else:
            lines = [f"discarded {len(self.discarded)} dead letter(s)"]
            lines += [f"  #{d['id']}  {d['sync']}  key={d['key']}  {d['reason']}" for d in self.discarded]
        if self.not_open:
            ids = ", ".join(f"#{i}" for i in self.not_open)
            lines.append(f"not open (unknown, resolved, or of another sync): {ids}")
        return "\n".join(lines) + "\n"


def discard(runtime: Runtime, sync: str | None, ids: list[int]) -> DiscardOutcome:
    """Discard the open dead letters `ids` (of `sync`), or every open one when `ids` is empty.

    The CLI asks for `--all` before it passes no ids: discarding hides a record for good.
    """
    letters = listing(runtime, sync, ids=ids)
    discarded_ids = [letter["id"] for letter in letters]
    if discarded_ids:
        runtime.state.discard_dead_letters(discarded_ids)
    outcome = DiscardOutcome(discarded=letters, everything=not ids)
    outcome.not_open = sorted(set(ids) - set(discarded_ids))
    return outcome


@dataclass
class RetryOutcome:
    retried: int = 0
    still_open: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        text = f"retried {self.retried} dead letter(s); {self.still_open} still open"
        for error in self.errors:
            text += f"\n  {error}"
        return text


def retry(runtime: Runtime, sync: str | None, ids: list[int]) -> RetryOutcome:
    by_sync: dict[str, list[str]] = defaultdict(list)
    for letter in runtime.state.dead_letters(sync, ids=ids):
        if letter.sync in runtime.runners:
            by_sync[letter.sync].append(letter.key)
    outcome = RetryOutcome()
    for name, keys in by_sync.items():
        report = runtime.runners[name].retry_keys(keys)
        outcome.retried += len(keys)
        if report.outcome is not CycleOutcome.OK:
            outcome.errors.append(f"{name}: {report.outcome}: {report.error}")
        open_keys = {letter.key for letter in runtime.state.dead_letters(name)}
        outcome.still_open += len(open_keys & set(keys))
    return outcome
