"""What the four CRM fixtures share: building a schema from DDL, and writing like a CRM does."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, ClassVar

import sqlalchemy as sa

from .people import Person, naive_utc_now


class CrmFixture:
    """One CRM's contact tables in a throwaway database, filled with `people`.

    Subclasses give the DDL (`DDL`), write the people the way the CRM does (`_fill`), and
    offer the CRM's own ways of changing a contact. `key(person)` is the person's key in the
    CRM's model (a uuid, an int, ...); `people` keeps the generated contacts in order.
    """

    name: ClassVar[str]
    dialect: ClassVar[str]  # "mysql" | "postgresql": where this CRM runs
    DDL: ClassVar[Sequence[str]]

    def __init__(self, url: str, people: list[Person]) -> None:
        self.url = url
        self.engine = sa.create_engine(url)
        self.people = people
        self.keys: dict[int, Any] = {}
        with self.engine.begin() as conn:
            for statement in self.DDL:
                conn.exec_driver_sql(statement)
            self._fill(conn)

    def _fill(self, conn: sa.Connection) -> None:
        raise NotImplementedError

    def key(self, person: Person) -> Any:
        return self.keys[person.index]

    def person(self, key: Any) -> Person:
        index = next(i for i, k in self.keys.items() if k == key)
        return self.people[index]

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(sa.text(sql), params).scalar()

    def rows(self, sql: str, **params: Any) -> list[sa.Row[Any]]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params))

    def execute(self, sql: str, **params: Any) -> int:
        with self.engine.begin() as conn:
            return conn.execute(sa.text(sql), params).rowcount

    @contextmanager
    def late_transaction(self) -> Iterator[sa.Connection]:
        """A transaction that stays open while the test goes on and commits when the block
        ends: what a slow request of the CRM (a mass update, an import) looks like."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def expected(self, person: Person) -> dict[str, str] | None:
        """The record the datastore must hold for `person` (None = never sent)."""
        return person.expected()

    def uncertain(self, person: Person) -> set[str]:
        """Attributes that may or may not be sent for `person` (never as a blank)."""
        return set()

    def soft_delete(self, person: Person, *, at: datetime | None = None) -> None:
        raise NotImplementedError

    def dispose(self) -> None:
        self.engine.dispose()


def stamp(at: datetime | None) -> datetime:
    """A write time as the CRMs store it: naive UTC, whole seconds (MariaDB DATETIME)."""
    return at if at is not None else naive_utc_now()
