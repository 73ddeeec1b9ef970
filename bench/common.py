"""What the three contenders share: the config, the mapping, the API call, the result line.

All three read the same table and push to the same simulator, and all three map rows with
the *same* compiled mapping, built from the bench config's `[syncs.fields]` by syncd's own
`compile_mapping` (msisdn = e164 phone, firstname, lastname, emailid = lower email,
accountid). Any difference between them is then pipeline overhead, not mapping work.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from syncd.config import SyncConfig, load_config
from syncd.config_text import render_config
from syncd.mapping import Mapping, compile_mapping

RESULT_PREFIX = "BENCH_RESULT "
DATASTORE_ID = "1466"
FEED_ID = "1499"
BATCH = 500

FIELDS = {
    "msisdn": {"column": "phone", "transform": "e164", "required": True},
    "firstname": "first_name",
    "lastname": "last_name",
    "emailid": {"column": "email", "transform": "lower"},
    "accountid": "account_id",
}


def write_config(
    path: Path,
    *,
    source_url: str,
    table: str,
    api_url: str,
    token_file: Path,
    state_url: str,
    max_in_flight: int,
) -> Path:
    """The syncd config every contender reads: same source, endpoint, batch size, fields."""
    path.write_text(
        render_config(
            comment="written by bench/run.py",
            state={"url": state_url},
            log={"level": "debug", "format": "json"},  # an idle cycle's line is at debug; syncd logs nothing else there
            api={
                "url": api_url,
                "token_file": str(token_file),
                "timeout_s": 60,
                "requests_per_second": 0,
                "max_in_flight": max_in_flight,
                "max_batch_records": BATCH,
            },
            sources={"crm": {"url": source_url}},
            syncs=[
                {
                    "name": "contacts",
                    "source": "crm",
                    "table": table,
                    "key": "id",
                    "watermark": "updated_at",
                    "interval": "30s",
                    "settle": "0s",
                    "reconcile": "off",
                    "datastore_id": DATASTORE_ID,
                    "feed_id": FEED_ID,
                    "fields": FIELDS,
                }
            ],
        )
    )
    return path


@dataclass(frozen=True, slots=True)
class Job:
    """The parts of the bench config that the limit and the dlt peer need."""

    sync: SyncConfig
    mapping: Mapping
    api_url: str
    token: str

    @property
    def columns(self) -> tuple[str, ...]:
        """Source columns in the order `mapping` expects them."""
        return self.sync.columns


def load_job(config_path: Path) -> Job:
    config = load_config(config_path)
    sync = config.syncs[0]
    assert config.api.token_file is not None
    return Job(
        sync=sync,
        mapping=compile_mapping(sync.fields, sync.columns),
        api_url=config.api.url,
        token=config.api.token_file.read_text().strip(),
    )


def api_client(job: Job) -> httpx.Client:
    """One keep-alive connection to the endpoint, as a real pusher would hold it."""
    return httpx.Client(
        headers={"content-type": "application/json", "authorization": f"Bearer {job.token}"},
        timeout=60.0,
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
    )


def post_batch(client: httpx.Client, url: str, records: list[dict[str, Any]]) -> None:
    """POST one batch and insist on an ACK, so no contender can win by failing fast."""
    body = orjson.dumps({"datastore-id": DATASTORE_ID, "feed-id": FEED_ID, "records": records})
    response = client.post(url, content=body)
    answer = orjson.loads(response.content)
    if response.status_code != 200 or answer.get("statuscode") != 0:
        raise RuntimeError(f"push refused: HTTP {response.status_code} {answer}")


def emit(**fields: Any) -> None:
    """The one machine-readable line bench/run.py looks for on a contender's stdout."""
    sys.stdout.write(RESULT_PREFIX + orjson.dumps(fields).decode() + "\n")
    sys.stdout.flush()


class Stopwatch:
    """Elapsed seconds since construction (perf_counter)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started
