"""`syncd check`: everything that can be verified before the first cycle runs.

Config validity is checked by loading it; this module checks what the config points at:
the state database, the token file, each source, each sync's model against the live
schema (columns, watermark type, the filter and the query as the database runs them, the
change feeds), and the API itself (`probe_api`: reachable, and does it take the key),
without sending a record. A table's constraints vouch for its key (unique) and watermark
(NOT NULL, indexed); a view or a query has none, so its key and watermark are checked by data.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from syncd.config import Config, SecretFileError, config_warnings, read_secret_file
from syncd.runtime import open_api, open_source, open_state
from syncd.source import SourceError, describe_db_error
from syncd.state import StateError

__all__ = ["CheckLine", "probe_api", "run_checks"]


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
        source = open_source(config, name)
        try:
            with source.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except sa.exc.DBAPIError as error:
            yield CheckLine("error", f"source {name}", describe_db_error(source, error))
            continue
        except SourceError as error:  # e.g. its password_file, named by key
            yield CheckLine("error", f"source {name}", str(error))
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
    from syncd.status import state_path

    url = config.state.display_url()
    path = state_path(config)
    if path is not None and not path.is_file():  # checking must not create it
        yield CheckLine("warning", "state", f"no state database at {path} yet; `syncd migrate`, `run` or `once` create it")
        return
    try:
        state = open_state(config)
    except StateError as error:
        yield CheckLine("error", "state", f"{url}: {error.reason}")
        return
    try:
        current = state.schema_is_current()
    except StateError as error:
        yield CheckLine("error", "state", f"{url}: {error.reason}")
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
        token = read_secret_file(path, "api.token_file")
    except SecretFileError as error:
        yield CheckLine("error", "api", str(error))
        return
    if not token:
        yield CheckLine("error", "api", f"api.token_file: {path} is empty")
    else:
        yield CheckLine("ok", "api", f"token_file {path} readable")


def probe_api(config: Config) -> Iterator[CheckLine]:
    """Ask the API whether it is there and takes the key, sending no record.

    The probe is an Add-contacts request with an empty `records` array, for the first
    sync's datastore and feed. The API checks the key before the body, so its answer
    tells: 401/430 or 498, the key is refused; 405 or 404, `api.url` is not the endpoint;
    1001/1002 (the empty batch is invalid input) or an ACK, the API is reachable and the
    key accepted; no answer, unreachable. An empty batch carries no contact, so even an
    ACK stores nothing.
    """
    from syncd.delivery import (
        ApiError,
        AuthError,
        ConfigurationError,
        RateLimiter,
        RejectedError,
        ThrottledError,
    )

    subject = "api"
    first = config.syncs[0] if config.syncs else None
    datastore_id, feed_id = (first.datastore_id, first.feed_id) if first else ("0", "0")
    client = open_api(config, RateLimiter(0))
    try:
        client.tokens.get()
    except AuthError:  # reported by the token check above
        client.close()
        yield CheckLine("warning", subject, f"{config.api.url} not probed: no API key to probe with")
        return
    where = config.api.url
    try:
        ack = client.push(datastore_id, feed_id, [])
    except AuthError as error:
        yield CheckLine("error", subject, f"{where} refused the key: {_answer(error)}")
    except ConfigurationError as error:
        yield CheckLine("error", subject, f"{where} is not the Add-contacts endpoint: {_answer(error)}")
    except RejectedError as error:  # the empty batch is refused as invalid, after the key was accepted
        answer = f"HTTP {error.http_status}, code {error.api_code}"
        yield CheckLine("ok", subject, f"{where} reachable, key accepted (empty probe: {answer})")
    except ThrottledError as error:
        yield CheckLine("warning", subject, f"{where} reachable but throttling (key not verified): {_answer(error)}")
    except ApiError as error:  # retryable: network errors, timeouts, 5xx, 1010
        if error.http_status is None:
            yield CheckLine("error", subject, f"{where} unreachable: {error.description}")
        else:
            yield CheckLine("warning", subject, f"{where} reachable but failing (key not verified): {_answer(error)}")
    else:
        answer = f"acknowledged, trans_id {ack.trans_id}"
        yield CheckLine("ok", subject, f"{where} reachable, key accepted (empty probe {answer})")
    finally:
        client.close()


def _answer(error: Any) -> str:
    return f"HTTP {error.http_status}, code {error.api_code}: {error.description}"
