"""`syncd preview` and `syncd inspect`: what a sync would send, and one contact's story.

Both only read. The model's rows come through the sync's reader, mapped as a cycle maps
them; the state database is opened as `status` opens it: never created, migrated or
leased. Without a state database (nothing has run yet) every mapped record counts as
one that would be sent.

The state keeps per key the digest of the payload last acknowledged and the push whose
ACK carried it (a bisected batch is acknowledged in parts, each its own push), so `inspect`
says whether the current record equals what was acknowledged, when, and under which
`trans_id`. Keys acknowledged before the state recorded that (schema 0005) say so.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import orjson

from syncd.config import Config, SyncConfig
from syncd.errors import SyncdError
from syncd.mapping import MappedRows, compile_mapping, digest_target, map_rows
from syncd.runtime import open_source
from syncd.source import SourceError
from syncd.state import StateStore
from syncd.status import StateUnavailable, open_existing_state, push_row, render_pushes
from syncd.values import display_value, key_text

__all__ = ["ExplainError", "inspect", "preview", "render_preview", "render_story"]


class ExplainError(SyncdError):
    """The model or the state cannot be read; the message says which and why."""


class _Model:
    """The sync's model, read through the reader's public methods only.

    Every call into the reader is here, so a change in how models are read (tables,
    views, queries, filters) is met in this one class.
    """

    def __init__(self, config: Config, sync: SyncConfig) -> None:
        self.source = open_source(config, sync.source)
        self.reader = self.source.reader(sync)
        self.columns = sync.columns

    def pending(self, cursor: Any, limit: int) -> list[Sequence[Any]]:
        """The first `limit` rows the next cycle would read (after `cursor`, below the bound)."""
        rows: list[Sequence[Any]] = []
        batches = self.reader.changed_rows(cursor, limit)
        try:
            for batch in batches:
                rows.extend(batch[: limit - len(rows)])
                if len(rows) >= limit:
                    break
        finally:
            batches.close()
        return rows

    def by_keys(self, keys: Sequence[str]) -> list[Sequence[Any]]:
        held = len(self.reader.typed_keys(keys))
        if held != len(keys):  # an operator's typo, not a contact that left the model
            bad = [key for key in keys if not self.reader.typed_keys([key])]
            raise ExplainError(f"key {', '.join(bad)}: not a value of the key column {self.reader.sync.key!r}")
        return [row for batch in self.reader.rows_by_keys(list(keys)) for row in batch]

    def as_dict(self, row: Sequence[Any]) -> dict[str, Any]:
        return {name: display_value(value) for name, value in zip(self.columns, row, strict=False)}

    def close(self) -> None:
        self.source.dispose()


def _state(config: Config) -> StateStore | None:
    """The state database, or None when nothing has run yet; never created."""
    try:
        return open_existing_state(config)
    except StateUnavailable as error:
        if error.missing:
            return None
        raise ExplainError(str(error)) from None


def preview(config: Config, sync: SyncConfig, *, limit: int = 20, keys: Sequence[str] | None = None) -> dict[str, Any]:
    """Read and map rows: the records that would be sent, those unchanged since their ACK, the rejected ones.

    Without `keys`, the rows are those the next cycle would read, first `limit` of them;
    with `keys`, those rows wherever the watermark stands.
    """
    state = _state(config)
    model = _Model(config, sync)
    try:
        cursor = state.cursor(sync.name) if state else None
        rows = model.by_keys(keys) if keys else model.pending(cursor, limit)
        mapped = _mapped(rows, sync)
        known = state.known_digests(sync.name, mapped.keys) if state else {}
    except SourceError as error:
        raise ExplainError(str(error)) from None
    finally:
        model.close()
        if state:
            state.close()
    result: dict[str, Any] = {
        "sync": sync.name,
        "read": "keys" if keys else "pending",
        "watermark": display_value(cursor.watermark) if cursor else None,
        "state_database": state is not None,
        "rows": len(rows),
        "would_send": [],
        "unchanged": [],
        "rejected": [{"key": key, "reason": reason, "row": _jsonable(row)} for key, reason, row in mapped.rejected],
    }
    for key, encoded, digest in zip(mapped.keys, mapped.encoded, mapped.digests, strict=True):
        entry = {"key": key, "record": orjson.loads(encoded)}
        result["unchanged" if known.get(key) == digest else "would_send"].append(entry)
    if keys:
        found = {key_text(row[0]) for row in rows}
        result["not_in_model"] = [key for key in keys if key not in found]
    return result


def inspect(config: Config, sync: SyncConfig, key: str) -> dict[str, Any]:
    """One contact's story: its row now, its record or why it is refused, its last ACK (when, which
    push), its dead letters, its removal."""
    state = _state(config)
    model = _Model(config, sync)
    story: dict[str, Any] = {"sync": sync.name, "key": key, "sync_watermark": None}
    try:
        rows = model.by_keys([key])
        row = rows[0] if rows else None
        story["source_row"] = model.as_dict(row) if row is not None else None
        story["record"] = story["rejected"] = None
        digest = None
        if row is not None:
            mapped = _mapped([row], sync)
            if mapped.rejected:
                story["rejected"] = mapped.rejected[0][1]
            else:
                story["record"], digest = orjson.loads(mapped.encoded[0]), mapped.digests[0]
        acknowledged = state.acknowledged(sync.name, key) if state else None
        cursor = state.cursor(sync.name) if state else None
        story["sync_watermark"] = display_value(cursor.watermark) if cursor else None
        story["acknowledged"] = _acknowledgement(acknowledged, digest)
        ids = state.dead_letter_ids(sync.name, key) if state else []
        letters = list(state.dead_letters(sync.name, include_resolved=True, ids=ids)) if state and ids else []
        removal = state.removals(sync.name, [key]).get(key) if state else None
    except SourceError as error:
        raise ExplainError(str(error)) from None
    finally:
        model.close()
        if state:
            state.close()
    story["dead_letters"] = [
        {
            "id": letter.id,
            "reason": letter.reason,
            "http_status": letter.http_status,
            "api_code": letter.api_code,
            "attempts": letter.attempts,
            "first_seen": display_value(letter.first_seen),
            "last_seen": display_value(letter.last_seen),
            "resolved_at": display_value(letter.resolved_at),
            "resolution": letter.resolution,
        }
        for letter in letters
    ]
    story["removed"] = None if removal is None else {"at": display_value(removal[0]), "reason": removal[1]}
    story["state_database"] = state is not None
    return story


def _acknowledgement(acknowledged: tuple[bytes, dict[str, Any] | None] | None, digest: bytes | None) -> dict[str, Any]:
    """What was last acknowledged for a key: whether it equals the record now, and when and in
    which push (`push` as `syncd pushes --json` shows it; None when acknowledged before the
    state recorded pushes per key)."""
    if acknowledged is None:
        return {
            "any": False,
            "matches_current": None,
            "before_push_tracking": False,
            "at": None,
            "trans_id": None,
            "push_id": None,
            "push": None,
        }
    stored, push = acknowledged
    answered = None if push is None else push["sent_at"] + timedelta(milliseconds=push["duration_ms"])
    return {
        "any": True,
        "matches_current": None if digest is None else stored == digest,
        "before_push_tracking": push is None,
        "at": display_value(answered),  # when the ACK came back
        "trans_id": None if push is None else push["trans_id"],
        "push_id": None if push is None else push["id"],
        "push": None if push is None else push_row(push),
    }


def _mapped(rows: Sequence[Sequence[Any]], sync: SyncConfig) -> MappedRows:
    """Rows mapped, encoded and digested exactly as a cycle does it."""
    return map_rows(rows, compile_mapping(sync.fields, sync.columns), target=digest_target(sync.datastore_id, sync.feed_id), source_hash=_no_hash)


def _no_hash(row: Sequence[Any]) -> bytes:
    return b""  # source fingerprints serve reconcile's shortcut; nothing here stores them


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {name: display_value(value) for name, value in row.items()}


# ---------------------------------------------------------------------------- text


def _record_text(record: dict[str, Any]) -> str:
    return ", ".join(f"{name}={orjson.dumps(value).decode()}" for name, value in record.items())


def _wrapped(text: str, indent: str = "    ") -> list[str]:
    return textwrap.wrap(text, 80, initial_indent=indent, subsequent_indent=indent + "  ") or [indent]


def render_preview(result: dict[str, Any]) -> str:
    if result["read"] == "keys":
        lines = [f"{result['sync']}: {result['rows']} row(s) read by key"]
    else:
        after = "the start" if result["watermark"] is None else f"watermark {result['watermark']}"
        lines = [f"{result['sync']}: the next {result['rows']} row(s) a cycle would read, after {after}"]
    if not result["state_database"]:
        lines.append("no state database yet: every record counts as new")
    sections = (
        ("would be sent", result["would_send"]),
        ("unchanged since their last ACK (not sent)", result["unchanged"]),
        ("rejected: would be dead letters", result["rejected"]),
    )
    for title, entries in sections:
        lines.append(f"\n{title}: {len(entries)}")
        for entry in entries:
            text = entry["reason"] if "reason" in entry else _record_text(entry["record"])
            lines += _wrapped(f"{entry['key']}: {text}", "  ")
    if result.get("not_in_model"):
        lines.append(f"\nnot in the model: {', '.join(result['not_in_model'])}")
    return "\n".join(lines) + "\n"


def render_story(story: dict[str, Any]) -> str:
    lines = [f"{story['sync']} key {story['key']}"]
    if story["source_row"] is None:
        lines.append("  source row:   not in the model")
    else:
        lines.append("  source row:")
        lines += _wrapped(_record_text(story["source_row"]))
    if story["rejected"]:
        lines.append("  mapped:       rejected (dead letter, not sent)")
        lines += _wrapped(story["rejected"])
    elif story["record"] is not None:
        lines.append("  mapped record:")
        lines += _wrapped(_record_text(story["record"]))
    ack = story["acknowledged"]
    if not story["state_database"]:
        lines.append("  acknowledged: nothing yet (no state database)")
    elif not ack["any"]:
        lines.append("  acknowledged: never")
    elif ack["matches_current"] is None:
        lines.append("  acknowledged: yes, a record that cannot be compared with the row now")
    else:
        if ack["matches_current"]:
            lines.append("  acknowledged: yes, the same record as now (nothing to send)")
        else:
            lines.append("  acknowledged: yes, a different record: the row changed since; the next cycle")
            lines.append("                sends it if its watermark moved, reconcile if not")
    if ack["before_push_tracking"]:
        lines.append("                acknowledged before push tracking: when, and in which push,")
        lines.append("                is not recorded")
    elif ack["any"]:
        when = ack["at"][:19].replace("T", " ")
        lines.append(f"                at {when} UTC, push #{ack['push_id']}")
        lines += _wrapped(f"trans_id {ack['trans_id']}" if ack["trans_id"] else "no trans_id", " " * 16)
        lines.append(f"  push #{ack['push_id']} (as `syncd pushes` shows it):")
        lines += ["    " + line for line in render_pushes([ack["push"]], width=76).splitlines()]
    if story["removed"]:
        removed = story["removed"]
        lines += _wrapped(f"removed at {removed['at'][:19].replace('T', ' ')} UTC: {removed['reason']}", "  ")
    lines.append(f"  sync watermark: {story['sync_watermark'] or 'none yet'}")
    if not story["dead_letters"]:
        lines.append("  dead letters: none")
    for letter in story["dead_letters"]:
        status = f"{letter['resolution']} at {str(letter['resolved_at'])[:19]}" if letter["resolution"] else "open"
        lines.append(f"  dead letter #{letter['id']}: {status}, {letter['attempts']} attempt(s)")
        code = f" (HTTP {letter['http_status']}, code {letter['api_code']})" if letter["http_status"] else ""
        lines += _wrapped(f"{letter['reason']}{code}")
    return "\n".join(lines) + "\n"
