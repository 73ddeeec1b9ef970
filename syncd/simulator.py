"""A local stand-in for the Webex Campaign "Add contacts to datastore" API.

The demo, the test suite and the benchmarks all push to this instead of the real
endpoint, so it answers with the status codes and body shapes of the API's public
reference (DESIGN.md, "The API we push to"), inserts asynchronously after the ACK
as the real datastore does, and can misbehave on demand: throttling, random and
scripted faults, latency and dropped connections.

Everything runs on one aiohttp event loop and all mutable state is touched only from
that loop, so the request path takes no locks; callers in other threads go through
``RunningSimulator``, which marshals each call onto the loop.

Order of checks for a ``POST`` (each step may answer and stop):

1. pop the next scripted fault, if any, and sleep for latency (+ jitter, + ``delay_s``);
2. a scripted ``status`` or ``drop`` answers now, before any other check;
3. bearer token: unknown or missing → 401/430, expired → 498;
4. rate limit per key → 429 with ``Retry-After``;
5. random faults, from one seeded draw per request: drop, 500, 200/1010, 429;
6. body validation: 1001, 413, 1002 (the whole request is rejected);
7. ACK, then insert after ``insert_delay_s``; ``accept_then_delay_s`` sleeps here, as does
   a random stall after the accept (``stall_rate``, taken from the same draw as step 5).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import itertools
import math
import random
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import orjson
from aiohttp import web

__all__ = [
    "ADD_CONTACTS_PATH",
    "RunningSimulator",
    "SimulatorConfig",
    "add_cli_arguments",
    "create_app",
    "run_from_args",
    "serve",
    "start_in_thread",
]

ADD_CONTACTS_PATH = "/v1/datastores/contacts"

# Descriptions from the reference, keyed by the code in the response body; scripted
# faults that give only a status get the matching text.
DESCRIPTIONS: dict[int, str] = {
    405: "Method not supported",
    429: "Too many requests. Throttle limit reached for the time window.",
    430: "Authorization failed. This resource is not allowed to access using this TOKEN or KEY",
    498: "Invalid token or Access token expired",
    499: "Request failed. Check the exact reason of failure in application code and description of error stream.",
    500: "Internal server error",
    1001: "Invalid input JSON",
    1002: "Mandatory field missing",
    1010: "The request was not processed.",
}

# Settings that may change while the simulator runs (POST /_sim/faults, set_faults).
RUNTIME_SETTINGS = frozenset(
    {
        "rate_limit",
        "retry_after",
        "fail_rate",
        "not_processed_rate",
        "drop_rate",
        "throttle_rate",
        "stall_rate",
        "stall_s",
        "latency_s",
        "latency_jitter_s",
        "insert_delay_s",
    }
)

# Random faults share one draw per request, in this order.
_RATES = ("drop_rate", "fail_rate", "not_processed_rate", "throttle_rate", "stall_rate")
_SCALARS = frozenset({str, int, float, bool, type(None)})
_FAULT_KEYS = frozenset({"status", "code", "description", "retry_after", "drop", "delay_s", "accept_then_delay_s"})
_LOG_LIMIT = 10_000  # request log entries kept; enough for any test, bounded for long runs
_SHUTDOWN_GRACE_S = 0.5  # a handler sleeping in a scripted delay must not hold up stop()
_MAX_BODY = 64 * 1024**2  # above aiohttp's 1 MiB default, so max_records (413) decides


@dataclass
class SimulatorConfig:
    """Start-up settings; those in ``RUNTIME_SETTINGS`` can change later.

    ``rate_limit`` is a token bucket per API key: a burst of up to ``rate_limit``
    requests (at least one), refilled at ``rate_limit`` per second. ``retry_after``
    is what a 429 sends in ``Retry-After``: ``None`` sends the whole seconds until a
    request would pass (at least 1, as HTTP defines it); a number is sent as given
    (``0.2`` → ``"0.2"``), so tests need not wait whole seconds.
    """

    tokens: tuple[str, ...] = ("demo-token",)
    expired_tokens: tuple[str, ...] = ()
    mandatory: tuple[str, ...] = ("msisdn",)
    key_attribute: str = "msisdn"
    datastores: tuple[str, ...] | None = None  # None = every datastore id is valid
    max_records: int = 1000
    rate_limit: float | None = None
    retry_after: float | None = None
    fail_rate: float = 0.0
    not_processed_rate: float = 0.0
    drop_rate: float = 0.0
    throttle_rate: float = 0.0  # random 429s, Retry-After as for the rate limit
    stall_rate: float = 0.0  # accept and store the batch, then answer only after stall_s:
    stall_s: float = 0.0  # a client whose timeout is shorter cannot know it was accepted
    latency_s: float = 0.0
    latency_jitter_s: float = 0.0
    insert_delay_s: float = 0.0
    # "history" also keeps every record received, in order (read back with history()).
    store: Literal["full", "count", "history"] = "full"
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in _RATES:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, not {getattr(self, name)!r}")
        if sum(getattr(self, name) for name in _RATES) > 1.0:
            raise ValueError(f"the fault rates ({', '.join(_RATES)}) must add up to at most 1")
        for name in ("latency_s", "latency_jitter_s", "insert_delay_s", "stall_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, not {getattr(self, name)!r}")
        if self.rate_limit is not None and self.rate_limit <= 0:
            raise ValueError(f"rate_limit must be positive or None, not {self.rate_limit!r}")
        if self.retry_after is not None and self.retry_after < 0:
            raise ValueError(f"retry_after must not be negative, not {self.retry_after!r}")
        if self.max_records < 1:
            raise ValueError(f"max_records must be at least 1, not {self.max_records!r}")
        if self.store not in ("full", "count", "history"):
            raise ValueError(f"store must be 'full', 'count' or 'history', not {self.store!r}")


class _Datastore:
    """One datastore: the latest record per key value and a count of all received."""

    __slots__ = ("history", "latest", "received", "unkeyed")

    def __init__(self) -> None:
        self.latest: dict[Any, dict[str, Any]] = {}
        self.history: list[dict[str, Any]] = []
        self.received = 0
        self.unkeyed = 0


class _TokenBucket:
    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def take(self) -> float:
        """Take one token; return 0 on success, else the seconds until one is free."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class _Reply:
    """What the add-contacts handler answers; ``status`` None drops the connection."""

    __slots__ = ("body", "code", "fault", "headers", "status", "trans_id")

    def __init__(
        self,
        status: int | None,
        body: dict[str, Any] | None = None,
        *,
        fault: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.code = body.get("statuscode") if body else None
        self.trans_id = body.get("trans_id") if body else None
        self.fault = fault
        self.headers = headers


def _error(status: int, code: int, description: str | None = None, **kw: Any) -> _Reply:
    return _Reply(status, {"statuscode": code, "description": description or DESCRIPTIONS.get(code, "")}, **kw)


def _seconds(value: float) -> str:
    """Format seconds for a header: ``1`` not ``1.0``, ``0.2`` stays ``0.2``."""
    return f"{value:g}"


def _check_fault(entry: Any) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ValueError(f"a fault entry must be an object, not {entry!r}")
    unknown = set(entry) - _FAULT_KEYS
    if unknown:
        raise ValueError(f"unknown fault key(s) {sorted(unknown)} in {entry!r}")
    kinds = [k for k in ("status", "drop", "accept_then_delay_s") if k in entry]
    if len(kinds) > 1 or (not kinds and "delay_s" not in entry):
        raise ValueError(f"a fault entry needs exactly one of status, drop, delay_s, accept_then_delay_s: {entry!r}")
    if "status" in entry and not (isinstance(entry["status"], int) and 100 <= entry["status"] <= 599):
        raise ValueError(f"status must be an HTTP status code: {entry!r}")
    for key in ("delay_s", "accept_then_delay_s", "retry_after"):
        value = entry.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"{key} must be a non-negative number: {entry!r}")
    return dict(entry)


class _Simulator:
    """The simulator's state and request handling; lives on one event loop."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.buckets: dict[str, _TokenBucket] = {}
        self.queue: collections.deque[dict[str, Any]] = collections.deque()
        self.generation = 0
        self.start_over(config)

    # -- control ---------------------------------------------------------------

    def start_over(self, config: SimulatorConfig) -> None:
        """As if just started with `config`: its settings, keys (labelled from "key#1" again)
        and random seed, and nothing stored (a test suite shares one simulator this way)."""
        self.config = config  # replaced as a whole by set_faults, which re-validates
        self.rng = random.Random(config.seed)
        self.key_labels: dict[str, str] = {}
        self.valid: frozenset[str] = frozenset()
        self.expired: frozenset[str] = frozenset()
        self.set_tokens(config.tokens, config.expired_tokens)
        self.reset()

    def reset(self) -> None:
        """Forget records, the log, the fault queue and the counters; keep settings."""
        self.datastores: dict[str, _Datastore] = {}
        self.log: collections.deque[dict[str, Any]] = collections.deque(maxlen=_LOG_LIMIT)
        self.queue.clear()
        self.buckets.clear()
        self.by_status: collections.Counter[str] = collections.Counter()
        self.by_code: collections.Counter[str] = collections.Counter()
        self.records_accepted = 0
        # Inserts scheduled before a reset check this and do nothing.
        self.generation += 1

    def set_tokens(self, valid: Iterable[str], expired: Iterable[str] = ()) -> None:
        """Replace the valid and expired keys; several keys may be valid at once."""
        valid, expired = tuple(valid), tuple(expired)
        self.valid, self.expired = frozenset(valid), frozenset(expired)
        # Labels stay with a key for the simulator's life, so "key#1" in the log
        # means the same key before and after a rotation; the key itself is never logged.
        for token in (*valid, *expired):
            self.key_labels.setdefault(token, f"key#{len(self.key_labels) + 1}")

    def set_faults(self, **settings: Any) -> None:
        """Change any of ``RUNTIME_SETTINGS``; invalid values raise ValueError."""
        unknown = set(settings) - RUNTIME_SETTINGS
        if unknown:
            raise ValueError(f"unknown setting(s): {sorted(unknown)}")
        self.config = dataclasses.replace(self.config, **settings)
        if "rate_limit" in settings:
            self.buckets.clear()

    def queue_faults(self, entries: Iterable[Any]) -> None:
        """Append scripted faults; each add-contacts POST pops one (FIFO)."""
        self.queue.extend([_check_fault(entry) for entry in entries])

    def faults(self) -> dict[str, Any]:
        settings = {name: getattr(self.config, name) for name in sorted(RUNTIME_SETTINGS)}
        return {**settings, "queue": list(self.queue)}

    def records(self, datastore_id: str) -> list[dict[str, Any]]:
        store = self.datastores.get(datastore_id)
        return list(store.latest.values()) if store else []

    def received(self, datastore_id: str) -> int:
        store = self.datastores.get(datastore_id)
        return store.received if store else 0

    def history(self, datastore_id: str) -> list[dict[str, Any]]:
        store = self.datastores.get(datastore_id)
        return list(store.history) if store else []

    def stats(self) -> dict[str, Any]:
        return {
            "requests": sum(self.by_status.values()),
            "by_status": dict(self.by_status),
            "by_statuscode": dict(self.by_code),
            "records_accepted": self.records_accepted,
            "datastores": {ds: {"received": s.received, "stored": len(s.latest)} for ds, s in self.datastores.items()},
        }

    # -- add contacts ----------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started, generation = time.time(), self.generation
        meta: dict[str, Any] = {"key": None, "records": 0, "datastore_id": None, "feed_id": None}
        if request.method != "POST":
            reply = _error(405, 405)
        else:
            reply = await self._post(request, meta)
        if generation == self.generation:  # a request from before a reset (a delayed answer) is not counted after it
            self._record(started, request, reply, meta)
        if reply.status is None:
            # Close without a byte of response: the client sees a connection error
            # and cannot know whether anything was accepted (nothing was).
            if request.transport is not None:
                request.transport.close()
            return web.Response()
        return web.Response(
            status=reply.status,
            body=orjson.dumps(reply.body),
            content_type="application/json",
            headers=reply.headers,
        )

    async def _post(self, request: web.Request, meta: dict[str, Any]) -> _Reply:
        config = self.config
        entry = self.queue.popleft() if self.queue else {}
        delay = entry.get("delay_s", 0) + config.latency_s
        if config.latency_jitter_s:
            delay += self.rng.uniform(0, config.latency_jitter_s)
        if delay:
            await asyncio.sleep(delay)
        try:
            payload, problem = orjson.loads(await request.read()), None
        except orjson.JSONDecodeError as exc:
            payload, problem = None, str(exc)
        if isinstance(payload, dict):
            # Logged even when a fault answers before validation, to show what was lost.
            records = payload.get("records")
            meta.update(
                records=len(records) if isinstance(records, list) else 0,
                datastore_id=payload.get("datastore-id"),
                feed_id=payload.get("feed-id"),
            )
        token = _bearer(request.headers.get("authorization", ""))
        meta["key"] = self.key_labels.get(token, "unknown") if token else "none"

        if "status" in entry:
            status = entry["status"]
            code = entry.get("code", 430 if status == 401 else status)
            headers = {"Retry-After": _seconds(entry["retry_after"])} if "retry_after" in entry else None
            if status == 429 and headers is None:
                headers = {"Retry-After": _seconds(config.retry_after if config.retry_after is not None else 1)}
            return _error(status, code, entry.get("description"), fault="scripted", headers=headers)
        if entry.get("drop"):
            return _Reply(None, fault="scripted")

        if token not in self.valid:
            return _error(498, 498) if token in self.expired else _error(401, 430)

        if config.rate_limit is not None:
            bucket = self.buckets.get(token)
            if bucket is None:
                bucket = self.buckets[token] = _TokenBucket(config.rate_limit)
            wait = bucket.take()
            if wait:
                retry = config.retry_after if config.retry_after is not None else max(1, math.ceil(wait))
                return _error(429, 429, headers={"Retry-After": _seconds(retry)})

        stall = entry.get("accept_then_delay_s")
        if any(getattr(config, name) for name in _RATES):
            # One draw per request keeps a seeded run reproducible whatever the rates.
            draw, fault = self.rng.random(), None
            for name in _RATES:
                if draw < getattr(config, name):
                    fault = name
                    break
                draw -= getattr(config, name)
            if fault == "drop_rate":
                return _Reply(None, fault="random")
            if fault == "fail_rate":
                return _error(500, 500, fault="random")
            if fault == "not_processed_rate":
                return _error(200, 1010, fault="random")
            if fault == "throttle_rate":
                retry = config.retry_after if config.retry_after is not None else 1
                return _error(429, 429, fault="random", headers={"Retry-After": _seconds(retry)})
            if fault == "stall_rate" and stall is None:
                stall = config.stall_s

        problem = problem or _invalid_body(payload)
        if problem:
            return _error(400, 1001, f"Invalid input JSON: {problem}")
        records = payload["records"]
        datastore_id = payload.get("datastore-id")
        if len(records) > config.max_records:
            return _error(413, 413, f"Too many records: {len(records)} in one request, at most {config.max_records}")
        missing = _missing_mandatory(records, config.mandatory)
        if missing:
            return _error(400, 1002, f"Mandatory field missing: {missing}")

        ack: dict[str, Any] = {"statuscode": 0, "trans_id": uuid.uuid4().hex}
        # The reference returns `result` only "for a valid datastore-id"; without one
        # there is nowhere to insert, so the ACK is all the client gets.
        if datastore_id is not None and (config.datastores is None or datastore_id in config.datastores):
            ack["result"] = {"correlation_id": str(uuid.uuid4()), "status": 0}
            self.records_accepted += len(records)
            loop = asyncio.get_running_loop()
            loop.call_later(config.insert_delay_s, self._insert, self.generation, datastore_id, records)
        if stall is not None:
            await asyncio.sleep(stall)
            return _Reply(200, ack, fault="scripted" if "accept_then_delay_s" in entry else "random")
        return _Reply(200, ack)

    def _insert(self, generation: int, datastore_id: str, records: list[dict[str, Any]]) -> None:
        if generation != self.generation:
            return
        store = self.datastores.get(datastore_id)
        if store is None:
            store = self.datastores[datastore_id] = _Datastore()
        store.received += len(records)
        if self.config.store == "count":
            return
        if self.config.store == "history":
            store.history.extend(records)
        key_attribute, latest = self.config.key_attribute, store.latest
        for record in records:
            key = record.get(key_attribute)
            if key is None:
                store.unkeyed += 1
                key = ("unkeyed", store.unkeyed)  # a tuple never collides with a JSON value
            latest[key] = record

    def _record(self, started: float, request: web.Request, reply: _Reply, meta: dict[str, Any]) -> None:
        status = "dropped" if reply.status is None else str(reply.status)
        self.by_status[status] += 1
        if reply.code is not None:
            self.by_code[str(reply.code)] += 1
        self.log.append(
            {
                "time": started,
                "method": request.method,
                "status": reply.status,
                "statuscode": reply.code,
                "trans_id": reply.trans_id,
                "fault": reply.fault,
                **meta,
            }
        )


def _bearer(header: str) -> str | None:
    scheme, _, token = header.partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def _invalid_body(payload: Any) -> str | None:
    """Say what is wrong with an add-contacts body, or None if it is well formed."""
    if not isinstance(payload, dict):
        return "the body must be a JSON object"
    if not isinstance(payload.get("feed-id"), str):
        return "feed-id is required and must be a string"
    if "datastore-id" in payload and not isinstance(payload["datastore-id"], str):
        return "datastore-id must be a string"
    records = payload.get("records")
    # An empty array is refused as 1001 after the key was checked: `syncd check` probes with one.
    if not isinstance(records, list) or not records:
        return "records must be a non-empty array"
    # Fast path over all records at C speed; the loop below only runs to name the culprit.
    if set(map(type, records)) == {dict} and _SCALARS.issuperset(
        map(type, itertools.chain.from_iterable(map(dict.values, records)))
    ):
        return None
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            return f"record {index} is not an object"
        for name, value in record.items():
            if type(value) not in _SCALARS:
                return f"record {index}: {name} is not a string, number, boolean or null"
    raise AssertionError("unreachable")  # pragma: no cover


def _missing_mandatory(records: list[dict[str, Any]], mandatory: tuple[str, ...]) -> str | None:
    """Name the first mandatory attribute absent, null or "" in a record, and where."""
    for name in mandatory:
        values = [record.get(name) for record in records]
        if None in values or "" in values:
            index = next(i for i, value in enumerate(values) if value is None or value == "")
            return f"{name} (record {index})"
    return None


# -- control endpoints -----------------------------------------------------------


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


_SIM_KEY = web.AppKey("simulator", _Simulator)


def create_app(config: SimulatorConfig | None = None) -> web.Application:
    """The simulator as an aiohttp application, for embedding in another event loop."""
    sim = _Simulator(config or SimulatorConfig())
    app = web.Application(client_max_size=_MAX_BODY)
    app[_SIM_KEY] = sim

    async def records(request: web.Request) -> web.Response:
        datastore_id = request.query.get("datastore-id")
        if datastore_id is None:
            return _json({"description": "the datastore-id query parameter is required"}, 400)
        return _json({"records": sim.records(datastore_id), "received": sim.received(datastore_id)})

    async def history(request: web.Request) -> web.Response:
        datastore_id = request.query.get("datastore-id")
        if datastore_id is None:
            return _json({"description": "the datastore-id query parameter is required"}, 400)
        return _json({"records": sim.history(datastore_id)})

    async def requests(request: web.Request) -> web.Response:
        return _json({"requests": list(sim.log)})

    async def stats(request: web.Request) -> web.Response:
        return _json(sim.stats())

    async def get_faults(request: web.Request) -> web.Response:
        return _json(sim.faults())

    async def post_faults(request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            queue = body.pop("queue", [])
            entries = [_check_fault(entry) for entry in queue]  # all or nothing
            sim.set_faults(**body)
            sim.queue.extend(entries)
        except (ValueError, TypeError) as exc:  # orjson.JSONDecodeError is a ValueError
            return _json({"description": str(exc)}, 400)
        return _json(sim.faults())

    async def tokens(request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
            valid, expired = body["valid"], body.get("expired", [])
            if not all(isinstance(t, str) for t in (*valid, *expired)):
                raise ValueError("tokens must be strings")
        except (ValueError, TypeError, KeyError) as exc:
            return _json({"description": f'expected {{"valid": [...], "expired": [...]}}: {exc}'}, 400)
        sim.set_tokens(valid, expired)
        return _json({"valid": len(sim.valid), "expired": len(sim.expired)})

    async def reset(request: web.Request) -> web.Response:
        sim.reset()
        return _json({"status": "ok"})

    async def health(request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    app.router.add_route("*", ADD_CONTACTS_PATH, sim.handle)
    app.router.add_get("/_sim/records", records)
    app.router.add_get("/_sim/history", history)
    app.router.add_get("/_sim/requests", requests)
    app.router.add_get("/_sim/stats", stats)
    app.router.add_get("/_sim/faults", get_faults)
    app.router.add_post("/_sim/faults", post_faults)
    app.router.add_post("/_sim/tokens", tokens)
    app.router.add_post("/_sim/reset", reset)
    app.router.add_get("/_sim/health", health)
    return app


async def _start(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, str]:
    """Listen on host:port (0 = any free port); return the runner and the base URL."""
    # No access log: at benchmark rates it would cost more than the requests.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_GRACE_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    # A wildcard address is not something a client can connect to.
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(bound_host, bound_host)
    if ":" in shown:
        shown = f"[{shown}]"
    return runner, f"http://{shown}:{bound_port}"


# -- in a thread -------------------------------------------------------------------

_T = TypeVar("_T")


class RunningSimulator:
    """A simulator serving from a background thread; a context manager that stops it.

    Every method runs its work on the simulator's event loop and waits for it, so
    callers in any thread see a consistent state without the request path locking.
    """

    def __init__(self, config: SimulatorConfig, host: str, port: int) -> None:
        self._app = create_app(config)
        self._sim = self._app[_SIM_KEY]
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(host, port), name="syncd-simulator", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error
        self.url = self.base_url + ADD_CONTACTS_PATH

    def _run(self, host: str, port: int) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._runner, self.base_url = self._loop.run_until_complete(_start(self._app, host, port))
        except BaseException as exc:
            self._error = exc
            self._started.set()
            self._loop.close()
            return
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._runner.cleanup())
            self._loop.close()

    def _call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        if not self._thread.is_alive():
            raise RuntimeError("the simulator is stopped")

        async def call() -> _T:
            return fn(*args, **kwargs)

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result()

    def records(self, datastore_id: str) -> list[dict[str, Any]]:
        """The latest record per key value, once inserted (empty with ``store="count"``)."""
        return self._call(self._sim.records, datastore_id)

    def received(self, datastore_id: str) -> int:
        """All records inserted into the datastore, duplicates included."""
        return self._call(self._sim.received, datastore_id)

    def history(self, datastore_id: str) -> list[dict[str, Any]]:
        """Every record inserted, in order, duplicates included (``store="history"`` only)."""
        return self._call(self._sim.history, datastore_id)

    def requests(self) -> list[dict[str, Any]]:
        """The request log, oldest first (the last 10,000 requests)."""
        return self._call(lambda: list(self._sim.log))

    def stats(self) -> dict[str, Any]:
        return self._call(self._sim.stats)

    def queue_faults(self, *entries: dict[str, Any]) -> None:
        """Script the next responses, e.g. ``{"status": 500}``, ``{"drop": True}``."""
        self._call(self._sim.queue_faults, entries)

    def set_faults(self, **settings: Any) -> None:
        """Change rates, rate limit, latency etc. (any of ``RUNTIME_SETTINGS``)."""
        self._call(self._sim.set_faults, **settings)

    def set_tokens(self, valid: Iterable[str], expired: Iterable[str] = ()) -> None:
        self._call(self._sim.set_tokens, tuple(valid), tuple(expired))

    def reset(self) -> None:
        """Forget records, the log, the fault queue and the counters; keep settings."""
        self._call(self._sim.reset)

    def start_over(self, config: SimulatorConfig) -> None:
        """Serve on as if just started with `config`: its settings and keys, nothing stored."""
        self._call(self._sim.start_over, config)

    def wait_inserted(self, datastore_id: str, count: int, timeout: float = 10) -> None:
        """Block until the datastore has received ``count`` records (inserts are async)."""
        deadline = time.monotonic() + timeout
        while (received := self.received(datastore_id)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"datastore {datastore_id}: {received} of {count} records after {timeout}s")
            time.sleep(0.01)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()

    def __enter__(self) -> RunningSimulator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_in_thread(config: SimulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> RunningSimulator:
    """Serve in a background thread; returns once listening (port 0 = a free port)."""
    return RunningSimulator(config or SimulatorConfig(), host, port)


# -- as a process --------------------------------------------------------------------


def serve(config: SimulatorConfig, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM.

    Prints exactly one line, the add-contacts URL, once listening: a parent that
    passed port 0 reads it to learn the port.
    """

    async def main() -> None:
        runner, base_url = await _start(create_app(config), host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        print(base_url + ADD_CONTACTS_PATH, flush=True)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(main())


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {text}")
    return value


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``syncd simulate-api``."""
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    add("--port", type=int, default=8080, help="port to listen on; 0 picks a free one (default 8080)")
    add("--token", action="append", metavar="KEY", help="a valid API key; repeat for several (default demo-token)")
    add("--expired-token", action="append", metavar="KEY", help="a key answered with 498; repeatable")
    add("--mandatory", action="append", metavar="ATTR", help="mandatory attribute; repeatable (default msisdn; '' for none)")
    add("--key-attribute", default="msisdn", help="attribute that identifies a contact (default msisdn)")
    add("--datastore", action="append", metavar="ID", help="a valid datastore id; repeatable (default: any)")
    add("--rate-limit", type=float, metavar="N", help="requests per second per key, then 429 (default: none)")
    add("--retry-after", type=_non_negative, metavar="S", help="Retry-After sent with 429 (default: seconds until free)")
    add("--fail-rate", type=_probability, default=0.0, metavar="P", help="probability of a 500")
    add("--not-processed-rate", type=_probability, default=0.0, metavar="P", help="probability of a 200/1010")
    add("--drop-rate", type=_probability, default=0.0, metavar="P", help="probability of a dropped connection")
    add("--throttle-rate", type=_probability, default=0.0, metavar="P", help="probability of a 429")
    add("--stall-rate", type=_probability, default=0.0, metavar="P", help="probability of a stall after the accept")
    add("--stall", type=_non_negative, default=0.0, metavar="S", help="seconds a stalled request waits to answer")
    add("--latency", type=_non_negative, default=0.0, metavar="S", help="seconds added to every request")
    add("--latency-jitter", type=_non_negative, default=0.0, metavar="S", help="up to this many random seconds more")
    add("--insert-delay", type=_non_negative, default=0.0, metavar="S", help="seconds between ACK and insert")
    add("--max-records", type=int, default=1000, metavar="N", help="records per request, then 413 (default 1000)")
    add(
        "--store",
        choices=("full", "count", "history"),
        default="full",
        help="keep the latest record per key, only count them, or also every record received (default full)",
    )
    add("--seed", type=int, help="seed for the random faults, for a reproducible run")


def run_from_args(args: argparse.Namespace) -> int:
    """Build the config from ``add_cli_arguments``' options and serve; the exit code."""
    try:
        config = SimulatorConfig(
            tokens=tuple(args.token or ("demo-token",)),
            expired_tokens=tuple(args.expired_token or ()),
            mandatory=tuple(m for m in (args.mandatory or ("msisdn",)) if m),
            key_attribute=args.key_attribute,
            datastores=tuple(args.datastore) if args.datastore else None,
            max_records=args.max_records,
            rate_limit=args.rate_limit,
            retry_after=args.retry_after,
            fail_rate=args.fail_rate,
            not_processed_rate=args.not_processed_rate,
            drop_rate=args.drop_rate,
            throttle_rate=args.throttle_rate,
            stall_rate=args.stall_rate,
            stall_s=args.stall,
            latency_s=args.latency,
            latency_jitter_s=args.latency_jitter,
            insert_delay_s=args.insert_delay,
            store=args.store,
            seed=args.seed,
        )
    except ValueError as exc:
        print(f"syncd simulate-api: {exc}", file=sys.stderr)
        return 2
    try:
        serve(config, args.host, args.port)
    except OSError as exc:
        print(f"syncd simulate-api: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0
