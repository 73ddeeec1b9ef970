"""A small CRM for the tests: a contacts table on any source, a config that syncs it, and
the plain helpers the tests share: the CLI in or out of process, what the API stored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import sqlalchemy as sa

from syncd.cli import main
from syncd.config_text import render_config

TOKEN = "test-token-5f1c9e"


def contacts_table(
    metadata: sa.MetaData,
    *,
    name: str = "contacts",
    schema: str | None = None,
    watermark: str = "timestamp",  # timestamp | timestamptz | int
    deleted: bool = False,  # a soft-delete flag, as SuiteCRM keeps one
) -> sa.Table:
    wm_type = _stamp_type(metadata, watermark)
    extra = [sa.Column("deleted", sa.Integer, nullable=False, server_default="0")] if deleted else []
    table = sa.Table(
        name,
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("first_name", sa.String(100)),
        sa.Column("last_name", sa.String(100)),
        sa.Column("email", sa.String(200)),
        sa.Column("phone", sa.String(40)),
        sa.Column("account_id", sa.String(40)),
        sa.Column("updated_at", wm_type, nullable=False),
        *extra,
        schema=schema,
    )
    sa.Index(f"ix_{name}_updated_at_id", table.c.updated_at, table.c.id)
    return table


def _stamp_type(metadata: sa.MetaData, watermark: str = "timestamp") -> sa.types.TypeEngine[Any]:
    if watermark == "int":
        return sa.BigInteger()
    if metadata.info.get("dialect") in ("mysql", "mariadb"):
        from sqlalchemy.dialects.mysql import DATETIME

        return DATETIME(fsp=6)
    return sa.DateTime(timezone=watermark == "timestamptz")


class Crm:
    """The contacts table on one source database, with helpers to write like a CRM does."""

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        watermark: str = "timestamp",
        name: str = "contacts",
        deleted: bool = False,
        emails: bool = False,
    ) -> None:
        self.url = url
        self.engine = sa.create_engine(url)
        metadata = sa.MetaData(info={"dialect": self.engine.dialect.name})
        self.watermark = watermark
        self.table = contacts_table(metadata, name=name, schema=schema, watermark=watermark, deleted=deleted)
        if emails:
            self.addresses, self.relations = email_tables(metadata)
        metadata.create_all(self.engine)
        self._version = 0

    @property
    def qualified_name(self) -> str:
        return f"{self.table.schema}.{self.table.name}" if self.table.schema else self.table.name

    def stamp(self, age: timedelta = timedelta(seconds=1)) -> Any:
        """A watermark value for a write happening now (`age` in the past)."""
        if self.watermark == "int":
            self._version += 1
            return self._version
        now = datetime.now(UTC) - age
        return now if self.watermark == "timestamptz" and self.engine.dialect.name == "postgresql" else now.replace(tzinfo=None)

    def insert(self, rows: Iterable[dict[str, Any]], *, stamp: Any = None) -> None:
        rows = list(rows)
        value = self.stamp() if stamp is None else stamp
        for row in rows:
            row.setdefault("updated_at", value)
        with self.engine.begin() as conn:
            conn.execute(self.table.insert(), rows)

    def update(self, ids: Iterable[int], *, bump: bool = True, **values: Any) -> None:
        if bump:
            values["updated_at"] = self.stamp()
        with self.engine.begin() as conn:
            conn.execute(self.table.update().where(self.table.c.id.in_(list(ids))).values(**values))

    def link_email(self, contact_id: int, address: str) -> None:
        """Give a contact a (primary) e-mail address the SuiteCRM way: an address row and a relation row."""
        stamp = self.stamp()
        with self.engine.begin() as conn:
            conn.execute(
                self.addresses.insert().values(id=f"ea-{contact_id}", email_address=address, date_modified=stamp)
            )
            conn.execute(
                self.relations.insert().values(
                    id=f"rel-{contact_id}",
                    email_address_id=f"ea-{contact_id}",
                    bean_id=contact_id,
                    bean_module="Contacts",
                    primary_address=1,
                    deleted=0,
                    date_modified=stamp,
                )
            )

    def change_email(self, contact_id: int, address: str) -> None:
        """Edit the address row only: the contact's own row and its watermark stay as they are."""
        with self.engine.begin() as conn:
            conn.execute(
                self.addresses.update()
                .where(self.addresses.c.id == f"ea-{contact_id}")
                .values(email_address=address, date_modified=self.stamp())
            )

    def unlink_email(self, contact_id: int) -> None:
        """Soft-delete the relation row (SuiteCRM's `deleted = 1`), bumping its own timestamp."""
        with self.engine.begin() as conn:
            conn.execute(
                self.relations.update()
                .where(self.relations.c.bean_id == contact_id)
                .values(deleted=1, date_modified=self.stamp())
            )

    def dispose(self) -> None:
        self.engine.dispose()


def email_tables(metadata: sa.MetaData) -> tuple[sa.Table, sa.Table]:
    """SuiteCRM's e-mail tables, reduced to the columns a sync reads (names and roles from
    SuiteCRM 7's vardefs: modules/EmailAddresses/vardefs.php, metadata/email_addr_bean_relMetaData.php)."""
    stamp = _stamp_type(metadata)
    addresses = sa.Table(
        "email_addresses",
        metadata,
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("email_address", sa.String(255)),
        sa.Column("date_modified", stamp, nullable=False),
    )
    sa.Index("ix_email_addresses_date_modified_id", addresses.c.date_modified, addresses.c.id)
    relations = sa.Table(
        "email_addr_bean_rel",
        metadata,
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("email_address_id", sa.String(36), nullable=False),
        sa.Column("bean_id", sa.Integer, nullable=False),
        sa.Column("bean_module", sa.String(100)),
        sa.Column("primary_address", sa.Integer, nullable=False, server_default="0"),
        sa.Column("deleted", sa.Integer, nullable=False, server_default="0"),
        sa.Column("date_modified", stamp, nullable=False),
    )
    sa.Index("ix_email_addr_bean_rel_date_modified_bean_id", relations.c.date_modified, relations.c.bean_id)
    return addresses, relations


def contact(i: int, **overrides: Any) -> dict[str, Any]:
    row = {
        "id": i,
        "first_name": f"First{i}",
        "last_name": f"Last{i}",
        "email": f"Person{i}@Example.COM",
        "phone": f"+4420{7946_0000 + i:08d}",
        "account_id": f"acct-{i}",
    }
    row.update(overrides)
    return row


FIELDS: dict[str, Any] = {
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
    api_url: str,
    state_url: str,
    table: str = "contacts",
    token_file: Path | None = None,
    batch: int = 500,
    in_flight: int = 2,
    settle: str = "0s",
    api: Mapping[str, Any] | str = "",
    sync: Mapping[str, Any] | str = "",
    fields: Mapping[str, Any] | str | None = None,
    model: str | None = None,
    tables: str = "",
    extra_api: str = "",
    extra_sync: str = "",
    more_syncs: Iterable[Mapping[str, Any]] = (),
) -> Path:
    """A config with one sync `contacts` of `table`, written with the package's `render_config`.

    `api` and `sync` add or replace keys of `[api]` and the sync; `model` (e.g. a `query`)
    replaces its `table` key; `tables` adds sub-tables (`[[syncs.changes]]`, `[syncs.removed]`);
    `more_syncs` follow it as they are.
    Each may be given as TOML text (`extra_api` and `extra_sync` are the older names of `api`
    and `sync`)."""
    if token_file is None:
        token_file = path.parent / "api-token"
        token_file.write_text(TOKEN + "\n")
    sync_table: dict[str, Any] = {
        "name": "contacts",
        "source": "crm",
        **(_toml(model) if model else {"table": table}),
        "key": "id",
        "watermark": "updated_at",
        "interval": "1s",
        "settle": settle,
        "datastore_id": "1466",
        "feed_id": "1499",
        **_toml(sync),
        **_toml(extra_sync),
        "fields": _toml(fields) if fields is not None else FIELDS,
        **_toml(tables).get("syncs", {}),
    }
    path.write_text(
        render_config(
            state={"url": state_url},
            log={"level": "warning"},
            api={
                "url": api_url,
                "token_file": str(token_file),
                "timeout_s": 5,
                "requests_per_second": 0,
                "max_in_flight": in_flight,
                "max_batch_records": batch,
                "backoff_base_s": 0.01,
                "backoff_max_s": 0.2,
                **_toml(api),
                **_toml(extra_api),
            },
            sources={"crm": {"url": source_url}},
            syncs=[sync_table, *more_syncs],
        )
    )
    return path


def _toml(values: Mapping[str, Any] | str) -> dict[str, Any]:
    return tomllib.loads(values) if isinstance(values, str) else dict(values)


def once(config: Path, *extra: str) -> int:
    """`syncd once` on `config` in this process (its exit code)."""
    return main(["once", "-c", str(config), "--no-progress", *extra])


def syncd(*args: str, cwd: Path | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """`syncd ARGS` in a subprocess, as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "syncd.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def stored(api: Any, key: str = "accountid", datastore_id: str = "1466") -> dict[str, dict[str, Any]]:
    """The records the API holds, by the value of `key`."""
    return {record[key]: record for record in api.records(datastore_id)}


def pushed_records(api: Any) -> int:
    """Records in the requests the API answered 200."""
    return sum(entry["records"] for entry in api.requests() if entry["status"] == 200)


class RunningDaemon:
    """`syncd run -c CONFIG` in a subprocess, its output in files (a pipe could fill up)."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.stderr_path = config.parent / "daemon.stderr"
        self.stdout_path = config.parent / "daemon.stdout"
        self._stderr = self.stderr_path.open("wb")
        self._stdout = self.stdout_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "syncd.cli", "run", "-c", str(config)],
            stdout=self._stdout,
            stderr=self._stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )

    def lines(self) -> list[str]:
        text = self.stdout_path.read_text() + self.stderr_path.read_text()
        return [line for line in text.splitlines() if line.strip()]

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = []
        for line in self.lines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if name is None or event.get("event") == name:
                found.append(event)
        return found

    def wait_event(self, name: str, timeout: float = 10, where: Callable[[dict], bool] = lambda e: True) -> dict:
        def seen() -> dict | None:
            assert self.proc.poll() is None, f"daemon exited ({self.proc.returncode}):\n" + "\n".join(self.lines()[-20:])
            return next((e for e in self.events(name) if where(e)), None)

        return wait_for(seen, timeout, f"log event {name!r}")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._stderr.close()
        self._stdout.close()


def wait_for(condition: Callable[[], Any], timeout: float = 15, what: str = "condition", every: float = 0.02) -> Any:
    """Poll `condition` until it returns something truthy (returned), or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def offload_children(parent: psutil.Process | None = None) -> list[psutil.Process]:
    """The `python -m syncd.offload` children of `parent` (default: this process), at any depth."""
    found = []
    for child in (parent or psutil.Process()).children(recursive=True):
        try:
            if "syncd.offload" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:  # gone between listing and asking
            pass
    return found
