"""The limit: the least work a backfill needs, with nothing a daemon adds.

Stream the rows in `(updated_at, id)` order through one psycopg server-side cursor (the
order an incremental sync has to read in), map each with the shared mapping, serialise
500 records with orjson, POST over one keep-alive connection and check the ACK. One batch
is on the wire while the next is read and mapped (a single sender thread: without that
overlap the limit would measure client time + server time, below what a pusher can do).
No state db, no digests, no retries, no logging: whatever syncd costs beyond this is the
price of its guarantees.

Usage: python bench/limit.py CONFIG DSN SCHEMA
"""

from __future__ import annotations

import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import psycopg
from common import BATCH, Stopwatch, api_client, emit, load_job, post_batch
from psycopg import sql
from seed import TABLE


def main(config_path: str, dsn: str, schema: str) -> None:
    job = load_job(Path(config_path))
    mapping, url = job.mapping, job.api_url
    query = sql.SQL("SELECT {} FROM {} ORDER BY updated_at, id").format(
        sql.SQL(", ").join(map(sql.Identifier, job.columns)), sql.Identifier(schema, TABLE)
    )
    watch = Stopwatch()
    rows = 0
    with (
        psycopg.connect(dsn) as conn,
        api_client(job) as client,
        conn.cursor(name="limit") as cursor,  # named = server-side: memory stays flat
    ):
        cursor.itersize = 5_000
        cursor.execute(query)
        with ThreadPoolExecutor(1) as sender:
            on_wire: Future[None] | None = None
            while chunk := cursor.fetchmany(BATCH):
                records = [mapping(row) for row in chunk]
                if on_wire is not None:
                    on_wire.result()
                on_wire = sender.submit(post_batch, client, url, records)
                rows += len(chunk)
            if on_wire is not None:
                on_wire.result()
    emit(rows=rows, seconds=watch.elapsed())


if __name__ == "__main__":
    main(*sys.argv[1:4])
