"""The rest of a big cycle, read and mapped in a child process, so a backfill uses two cores.

In one interpreter a backfill is bound by the GIL: reading rows, mapping and encoding them
take turns with the pushes and the state writes. When a cycle finds more than
`offload_after` rows waiting, it starts a child process, goes on reading in-process while
the child starts, and then lets the child read and map the rest and stream the mapped
batches back. The parent keeps every decision about what is sent and what is committed
(digest comparison, delivery, retries, state), so no guarantee moves with the work:

- the child reads below the bound the parent's cycle took, from the parent's last
  position, in the same order as the parent would, through the same reader (the sync's
  model and filter): (watermark, key) in chunk transactions, or for a first backfill key
  order in one statement;
- batches arrive in read order, and the watermark still moves only after their ACKs;
- the child is a fresh interpreter (`python -m syncd.offload`: no inherited threads, locks
  or connections, and no re-import of the parent's `__main__`), ignores SIGINT and SIGTERM
  (the parent decides when it stops), and exits when the parent closes the socket or dies.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import structlog

from syncd.config import SourceConfig, SyncConfig
from syncd.mapping import MappedRows, compile_mapping, map_rows
from syncd.source import Bound, Source, SourceError, prefetched
from syncd.values import Cursor

__all__ = ["Offload"]

EXIT_TIMEOUT_S = 5.0
READ_AHEAD = 4  # batches the child's reading thread fetches ahead of its mapping


class Offload:
    """A child process that reads and maps one sync's changed rows; one per big cycle.

    Creating it returns at once; the child takes a few hundred milliseconds to start and
    connect. Keep the cycle going in-process until `ready()`, then go on with `batches()`.
    """

    def __init__(
        self, sync: SyncConfig, source_name: str, source: SourceConfig, *, batch_rows: int, target: bytes
    ) -> None:
        mine, theirs = socket.socketpair()
        with theirs:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "syncd.offload", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
        self._conn = Connection(mine.detach())
        # The source config may hold a password: it goes over this socket only, never argv.
        self._conn.send((sync, source_name, source, batch_rows, target))
        self._ready = False

    def ready(self) -> bool:
        """Whether the child has connected and can take over (never blocks)."""
        if not self._ready and self._conn.poll():
            self._expect("ready")
            self._ready = True
        return self._ready

    def batches(
        self, after: Any, bound: Bound, *, by_key: bool = False
    ) -> Iterator[tuple[Cursor | None, int, MappedRows, list[str]]]:
        """`(position after the batch, rows read, mapped rows, keys of rows outside the model's filter)`
        for every batch past `after`: a cursor, or with `by_key` a key (a first backfill's
        read in key order, as one statement; its batches have no position)."""
        if not self._ready:
            self._expect("ready")
            self._ready = True
        self._conn.send(("read", after, bound, by_key))
        while True:
            kind, value = self._receive()
            if kind == "end":
                return
            if kind != "batch":
                raise SourceError(f"the reading process sent {kind!r}")
            yield value

    def close(self) -> None:
        """Stop the child: it exits on the closed socket (at once if it has not started reading)."""
        self._conn.close()
        if not self._ready:
            self._process.kill()  # still starting: nothing to finish
        try:
            self._process.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # stuck in a read; it holds nothing we need
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> Offload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _expect(self, expected: str) -> Any:
        kind, value = self._receive()
        if kind != expected:
            raise SourceError(f"the reading process sent {kind!r}, not {expected!r}")
        return value

    def _receive(self) -> tuple[str, Any]:
        try:
            kind, value = self._conn.recv()
        except (EOFError, OSError):
            try:
                code = self._process.wait(EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                code = None
            raise SourceError(f"the reading process stopped (exit code {code})") from None
        if kind == "error":
            raise SourceError(value)
        return kind, value


def _serve(conn: Connection) -> None:
    """The child: connect, say ready, then read and map from where the parent says."""
    sync, source_name, config, batch_rows, target = conn.recv()
    source = Source(source_name, config)
    try:
        try:
            reader = source.reader(sync)
            mapping = compile_mapping(sync.fields, sync.columns)
            reader.table  # noqa: B018 -- connect and reflect now, before saying ready
        except SourceError as error:
            conn.send(("error", str(error)))
            return
        conn.send(("ready", None))
        _, after, bound, by_key = conn.recv()
        try:
            if by_key:
                read = reader.rows_in_key_order(after, batch_rows, bound, membership=True, one_statement=True)
            else:
                read = reader.changed_rows(after, batch_rows, bound=bound, membership=True)
            for rows in prefetched(read, depth=READ_AHEAD):
                members, outside = reader.split(rows)  # the parent decides what leaving the model means
                mapped = map_rows(members, mapping, target=target, source_hash=reader.source_hash)
                position = None if by_key else reader.position(rows[-1])
                conn.send(("batch", (position, len(rows), mapped, outside)))
            conn.send(("end", None))
        except SourceError as error:
            conn.send(("error", str(error)))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the parent stopped listening: it has ended the cycle, or died
    except Exception as error:  # reported to the parent, which logs it (redacted) and fails the cycle
        try:
            conn.send(("error", f"reading process: {type(error).__name__}: {error}"))
        except OSError:
            pass
    finally:
        source.dispose()
        conn.close()


def _drop(*_: Any) -> Any:
    raise structlog.DropEvent


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The child does not log: it knows no secrets to redact. What goes wrong reaches the
    # parent as an error, which logs it through its own (redacting) pipeline.
    structlog.configure(processors=[_drop])
    logging.disable(logging.CRITICAL)
    _serve(Connection(int(sys.argv[1])))
