"""The source database and the writes a CRM makes to it during a run.

Watermarks come from the database's own clock (``now()`` is the start of the writing
transaction, as a CRM's trigger or ORM default would stamp it), stored naive in UTC.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import sqlalchemy as sa

from .plan import Plan, Write

_NOW = "(now() AT TIME ZONE 'UTC')"

SCHEMA = f"""
CREATE TABLE contacts (
    id integer PRIMARY KEY,
    first_name varchar(100),
    last_name varchar(100),
    email varchar(200),
    phone varchar(40),
    account_id varchar(40),
    deleted smallint NOT NULL DEFAULT 0,
    updated_at timestamp NOT NULL DEFAULT {_NOW}
);
CREATE INDEX ix_contacts_updated_at_id ON contacts (updated_at, id);
"""


def new_row(i: int) -> dict[str, Any]:
    return {
        "id": i,
        "first_name": f"First{i}",
        "last_name": f"Last{i}",
        "email": f"Person{i}@Example.COM",
        "phone": f"+4420{79460000 + i:08d}",  # already E.164: the mapping keeps it as is
        "account_id": f"acct-{i}",
    }


def changed(i: int, version: int) -> dict[str, Any]:
    return {"first_name": f"F{i}v{version}", "email": f"P{i}.v{version}@Example.COM"}


_INSERT = sa.text(
    "INSERT INTO contacts (id, first_name, last_name, email, phone, account_id) "
    "VALUES (:id, :first_name, :last_name, :email, :phone, :account_id)"
)


def create_source(engine: sa.Engine, rows: int) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(SCHEMA)
        if rows:
            conn.execute(_INSERT, [new_row(i) for i in range(1, rows + 1)])


def read_rows(engine: sa.Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(sa.text("SELECT * FROM contacts ORDER BY id"))]


class Writers:
    """Plays the plan's writes on the source, on time, from a thread; late commits run on
    threads of their own so the other writes go on while they are held open."""

    def __init__(self, engine: sa.Engine, plan: Plan) -> None:
        self.engine = engine
        self.plan = plan
        self.errors: list[str] = []
        self.done = 0
        self._late: list[threading.Thread] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="writers", daemon=True)

    def start(self, started: float) -> None:
        self._started = started
        self._thread.start()

    def _run(self) -> None:
        for write in self.plan.writes:
            delay = self._started + write.at - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                break
            if write.kind == "late":
                thread = threading.Thread(target=self._apply, args=(write,), daemon=True)
                thread.start()
                self._late.append(thread)
            else:
                self._apply(write)

    def _apply(self, write: Write) -> None:
        try:
            if write.kind == "insert":
                with self.engine.begin() as conn:
                    conn.execute(_INSERT, [new_row(i) for i in write.ids])
            elif write.kind == "delete":
                with self.engine.begin() as conn:
                    conn.execute(
                        sa.text(f"UPDATE contacts SET deleted = 1, updated_at = {_NOW} WHERE id = ANY(:ids)"),
                        {"ids": list(write.ids)},
                    )
            else:
                for step in range(write.repeat):
                    with self.engine.begin() as conn:
                        for i in write.ids:  # one transaction: the rows share one watermark
                            conn.execute(
                                sa.text(
                                    "UPDATE contacts SET first_name = :first_name, email = :email, "
                                    f"updated_at = {_NOW} WHERE id = :id"
                                ),
                                {"id": i, **changed(i, write.version + step)},
                            )
                        if write.hold_s:
                            time.sleep(write.hold_s)  # committed long after its timestamp
            self.done += 1
        except sa.exc.SQLAlchemyError as error:
            self.errors.append(f"{write.kind} {write.ids}: {str(error).splitlines()[0]}")

    def join(self) -> None:
        """Wait for every write, late commits included."""
        if self._thread.ident is not None:  # started
            self._thread.join()
        for thread in self._late:
            thread.join()

    def stop(self) -> None:
        self._stop.set()
        self.join()
