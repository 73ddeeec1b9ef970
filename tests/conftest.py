"""Shared fixtures: real source databases, each in a throwaway schema or database; the API
simulator, one for the session and started over for each test that uses it; a state
database; and logging put back after every test. Helpers that are plain functions (the
config, the CLI, what the API stored) are in tests/crm.py.

A service that is not reachable skips its tests with the reason, unless
SYNCD_REQUIRE_SERVICES=1 (set by .ci/run), which turns the skip into a failure so
CI can never pass by skipping. A test that needs PostgreSQL or MariaDB is marked
`postgres` or `mysql`, so `-m "not mysql"` leaves it out.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import structlog

from syncd.logs import THIRD_PARTY
from syncd.simulator import RunningSimulator, SimulatorConfig, start_in_thread

from .crm import TOKEN, Crm, RunningDaemon, write_config

POSTGRES_URL = os.environ.get("SYNCD_TEST_POSTGRES", "postgresql+psycopg://root@127.0.0.1:5432/test")
MYSQL_URL = os.environ.get("SYNCD_TEST_MYSQL", "mysql+pymysql://root:@127.0.0.1:3306/test")
REQUIRE_SERVICES = os.environ.get("SYNCD_REQUIRE_SERVICES") == "1"


def _service_unavailable(what: str, error: Exception) -> None:
    reason = f"{what} is not reachable ({type(error).__name__}: {str(error).splitlines()[0]})"
    if REQUIRE_SERVICES:
        pytest.fail(f"SYNCD_REQUIRE_SERVICES=1 but {reason}")
    pytest.skip(reason)


def _probe(url: str, what: str) -> sa.Engine:
    try:
        engine = sa.create_engine(url, pool_pre_ping=True)
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except ImportError as error:  # driver missing
        _service_unavailable(what, error)
    except sa.exc.OperationalError as error:
        _service_unavailable(what, error)
    return engine


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL to a fresh PostgreSQL schema; the schema is the connection's search_path."""
    admin = _probe(POSTGRES_URL, "PostgreSQL")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = sa.make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def mysql_url() -> Iterator[str]:
    """A URL to a fresh MariaDB/MySQL database."""
    admin = _probe(MYSQL_URL, "MariaDB/MySQL")
    database = f"t_{uuid.uuid4().hex[:12]}"
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE DATABASE `{database}`"))
    url = sa.make_url(MYSQL_URL).set(database=database)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP DATABASE `{database}`"))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    """A URL to a fresh SQLite file."""
    return f"sqlite:///{tmp_path / 'crm.db'}"


_SERVICE_MARKS = {"postgres_url": "postgres", "mysql_url": "mysql"}


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres), pytest.param("mysql", marks=pytest.mark.mysql)]
)
def source_url(request) -> str:
    """Each real source database in turn."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def crm(source_url: str) -> Iterator[Crm]:
    """The contacts table on each real source database in turn."""
    crm = Crm(source_url)
    yield crm
    crm.dispose()


@pytest.fixture
def pg_crm(postgres_url: str) -> Iterator[Crm]:
    """The contacts table on PostgreSQL."""
    crm = Crm(postgres_url)
    yield crm
    crm.dispose()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test reaching a service's database is marked as `source_url`'s parameters are: by
    the fixture it asks for, or by a parameter naming the service (`service`, an indirect `crm`)."""
    for item in items:
        wanted = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        if callspec is not None:
            wanted |= {f"{value}_url" for value in callspec.params.values() if isinstance(value, str)}
        for fixture, mark in _SERVICE_MARKS.items():
            if fixture in wanted and item.get_closest_marker(mark) is None:
                item.add_marker(mark)


@pytest.fixture
def state_url(tmp_path) -> str:
    """A state database in the test's directory (created by the first command that needs it)."""
    return f"sqlite:///{tmp_path / 'state.db'}"


@pytest.fixture
def syncd_config(tmp_path: Path, api: RunningSimulator, state_url: str) -> Callable[..., Path]:
    """`syncd_config(source_url, **options)`: tests/crm.py's one-sync config, syncing
    `source_url` to `api` with `state_url`, written to the test's syncd.toml."""

    def write(source_url: str, **options: Any) -> Path:
        return write_config(tmp_path / "syncd.toml", source_url=source_url, api_url=api.url, state_url=state_url, **options)

    return write


@pytest.fixture(scope="session")
def simulator() -> Iterator[RunningSimulator]:
    """The session's one API simulator; tests take it through `api`, which starts it over."""
    with start_in_thread(SimulatorConfig(tokens=(TOKEN,))) as simulator:
        yield simulator


@pytest.fixture
def api_config() -> SimulatorConfig:
    """The simulator's settings for a test; a module overrides this fixture to change them."""
    return SimulatorConfig(tokens=(TOKEN,), key_attribute="accountid")


@pytest.fixture
def api(simulator: RunningSimulator, api_config: SimulatorConfig) -> RunningSimulator:
    """The API simulator with `api_config`'s settings, nothing stored and an empty log."""
    simulator.start_over(api_config)
    return simulator


@pytest.fixture
def daemons() -> Iterator[Callable[..., RunningDaemon]]:
    """Starts `syncd run` daemons (`daemons(config)`); each is killed after the test if still running."""
    started: list[RunningDaemon] = []

    def start(config: Path, env: dict[str, str] | None = None) -> RunningDaemon:
        daemon = RunningDaemon(config, env)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.close()


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """`syncd` configures logging for the whole process: every test starts with fresh
    contextvars, and logging and structlog are put back as they were for the next one."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    library_levels = {name: logging.getLogger(name).level for name in THIRD_PARTY}
    structlog.contextvars.clear_contextvars()
    yield
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()
    logging.captureWarnings(False)
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, library_level in library_levels.items():
        logging.getLogger(name).setLevel(library_level)
