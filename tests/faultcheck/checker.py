"""The verdict: the datastore's last record for every key against the source row now.

The expected record is computed here, independently of syncd's mapping code, from the
config's simple mapping (writers.py stores phones already in E.164, so msisdn is the column
as is; emailid is the e-mail lower-cased).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

import orjson

KEY = "accountid"

FIELDS = """
msisdn    = { column = "phone", transform = "e164", required = true }
firstname = "first_name"
lastname  = "last_name"
emailid   = { column = "email", transform = "lower" }
accountid = "account_id"
"""


def expected_record(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "msisdn": row["phone"],
        "firstname": row["first_name"],
        "lastname": row["last_name"],
        "emailid": row["email"].lower(),
        "accountid": row["account_id"],
    }


@dataclass
class Verdict:
    keys: int = 0  # rows in the model (not soft-deleted)
    lost: int = 0  # the row's current value never reached the datastore
    stale: int = 0  # it did, but an older value was delivered after it and is the last one
    duplicates: int = 0  # records delivered again with a payload already delivered for that key
    removals: int = 0  # soft-deleted rows (left the model)
    delivered: int = 0  # records received by the datastore, duplicates included
    examples: list[dict[str, Any]] = field(default_factory=list)  # a few lost/stale keys, for the report

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.stale == 0


def judge(rows: list[dict[str, Any]], history: list[dict[str, Any]], *, examples: int = 3) -> Verdict:
    """``rows``: the source table now; ``history``: every record the datastore received, in order."""
    verdict = Verdict(delivered=len(history))
    seen: dict[Any, set[bytes]] = collections.defaultdict(set)
    last: dict[Any, dict[str, Any]] = {}
    for record in history:
        payload = orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
        key = record.get(KEY)
        if payload in seen[key]:
            verdict.duplicates += 1
        seen[key].add(payload)
        last[key] = record
    for row in rows:
        if row.get("deleted"):
            verdict.removals += 1
            continue
        verdict.keys += 1
        want = expected_record(row)
        got = last.get(want[KEY])
        if got == want:
            continue
        if orjson.dumps(want, option=orjson.OPT_SORT_KEYS) in seen[want[KEY]]:
            verdict.stale += 1
            problem = "stale"
        else:
            verdict.lost += 1
            problem = "lost"
        if len(verdict.examples) < examples:
            verdict.examples.append({"key": want[KEY], "problem": problem, "expected": want, "last": got})
    return verdict
