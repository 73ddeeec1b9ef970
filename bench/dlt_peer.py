"""The peer: the same backfill as dlt does it, the way its docs suggest.

`sql_table` with `dlt.sources.incremental("updated_at")` reads the table (sqlalchemy
backend, dlt's default) and a custom `@dlt.destination(batch_size=500)` applies the shared
mapping to each batch and POSTs it to the simulator over one keep-alive httpx connection.
The mapping sits in the destination, as dlt's reverse-ETL examples do, because the
incremental step needs `updated_at` in the items it sees (an `add_map` in front of it
would hide the cursor column). dlt's extract → normalize → load stages, its file staging
and its state handling are all part of what is measured; the pipelines dir is a throwaway
one, so every run is a first (full) load.

Usage: python bench/dlt_peer.py CONFIG SOURCE_URL SCHEMA PIPELINES_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

# Before dlt is imported: no telemetry (no network here) and quiet logs.
os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
os.environ.setdefault("RUNTIME__LOG_LEVEL", "WARNING")

import dlt  # noqa: E402
from common import BATCH, Stopwatch, api_client, emit, load_job, post_batch  # noqa: E402
from dlt.sources.sql_database import sql_table  # noqa: E402
from seed import TABLE  # noqa: E402


def main(config_path: str, source_url: str, schema: str, pipelines_dir: str) -> None:
    job = load_job(Path(config_path))
    mapping, columns, url = job.mapping, job.columns, job.api_url
    client = api_client(job)
    pushed = 0

    @dlt.destination(batch_size=BATCH, name="add_contacts", loader_file_format="typed-jsonl")
    def add_contacts(items: list[dict[str, Any]], table: Any) -> None:
        nonlocal pushed
        post_batch(client, url, [mapping(tuple(item[name] for name in columns)) for item in items])
        pushed += len(items)

    contacts = sql_table(
        credentials=source_url,
        schema=schema,
        table=TABLE,
        incremental=dlt.sources.incremental("updated_at"),
    )
    pipeline = dlt.pipeline(
        pipeline_name="bench_dlt", pipelines_dir=pipelines_dir, destination=add_contacts, dataset_name="bench"
    )
    watch = Stopwatch()
    pipeline.run(contacts)
    seconds = watch.elapsed()
    client.close()
    emit(rows=pushed, seconds=seconds)


if __name__ == "__main__":
    main(*sys.argv[1:5])
