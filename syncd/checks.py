"""`syncd check`: everything that can be verified before the first cycle runs.

Config validity is checked by loading it; this module checks what the config points at:
the state database, the token file, each source, and each sync's model against the
live schema: columns, watermark type, the filter and the query as the database runs them,
and the change feeds. A table's constraints vouch for its key (unique) and watermark (NOT
NULL, indexed); a view or a query has none, so its key and watermark are checked by data.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from syncd.config import Config, config_warnings
from syncd.source import Source, describe_db_error
from syncd.state import StateStore, db_error_line

__all__ = ["CheckLine", "run_checks"]


@dataclass(frozen=True, slots=True)
class CheckLine:
    severity: str  # ok | warning | error
    subject: str
    message: str


def run_checks(config: Config, path: Path) -> Iterator[CheckLine]:
    yield CheckLine("ok", "config", f"{path}: {len(config.syncs)} sync(s), {len(config.sources)} source(s)")
    for warning in config_warnings(path, config):
        yield CheckLine("warning", "config", warning)
    yield from _check_state(config)
    yield from _check_token(config)
    for name, source_config in config.sources.items():
        source = Source(name, source_config)
        try:
            with source.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except sa.exc.DBAPIError as error:
            yield CheckLine("error", f"source {name}", describe_db_error(source, error))
            continue
        except (OSError, ImportError, sa.exc.ArgumentError) as error:
            yield CheckLine("error", f"source {name}", f"{source_config.display_url()}: {error}")
            continue
        yield CheckLine("ok", f"source {name}", f"connected to {source_config.display_url()}")
        for sync in config.syncs:
            if sync.source != name:
                continue
            problems = source.reader(sync).problems()
            for problem in problems:
                yield CheckLine(problem.severity, f"sync {sync.name}", problem.message)
            if not any(p.severity == "error" for p in problems):
                model = f"table {sync.table}" if sync.table is not None else "query"
                feeds = f", {len(sync.changes)} change feed(s)" if sync.changes else ""
                yield CheckLine("ok", f"sync {sync.name}", f"{model}: {len(sync.columns)} column(s) found{feeds}")
        source.dispose()


def _check_state(config: Config) -> Iterator[CheckLine]:
    url = sa.make_url(config.state.url).render_as_string(hide_password=True)
    try:
        state = StateStore(config.state.url)
    except ValueError as error:
        yield CheckLine("error", "state", str(error))
        return
    try:
        current = state.schema_is_current()
    except (sa.exc.DBAPIError, OSError) as error:
        yield CheckLine("error", "state", f"{url}: {db_error_line(error)}")
        return
    finally:
        state.close()
    if current:
        yield CheckLine("ok", "state", f"{url}: schema up to date")
    else:
        yield CheckLine("warning", "state", f"{url}: schema not current; `syncd migrate` (run and once do it too)")


def _check_token(config: Config) -> Iterator[CheckLine]:
    path = config.api.token_file
    if path is None:
        yield CheckLine("ok", "api", "token set inline in the config (token_file is preferred)")
        return
    try:
        token = Path(path).read_text().strip()
    except OSError as error:
        yield CheckLine("error", "api", f"token_file {path}: {error.strerror}")
        return
    if not token:
        yield CheckLine("error", "api", f"token_file {path} is empty")
    else:
        yield CheckLine("ok", "api", f"token_file {path} readable")
