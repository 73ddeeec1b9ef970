"""In-memory stand-ins for what a sync cycle talks to: the model, the state database, the API.

Each implements the protocol `syncd.cycle` declares (`ModelReader`, `CycleState`,
`PushClient`) and no more, so the cycle's rules run in milliseconds. The API fake answers
with real HTTP responses that go through `delivery.classify`, so the codes mean what they
mean in production; `delivery.Deliverer` (retries, bisection, auth refresh) runs as it is.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

import httpx
import orjson

from syncd.delivery import Ack, Fence, classify
from syncd.errors import LeaseLost
from syncd.pipeline import BatchOutcome
from syncd.source import Bound
from syncd.values import Cursor, DeadLetter, PushRecord, SyncStatus, key_text

# -- the model


class FakeSource:
    """A model of rows `(key, watermark, *columns)` with integer watermarks, read in (watermark, key) order.

    `bound`: rows at or above it are not read yet (None: all of them). `filter`: rows it
    refuses have left the model (read with `membership=True`, they carry the verdict last).
    """

    source_hash_index: int | None = None
    feeds: Sequence[Any] = ()

    def __init__(self, columns: Sequence[str], *, filter: Callable[[dict[str, Any]], bool] | None = None) -> None:
        self.columns = tuple(columns)
        self.hash_columns = self.columns
        self.filter = filter
        self.rows: list[tuple[Any, ...]] = []
        self.bound: int | None = None
        self.key_is_unique = True  # a table's unique key; False: a view that may repeat keys
        self.source = SimpleNamespace(can_offload=False, name="crm", config=None)
        self.reads = 0  # batches handed out by changed_rows

    # writing the model

    def put(self, key: Any, watermark: int, **values: Any) -> None:
        """Insert or replace the row of `key` (`add` keeps a second row of the same key)."""
        self.rows = [row for row in self.rows if row[0] != key]
        self.add(key, watermark, **values)

    def add(self, key: Any, watermark: int, **values: Any) -> None:
        row = (key, watermark, *(values.get(name) for name in self.columns[2:]))
        self.rows.append(row)

    def delete(self, key: Any) -> None:
        self.rows = [row for row in self.rows if row[0] != key]

    # ModelReader

    def problems(self, *, probe_data: bool = True) -> list[Any]:
        return []

    def has_membership(self) -> bool:
        return self.filter is not None

    def _read(self, rows: Sequence[tuple[Any, ...]], membership: bool) -> list[Any]:
        if self.filter is None:
            return list(rows)
        verdicts = [self.filter(dict(zip(self.columns, row, strict=True))) for row in rows]
        if membership:
            return [(*row, int(v)) for row, v in zip(rows, verdicts, strict=True)]
        return [row for row, v in zip(rows, verdicts, strict=True) if v]

    def split(self, rows: Sequence[Sequence[Any]]) -> tuple[Sequence[Sequence[Any]], list[str]]:
        if self.filter is None:
            return rows, []
        return [row[:-1] for row in rows if row[-1]], [key_text(row[0]) for row in rows if not row[-1]]

    def source_hash(self, row: Sequence[Any]) -> bytes:
        return hashlib.blake2b(orjson.dumps(list(row[: len(self.columns)]), default=str), digest_size=16).digest()

    def position(self, row: Sequence[Any]) -> Cursor:
        return Cursor(row[1], row[0])

    def _after(self, cursor: Cursor | None) -> list[tuple[Any, ...]]:
        rows = sorted(self.rows, key=lambda row: (row[1], row[0]))
        rows = [row for row in rows if self.bound is None or row[1] < self.bound]
        return [row for row in rows if cursor is None or (row[1], row[0]) > (cursor.watermark, cursor.key)]

    def changed_rows(
        self,
        cursor: Cursor | None,
        batch_rows: int,
        on_bound: Callable[[Bound], None] = lambda bound: None,
        *,
        membership: bool = False,
    ) -> Iterator[Sequence[Sequence[Any]]]:
        on_bound(Bound(self.bound))
        rows = self._read(self._after(cursor), membership)
        for start in range(0, len(rows), batch_rows):
            self.reads += 1
            yield rows[start : start + batch_rows]

    def all_rows(self, batch_rows: int, *, membership: bool = False) -> Iterator[Sequence[Sequence[Any]]]:
        rows = self._read(sorted(self.rows, key=lambda row: key_text(row[0])), membership)
        for start in range(0, len(rows), batch_rows):
            yield rows[start : start + batch_rows]

    def take_bound(self) -> Bound:
        return Bound(self.bound)

    def last_position(self, bound: Bound) -> Cursor | None:
        rows = [row for row in self._after(None) if self.filter is None or self._read([row], False)]
        return self.position(rows[-1]) if rows else None

    def rows_in_key_order(
        self, after: Any, batch_rows: int, bound: Bound, *, membership: bool = False
    ) -> Iterator[Sequence[Sequence[Any]]]:
        """Batches of `batch_rows` rows or more, never splitting a key's rows."""
        rows = sorted(self._after(None), key=lambda row: row[0])  # the key's own order, as a database sorts it
        rows = self._read([row for row in rows if after is None or row[0] > after], membership)
        batch: list[Any] = []
        for row in rows:
            if len(batch) >= batch_rows and row[0] != batch[-1][0]:
                self.reads += 1
                yield batch
                batch = []
            batch.append(row)
        if batch:
            self.reads += 1
            yield batch

    def fingerprints(self, batch_rows: int, *, membership: bool = False) -> Iterator[list[tuple[Any, ...]]]:
        raise NotImplementedError("only with a server-side fingerprint (source_hash_index)")

    def rows_by_keys(self, keys: list[str], *, membership: bool = False) -> Iterator[list[Sequence[Any]]]:
        wanted = set(keys)
        rows: list[Sequence[Any]] = self._read([row for row in self.rows if key_text(row[0]) in wanted], membership)
        if rows:
            yield rows

    def existing_keys(self, keys: Sequence[str]) -> set[str]:
        present = {key_text(row[0]) for row in self.rows}
        return {key for key in keys if key in present}

    def duplicate_keys(self, keys: Sequence[str] | None = None) -> dict[str, int]:
        counts = Counter(key_text(row[0]) for row in self.rows)
        return {key: n for key, n in counts.items() if n > 1 and (keys is None or key in keys)}

    def backlog(self, cursor: Cursor | None, limit: int = 10_000_000) -> int:
        return min(limit, len(self._after(cursor)))

    def any_after(self, cursor: Cursor | None) -> bool:
        return bool(self._after(cursor))


class FakeFeed:
    """A change feed's table: rows `(model key, watermark)`, read in (watermark, key) order."""

    def __init__(self) -> None:
        self.rows: list[tuple[Any, int]] = []

    def _sorted(self) -> list[tuple[Any, int]]:
        return sorted(self.rows, key=lambda row: (row[1], row[0]))

    def take_bound(self) -> Bound:
        return Bound(None)

    def last_position(self, bound: Bound) -> Cursor | None:
        rows = self._sorted()
        return self.position(rows[-1]) if rows else None

    def position(self, row: Sequence[Any]) -> Cursor:
        return Cursor(row[1], row[0])

    def changed_rows(self, cursor: Cursor | None, batch_rows: int) -> Iterator[Sequence[Sequence[Any]]]:
        rows = [r for r in self._sorted() if cursor is None or (r[1], r[0]) > (cursor.watermark, cursor.key)]
        for start in range(0, len(rows), batch_rows):
            yield rows[start : start + batch_rows]


# -- the state database


class FakeLease:
    """A lease nobody else wants; `lose()` it to play a takeover."""

    def __init__(self, sync: str, ttl: timedelta) -> None:
        self.sync, self.ttl = sync, ttl
        self.lost: str | None = None
        self.held_until = time.monotonic() + ttl.total_seconds()

    def check(self) -> None:
        if self.lost is not None:
            raise LeaseLost(self.sync, self.lost)

    def ensure(self, seconds: float) -> float:
        self.check()
        self.held_until = time.monotonic() + self.ttl.total_seconds()
        return self.held_until

    def keep(self) -> Callable[[], None]:
        return lambda: None

    def renew(self) -> None:
        self.check()
        self.held_until = time.monotonic() + self.ttl.total_seconds()

    def lose(self, reason: str) -> None:
        self.lost = reason


class Crash(BaseException):
    """The process died: not an error the cycle handles."""


@dataclass
class FakeState:
    """One sync's state, as `StateStore.commit_batch` would leave it, and every commit made."""

    cursor_: Cursor | None = None
    digests: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # key → (digest, source fingerprint)
    sent: dict[str, dict[str, Any]] = field(default_factory=dict)
    feed_cursors: dict[str, Cursor] = field(default_factory=dict)
    open_letters: dict[str, DeadLetter] = field(default_factory=dict)
    resolved: list[str] = field(default_factory=list)
    removals: dict[str, str] = field(default_factory=dict)
    pushes: list[PushRecord] = field(default_factory=list)
    commits: list[BatchOutcome] = field(default_factory=list)
    hash: str | None = None
    status: str | None = None  # set_state's
    error: str | None = None
    crash_after: int | None = None  # commits that land; the next one kills the process
    lease: FakeLease | None = None

    def acquire_lease(self, sync: str, ttl: timedelta) -> FakeLease:
        self.lease = FakeLease(sync, ttl)
        return self.lease

    def lease_holder(self, sync: str) -> tuple[str | None, datetime | None]:
        return None, None

    def cursor(self, sync: str) -> Cursor | None:
        return self.cursor_

    def feed_cursor(self, sync: str, feed: str) -> Cursor | None:
        return self.feed_cursors.get(feed)

    def has_digests(self, sync: str) -> bool:
        return bool(self.digests)

    def digest_count(self, sync: str) -> int:
        return len(self.digests)

    def known_digests(self, sync: str, keys: Sequence[str]) -> dict[str, bytes]:
        return {key: self.digests[key][0] for key in keys if key in self.digests}

    def known_source_hashes(self, sync: str, keys: Sequence[str]) -> dict[str, bytes]:
        return {key: self.digests[key][1] for key in keys if key in self.digests}

    def digest_keys(self, sync: str, batch: int = 5000) -> Iterator[list[str]]:
        keys = sorted(self.digests)
        for start in range(0, len(keys), batch):
            yield keys[start : start + batch]

    def sent_attributes(self, sync: str, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        return {key: self.sent[key] for key in keys if key in self.sent}

    def mapping_hash(self, sync: str) -> str | None:
        return self.hash

    def set_mapping_hash(self, sync: str, value: str) -> None:
        self.hash = value

    def open_dead_letter_count(self, sync: str) -> int:
        return len(self.open_letters)

    def removal_count(self, sync: str) -> int:
        return len(self.removals)

    def set_state(
        self, sync: str, state: str, *, error: str | None = None, ran: bool = True, backlog: int | None = None
    ) -> None:  # CycleState.set_state's signature
        self.status, self.error = state, error

    def sync_status(self, sync: str) -> SyncStatus | None:
        return None

    def commit_batch(self, sync: str, **arguments: Any) -> None:
        outcome = BatchOutcome(**arguments)
        if self.crash_after is not None and len(self.commits) >= self.crash_after:
            raise Crash
        if outcome.lease is not None and outcome.lease.lost:
            raise LeaseLost(sync, outcome.lease.lost)
        self.commits.append(outcome)
        if outcome.cursor is not None:
            self.cursor_ = outcome.cursor
        for key, digest, source in outcome.acked:
            self.digests[key] = (digest, source)
        for key, source in outcome.refreshed:
            self.digests[key] = (self.digests[key][0], source)
        self.pushes.extend(outcome.pushes)
        for key in outcome.resolve_keys:
            if self.open_letters.pop(key, None) is not None:
                self.resolved.append(key)
        for letter in outcome.dead_letters:
            self.open_letters[letter.key] = letter
        for key, text in outcome.sent:
            self.sent[key] = orjson.loads(text)
        self.feed_cursors.update(outcome.feed_cursors)
        for key, why in outcome.removed:
            self.digests.pop(key, None)
            self.removals[key] = why
        for key in outcome.returned:
            self.removals.pop(key, None)


# -- the API


class FakeTokens:
    """The token file: write `key` to rotate it; `refresh()` re-reads it like `TokenSource`."""

    def __init__(self, key: str = "key-1") -> None:
        self.key = key
        self._read: str | None = None

    def get(self) -> str:
        if self._read is None:
            self._read = self.key
        return self._read

    def refresh(self) -> bool:
        old, self._read = self._read, self.key
        return self._read != old


@dataclass
class Request:
    keys: list[str]
    token: str
    status: int = 0
    code: int | None = None


class FakeApi:
    """The Add-contacts endpoint: ACKs every request with the valid key, unless scripted otherwise.

    `script`: answers `(http status, API code)` taken in order by the next requests.
    `reject`: keys the API refuses whenever a request carries one (`reject_code`).
    `fail`: keys whose requests always get this answer (e.g. a 500 that outlasts the retries).
    `refusal`: the answer to a request with any other key than `valid_key`.
    `hold(key, until)`: a request carrying `key` is answered only after one carrying `until`.
    `on_request`: called with each request before it is answered.
    """

    def __init__(self, tokens: FakeTokens | None = None, *, valid_key: str = "key-1") -> None:
        self.tokens = tokens or FakeTokens(valid_key)
        self.valid_key = valid_key
        self.script: list[tuple[int, int]] = []
        self.reject: set[str] = set()
        self.reject_code = 1002
        self.fail: dict[str, tuple[int, int]] = {}
        self.refusal = (401, 430)
        self.on_request: Callable[[Request], None] | None = None
        self.requests: list[Request] = []
        self.records: list[dict[str, Any]] = []  # every record the API acknowledged, in order
        self.in_flight: Counter[str] = Counter()
        self.twice_in_flight: list[str] = []
        self._holds: dict[str, threading.Event] = {}
        self._releases: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def hold(self, key: str, *, until: str) -> None:
        event = threading.Event()
        self._holds[key], self._releases[until] = event, event

    @property
    def acked_keys(self) -> list[str]:
        return [str(record["id"]) for record in self.records]

    def push(
        self, datastore_id: str, feed_id: str, records: Sequence[dict[str, Any] | bytes], *, fence: Fence | None = None
    ) -> Ack:
        if fence is not None:
            fence.ensure(1.0)
        payloads = [orjson.loads(r) if isinstance(r, bytes) else r for r in records]
        keys = [str(p.get("id")) for p in payloads]
        request = Request(keys, self.tokens.get())
        with self._lock:
            self.requests.append(request)
            for key in keys:
                if self.in_flight[key]:
                    self.twice_in_flight.append(key)
                self.in_flight[key] += 1
        try:
            if self.on_request is not None:
                self.on_request(request)
            for key in keys:
                if key in self._holds:
                    assert self._holds[key].wait(5), f"the request holding {key} was never released"
            request.status, request.code = self._answer(keys, request.token)
            if request.code == 0:
                with self._lock:
                    self.records.extend(payloads)
            return classify(self._response(request.status, request.code))
        finally:
            with self._lock:
                for key in keys:
                    self.in_flight[key] -= 1
                    if key in self._releases:
                        self._releases[key].set()

    def _answer(self, keys: list[str], token: str) -> tuple[int, int]:
        if token != self.valid_key:
            return self.refusal
        failing = [self.fail[key] for key in keys if key in self.fail]
        if failing:
            return failing[0]
        with self._lock:
            if self.script:
                return self.script.pop(0)
        if self.reject.intersection(keys):
            return (413, 413) if self.reject_code == 413 else (200, self.reject_code)
        return 200, 0

    @staticmethod
    def _response(status: int, code: int) -> httpx.Response:
        if code == 0:
            body = {"statuscode": 0, "trans_id": "t-1", "result": {"correlation_id": "c-1"}}
        else:
            body = {"statuscode": code, "description": f"code {code}"}
        headers = {"retry-after": "0"} if code == 429 else {}
        return httpx.Response(status, json=body, headers=headers)
