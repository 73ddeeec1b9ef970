"""What one run does, drawn from its seed alone: settings, the writes and the faults.

Every choice (counts, timings, which fault, which daemon) comes from ``random.Random(seed)``
here and nowhere else, so a seed always yields the same plan; only the interleaving with
the daemons' own timing differs between replays.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

LEASE_S = 3.0
FAULT_KINDS = ("api", "kill", "stop", "cut")


@dataclass(frozen=True)
class Write:
    """One write on the source, ``at`` seconds into the run.

    ``insert``: new rows in one statement (one transaction, so one shared watermark);
    ``update``: rows changed in one statement (several ids share the watermark);
    ``same_second``: one row updated several times in quick succession;
    ``late``: a transaction that takes its timestamp, holds for ``hold_s`` (past settle), then commits;
    ``delete``: a soft delete (``deleted = 1``).
    """

    at: float
    kind: str
    ids: tuple[int, ...]
    version: int
    repeat: int = 1
    hold_s: float = 0.0


@dataclass(frozen=True)
class Fault:
    """One fault from ``at`` for ``duration`` seconds.

    ``api``: the simulator answers with random faults at ``detail`` rates;
    ``kill``: ``kill -9`` of daemon ``target``, restarted after ``duration``;
    ``stop``: SIGSTOP of daemon ``target`` for ``duration`` (longer than the lease), then SIGCONT;
    with ``detail["busy"]`` the API is made slow just before, so the pause lands mid-cycle;
    ``cut``: the link from daemon ``target`` to its ``detail["link"]`` database (state or source)
    is cut in ``detail["mode"]`` (reset, refuse, blackhole), healed after ``duration``.

    With ``detail["aim"] == "owner"`` the fault hits whichever daemon holds the sync's lease
    when it starts (``target`` if none does): a fault on an idle daemon tests little.
    """

    at: float
    kind: str
    duration: float
    target: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        who = ""
        if self.target is not None:
            who = f" daemon {'owner/' if self.detail.get('aim') == 'owner' else ''}{self.target}"
        what = " ".join(f"{k}={v}" for k, v in self.detail.items() if k != "aim")
        return f"+{self.at:.2f}s {self.kind}{who} {what} for {self.duration:.2f}s".replace("  ", " ")


@dataclass(frozen=True)
class Plan:
    seed: int
    daemons: int
    rows: int  # inserted before the daemons start
    duration: float  # seconds of writes and faults
    interval_ms: int
    settle_ms: int
    batch: int
    latency_s: float
    soft_deletes: bool
    writes: tuple[Write, ...]
    faults: tuple[Fault, ...]

    @property
    def fault_kinds(self) -> set[str]:
        return {fault.kind for fault in self.faults}


def make_plan(
    seed: int,
    *,
    daemons: int | None = None,
    duration: float | None = None,
    soft_deletes: bool = False,
    faults: tuple[str, ...] = FAULT_KINDS,
) -> Plan:
    """The plan of run ``seed``; ``daemons``/``duration`` override the drawn values,
    ``faults`` restricts the kinds drawn (the draws stay the same for the same arguments)."""
    rng = random.Random(seed)
    n_daemons = daemons if daemons is not None else rng.randint(1, 3)
    drawn_duration = rng.uniform(2.5, 4.0)
    interval_ms = rng.randrange(200, 501, 50)
    settle_ms = rng.randrange(100, 401, 50)
    batch = rng.choice((5, 10, 25, 50))
    latency_s = rng.choice((0.0, 0.02, 0.05))  # per API request: wider windows for a fault to land in
    rows = rng.randint(20, 60)

    planned: list[Fault] = []
    busy: dict[Any, float] = {}  # per target: faults on one target do not overlap
    for _ in range(rng.randint(1, 3) if faults else 0):
        kind = rng.choice(faults)
        target = rng.randrange(n_daemons) if kind != "api" else None
        at = rng.uniform(0.3, drawn_duration - 1.0)
        detail: dict[str, Any] = {}
        if kind == "api":
            chosen = rng.sample(("fail_rate", "drop_rate", "throttle_rate", "stall_rate"), rng.randint(1, 2))
            detail = {name: round(rng.uniform(0.15, 0.4), 2) for name in chosen}
            span = rng.uniform(0.5, 2.0)
            slot: Any = "api"
        elif kind == "kill":
            span = rng.uniform(0.2, 1.5)  # down time before the restart
            slot = "process"  # aimed at the owner, so process faults never overlap at all
        elif kind == "stop":
            span = LEASE_S + rng.uniform(0.5, 1.5)
            slot = "process"
            if rng.random() < 0.5:
                detail["busy"] = True  # paused in the middle of a slow request, batches read
        else:
            detail = {"link": rng.choice(("state", "source")), "mode": rng.choice(("reset", "refuse", "blackhole"))}
            # Up to longer than the lease: a daemon cut off from the state database loses its sync.
            span = 0.0 if detail["mode"] == "reset" else rng.uniform(0.5, LEASE_S + 1.5)
            slot = ("link", detail["link"])
        if kind != "api" and rng.random() < 0.7:
            detail["aim"] = "owner"
        if busy.get(slot, -1.0) > at:
            continue
        busy[slot] = at + span + 0.2
        planned.append(Fault(round(at, 3), kind, round(span, 3), target, detail))
    planned.sort(key=lambda fault: fault.at)

    length = duration if duration is not None else drawn_duration
    length = max([length] + [fault.at + fault.duration + 0.5 for fault in planned])

    writes: list[Write] = []
    live = list(range(1, rows + 1))
    next_id, version, at = rows + 1, 0, 0.0
    kinds = ["insert", "update", "update", "same_second", "late"] + (["delete"] if soft_deletes else [])
    while True:
        at += rng.uniform(0.03, 0.15)
        if at >= length:
            break
        kind = rng.choice(kinds)
        version += 1
        if kind == "insert":
            ids = tuple(range(next_id, next_id + rng.randint(1, 5)))
            next_id += len(ids)
            live.extend(ids)
            writes.append(Write(round(at, 3), kind, ids, version))
        elif kind == "update":
            writes.append(Write(round(at, 3), kind, tuple(sorted(rng.sample(live, rng.randint(1, 4)))), version))
        elif kind == "same_second":
            writes.append(Write(round(at, 3), kind, (rng.choice(live),), version, repeat=rng.randint(2, 3)))
            version += 2
        elif kind == "late":
            hold = settle_ms / 1000 + rng.uniform(0.2, 0.8)
            writes.append(Write(round(at, 3), kind, (rng.choice(live),), version, hold_s=round(hold, 3)))
        elif len(live) > 5:
            gone = rng.choice(live)
            live.remove(gone)
            writes.append(Write(round(at, 3), kind, (gone,), version))
    return Plan(
        seed=seed,
        daemons=n_daemons,
        rows=rows,
        duration=round(length, 3),
        interval_ms=interval_ms,
        settle_ms=settle_ms,
        batch=batch,
        latency_s=latency_s,
        soft_deletes=soft_deletes,
        writes=tuple(writes),
        faults=tuple(planned),
    )
