"""Delivering records to the Add-contacts API, and what each answer means.

The response-code policy of DESIGN.md §5 lives here and only here, as an exception
hierarchy in the style of httpx: callers act on the *type* of failure, not on codes.

    ApiError
    ├── RetryableError      429, 5xx, 1010, network errors and timeouts: back off, try again
    │   └── ThrottledError  429, carries Retry-After
    ├── AuthError           401/430, 498: stop pushing until the token changes
    ├── ConfigurationError  405 and other answers that mean the config is wrong: stop the sync
    └── RejectedError       1001, 1002, 499, 413: split the batch to find the bad records

`Deliverer.deliver` applies the policy to a batch: retries with exponential backoff and full
jitter, bisects rejected batches down to the offending records, and returns every HTTP
attempt as a `PushRecord` so the state database can record what the API answered.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import orjson
import structlog

from syncd._wire import LateToSend, OneWriteTransport, send_by
from syncd.config import LEASE_MARGIN_S, ApiConfig, SecretFileError, read_secret_file
from syncd.errors import StateError, SyncdError
from syncd.values import CycleKind, PushOutcome, PushRecord, utcnow

__all__ = [
    "Ack",
    "ApiClient",
    "ApiError",
    "AuthError",
    "ConfigurationError",
    "Deliverer",
    "DeliveryResult",
    "Fence",
    "PushClient",
    "RateLimiter",
    "SharedRateLimiter",
    "RejectedError",
    "RetryableError",
    "ThrottledError",
    "TokenSource",
    "classify",
]

log = structlog.get_logger(__name__)

_AUTH_CODES = {401, 430, 498}
_REJECT_CODES = {1001, 1002, 499, 413}
_RETRY_CODES = {429, 1010}


# ---------------------------------------------------------------------------- outcomes


@dataclass(frozen=True, slots=True)
class Ack:
    """The API took the batch; it inserts asynchronously, so this is all we ever learn."""

    http_status: int
    trans_id: str | None
    correlation_id: str | None
    description: str | None = None


class ApiError(SyncdError):
    """An answer (or the lack of one) that is not an ACK."""

    def __init__(
        self,
        description: str,
        *,
        http_status: int | None = None,
        api_code: int | None = None,
    ) -> None:
        super().__init__(description)
        self.description = description
        self.http_status = http_status
        self.api_code = api_code

    outcome = PushOutcome.FAILED


class RetryableError(ApiError):
    outcome = PushOutcome.RETRY


class ThrottledError(RetryableError):
    def __init__(self, description: str, *, retry_after: float | None, **kwargs: Any) -> None:
        super().__init__(description, **kwargs)
        self.retry_after = retry_after


class AuthError(ApiError):
    outcome = PushOutcome.AUTH_ERROR


class ConfigurationError(ApiError):
    outcome = PushOutcome.CONFIG_ERROR


class RejectedError(ApiError):
    outcome = PushOutcome.REJECTED


def classify(response: httpx.Response) -> Ack:
    """Map one HTTP response to an Ack, or raise the ApiError subclass that says what to do.

    The API's own code wins over the HTTP status where both exist (200 can carry 1010).
    """
    status = response.status_code
    body: Any = None
    try:
        body = orjson.loads(response.content) if response.content else None
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        body = {}
    code = _as_int(body.get("statuscode"))
    result = body.get("result") if isinstance(body.get("result"), dict) else {}
    if code is None:
        code = _as_int(result.get("status"))
    description = body.get("description") or result.get("description")
    description = str(description) if description is not None else None
    where = {"http_status": status, "api_code": code}

    if 200 <= status < 300 and code in (0, None) and (body.get("trans_id") or code == 0):
        return Ack(status, _as_str(body.get("trans_id")), _as_str(result.get("correlation_id")), description)
    text = description or response.reason_phrase or "no description"
    if status == 429 or code == 429:
        return _raise(ThrottledError(text, retry_after=_retry_after(response), **where))
    if code in _AUTH_CODES or status in _AUTH_CODES:
        return _raise(AuthError(text, **where))
    if code in _REJECT_CODES or status in _REJECT_CODES:
        return _raise(RejectedError(text, **where))
    if code in _RETRY_CODES or status >= 500:
        return _raise(RetryableError(text, **where))
    if code == 405 or status == 405:
        return _raise(ConfigurationError(f"{text} (is api.url the Add-contacts endpoint?)", **where))
    if 200 <= status < 300:
        # A 2xx without a recognisable ACK: the request may or may not have been taken.
        return _raise(RetryableError(f"unrecognised answer: {text}", **where))
    # 404, 400 without a code...: sending the same request again cannot help.
    return _raise(ConfigurationError(f"HTTP {status}: {text}", **where))


def _raise(error: ApiError) -> Ack:
    raise error


def _as_int(value: Any) -> int | None:
    try:
        return int(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


def _as_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, (parsedate_to_datetime(value) - utcnow()).total_seconds())
        except (TypeError, ValueError):
            return None


# ---------------------------------------------------------------------------- plumbing


class TokenSource:
    """The API key, from the config or a file re-read whenever the API refuses it.

    Re-reading on refusal is what makes key rotation work without a restart.
    """

    def __init__(self, config: ApiConfig, on_secret: Callable[[str], None] | None = None) -> None:
        self._file = config.token_file
        self._fixed = config.token.get_secret_value() if config.token else None
        self._on_secret = on_secret
        self._lock = threading.Lock()
        self._token: str | None = None

    def get(self) -> str:
        with self._lock:
            if self._token is None:
                self._token = self._read()
            return self._token

    def refresh(self) -> bool:
        """Re-read the key; True when it changed."""
        with self._lock:
            old, self._token = self._token, self._read()
            return self._token != old

    def _read(self) -> str:
        if self._fixed is not None:
            token = self._fixed
        else:
            assert self._file is not None
            try:
                token = read_secret_file(self._file, "api.token_file")
            except SecretFileError as error:  # an AuthError: the sync waits for a readable key
                raise AuthError(str(error)) from None
            if not token:
                raise AuthError(f"api.token_file {self._file} is empty")
        if self._on_secret:
            self._on_secret(token)
        return token


class RateLimiter:
    """A token bucket shared by every sync in the process: the API's limit is per key."""

    def __init__(self, per_second: float) -> None:
        self.per_second = per_second
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def acquire(self) -> None:
        if self.per_second <= 0:
            return
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + 1.0 / self.per_second
        if slot > now:
            time.sleep(slot - now)


class SharedRateLimiter(RateLimiter):
    """`requests_per_second` for the whole deployment (PostgreSQL state database).

    Every daemon takes each request's slot from one row of the state database
    (`StateStore.reserve_request`: the next free slot by the database's clock, moved on by
    1/rps), so N daemons together stay under the ceiling, whichever syncs each one runs.
    One short write per request; when the state database cannot be reached the request
    waits on the local bucket (and cannot prove its lease anyway).
    """

    def __init__(self, per_second: float, reserve: Callable[[float], float]) -> None:
        super().__init__(per_second)
        self._reserve = reserve

    def acquire(self) -> None:
        if self.per_second <= 0:
            return
        try:
            wait = self._reserve(1.0 / self.per_second)
        except StateError:
            super().acquire()
            return
        if wait > 0:
            time.sleep(wait)


class Fence(Protocol):
    """What a send must prove first: that this daemon holds the sync's lease (state.Lease)."""

    def ensure(self, seconds: float) -> float:
        """The monotonic time the lease is proven held until, `seconds` away or more; else LeaseLost."""
        ...

    def check(self) -> None: ...  # raises LeaseLost once lost


class PushClient(Protocol):
    """What `Deliverer` and the sync cycle need of the endpoint (`ApiClient`; fakes in tests)."""

    @property
    def tokens(self) -> Tokens: ...

    def push(
        self, datastore_id: str, feed_id: str, records: Sequence[dict[str, Any] | bytes], *, fence: Fence | None = None
    ) -> Ack: ...


class Tokens(Protocol):
    def refresh(self) -> bool: ...  # re-read the key; True when it changed


class ApiClient:
    """One keep-alive HTTP client for the Add-contacts endpoint; thread-safe."""

    def __init__(self, config: ApiConfig, tokens: TokenSource, limiter: RateLimiter) -> None:
        self.url = config.url
        self.tokens = tokens
        self.limiter = limiter
        self.timeout_s = config.timeout_s
        quarter = config.timeout_s / 4
        self._http = httpx.Client(
            # The request is on the wire within timeout_s of the lease check (pool, connect,
            # headers and body each get a quarter), so the lease it was checked against still
            # holds when the API takes it; the answer may take timeout_s more.
            timeout=httpx.Timeout(config.timeout_s, pool=quarter, connect=quarter, write=quarter),
            # Each request in one write, checked against its lease proof right before (_wire.py).
            transport=OneWriteTransport(limits=httpx.Limits(max_connections=64, max_keepalive_connections=64)),
            headers={"content-type": "application/json", "user-agent": "syncd"},
        )

    def close(self) -> None:
        self._http.close()

    def push(
        self,
        datastore_id: str,
        feed_id: str,
        records: Sequence[dict[str, Any] | bytes],
        *,
        fence: Fence | None = None,
    ) -> Ack:
        """POST one batch; records may come already encoded (the sync cycle encodes each once).

        `fence`: checked last before the request goes out (after the rate limiter's wait),
        for as long as the request can take to reach the API; it raises LeaseLost to forbid it.
        The request then leaves in one write, and only while that proof still holds.
        """
        if records and type(records[0]) is bytes:  # the sync cycle's: encoded once, when mapped
            encoded = b",".join(records)  # type: ignore[arg-type]
        else:
            encoded = b",".join(r if isinstance(r, bytes) else orjson.dumps(r) for r in records)
        body = b'{"datastore-id":%b,"feed-id":%b,"records":[%b]}' % (
            orjson.dumps(datastore_id),
            orjson.dumps(feed_id),
            encoded,
        )
        self.limiter.acquire()
        headers = {"authorization": f"Bearer {self.tokens.get()}"}
        deadline = None
        if fence is not None:
            # Proven now for as long as the request can take; the bytes must leave a margin
            # before the proof ends (half the proof where a lease is that short: SQLite, one host).
            proven, now = fence.ensure(self.timeout_s + LEASE_MARGIN_S), time.monotonic()
            deadline = proven - min(LEASE_MARGIN_S, (proven - now) / 2)
        try:
            with send_by(deadline):
                response = self._http.post(self.url, content=body, headers=headers)
        except LateToSend:  # paused, or starved, since the check: the next attempt proves the lease again
            raise RetryableError("not sent: the lease proof ran out before the request could go out") from None
        except httpx.TimeoutException as error:
            raise RetryableError(f"timed out: {type(error).__name__}") from None
        except httpx.TransportError as error:
            raise RetryableError(f"network error: {type(error).__name__}: {error}") from None
        return classify(response)


# ---------------------------------------------------------------------------- the policy


@dataclass(slots=True)
class DeliveryResult:
    """What became of one batch: which records landed, which are dead, every attempt."""

    acked: list[int] = field(default_factory=list)  # indexes into the batch
    rejected: list[tuple[int, ApiError]] = field(default_factory=list)
    pushes: list[PushRecord] = field(default_factory=list)
    failure: ApiError | None = None  # set when the batch must stay pending
    # For each of `acked`, the index in `pushes` of the ACK that carried it: a bisected
    # batch is acknowledged in parts, each under its own trans_id.
    acked_by: list[int] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.failure is None

    def ack_pushes(self) -> list[PushRecord]:
        """The ACK push that carried each of `acked`, in the same order."""
        return [self.pushes[i] for i in self.acked_by]


class Deliverer:
    """Applies the response-code policy to one batch at a time."""

    def __init__(
        self,
        client: PushClient,
        config: ApiConfig,
        *,
        kind: CycleKind = CycleKind.SYNC,
        sleep: Callable[[float], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        fence: Fence | None = None,
    ) -> None:
        self.client = client
        self.config = config
        self.kind = kind
        self.fence = fence  # every attempt, retries included, proves the lease first
        self.sleep = sleep or self._sleep_unless_stopping
        self.should_stop = should_stop
        self._random = random.Random()

    def deliver(self, datastore_id: str, feed_id: str, records: Sequence[dict[str, Any] | bytes]) -> DeliveryResult:
        result = DeliveryResult()
        self._deliver(datastore_id, feed_id, records, list(range(len(records))), result)
        return result

    def _deliver(
        self,
        datastore_id: str,
        feed_id: str,
        records: Sequence[dict[str, Any] | bytes],
        indexes: list[int],
        result: DeliveryResult,
    ) -> None:
        try:
            self._with_retries(datastore_id, feed_id, [records[i] for i in indexes], result)
        except RejectedError as error:
            if len(indexes) == 1:
                result.rejected.append((indexes[0], error))
                return
            # Bisect: the API names no record, so halve until the bad ones stand alone.
            middle = len(indexes) // 2
            for half in (indexes[:middle], indexes[middle:]):
                if result.failure is not None:
                    return
                self._deliver(datastore_id, feed_id, records, half, result)
            return
        except ApiError as error:
            result.failure = error
            return
        result.acked.extend(indexes)
        result.acked_by.extend([len(result.pushes) - 1] * len(indexes))  # the ACK was recorded last

    def _with_retries(
        self, datastore_id: str, feed_id: str, records: list[dict[str, Any] | bytes], result: DeliveryResult
    ) -> None:
        auth_retried = False
        attempt = 0
        while True:
            attempt += 1
            started, clock = utcnow(), time.perf_counter()
            try:
                ack = self.client.push(datastore_id, feed_id, records, fence=self.fence)
            except ApiError as error:
                result.pushes.append(self._record(started, clock, len(records), attempt, error=error))
                if isinstance(error, AuthError) and not auth_retried:
                    auth_retried = True
                    try:
                        changed = self.client.tokens.refresh()
                    except AuthError:
                        changed = False
                    if changed:  # the key was rotated under us: try once with the new one
                        continue
                if not isinstance(error, RetryableError) or attempt >= self.config.max_attempts:
                    raise
                if self.should_stop():
                    raise
                delay = self._backoff(attempt, error)
                log.info(
                    "push_retry",
                    attempt=attempt,
                    http_status=error.http_status,
                    api_code=error.api_code,
                    reason=error.description,
                    delay_s=round(delay, 3),
                )
                self.sleep(delay)
                if self.should_stop():
                    raise  # stopping: the batch stays pending, its rows are read again next time
                continue
            result.pushes.append(self._record(started, clock, len(records), attempt, ack=ack))
            if ack.correlation_id is None:
                log.warning(
                    "ack_without_result",
                    trans_id=ack.trans_id,
                    hint="the API returns `result` only for a valid datastore-id; check datastore_id",
                )
            return

    def _sleep_unless_stopping(self, seconds: float) -> None:
        """Sleep in short slices, so a long Retry-After never holds up a drain."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and not self.should_stop():
            if self.fence is not None:
                self.fence.check()  # a lease lost meanwhile: this batch is dropped, not retried
            time.sleep(min(left, 0.25))

    def _backoff(self, attempt: int, error: ApiError) -> float:
        ceiling = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (attempt - 1))
        delay = self._random.uniform(0, ceiling)  # full jitter
        if isinstance(error, ThrottledError) and error.retry_after is not None:
            delay = max(delay, error.retry_after)
        return delay

    def _record(
        self,
        started: Any,
        clock: float,
        count: int,
        attempt: int,
        *,
        ack: Ack | None = None,
        error: ApiError | None = None,
    ) -> PushRecord:
        record = PushRecord(
            kind=self.kind,
            sent_at=started,
            record_count=count,
            attempt=attempt,
            duration_ms=(time.perf_counter() - clock) * 1000,
            outcome=PushOutcome.ACK,
        )
        if ack is not None:
            record.http_status, record.api_code, record.description = ack.http_status, 0, ack.description
            record.trans_id, record.correlation_id = ack.trans_id, ack.correlation_id
        elif error is not None:
            record.outcome, record.description = error.outcome, error.description
            record.http_status, record.api_code = error.http_status, error.api_code
        return record
