"""Odoo 17 on PostgreSQL: `res_partner` (persons, companies and addresses in one table) and
`res_country`.

Columns, types and indexes follow odoo/odoo (17.0): odoo/addons/base/models/res_partner.py
(`name` Char index=True, `parent_id`/`commercial_partner_id`/`company_id` index=True,
`country_id` Many2one index='btree_not_null', `type` selection default 'contact', `active`
default True, `is_company`, `email`, `phone`, `mobile`, the `check_name` constraint) and
odoo/addons/base/models/res_country.py (`code` Char(2), unique). Odoo maps Char to
`varchar`, Boolean to `boolean`, Many2one to `int4` with a foreign key, and the magic fields
`create_date`/`write_date` to `timestamp without time zone`, which Odoo fills with the
transaction's start in UTC (`now() at time zone 'UTC'`). `res_country.name` is translated,
so it is `jsonb` ({"en_US": ...}). The Odoo 17 index names are `<table>__<column>_index`.

Index marked ADDED: `(write_date, id)` for the model's watermark; Odoo declares none on it.

Writes follow the ORM: archiving sets `active = false`, a company is `is_company = true`,
child addresses are `type = 'invoice' | 'delivery' | 'other'` rows with a `parent_id`,
and every write stamps `write_date`.
"""

from __future__ import annotations

import random
from datetime import datetime

import sqlalchemy as sa

from .common import CrmFixture, stamp
from .people import COUNTRY_NAMES, Person, PhoneBook, e164, past_stamps

DDL = (
    """CREATE TABLE res_country (
        id serial NOT NULL PRIMARY KEY,
        name jsonb NOT NULL,
        code varchar(2) NOT NULL,
        phone_code int4,
        create_uid int4,
        create_date timestamp without time zone,
        write_uid int4,
        write_date timestamp without time zone,
        CONSTRAINT res_country_code_uniq UNIQUE (code)
    )""",
    """CREATE TABLE res_partner (
        id serial NOT NULL PRIMARY KEY,
        name varchar,
        complete_name varchar,
        parent_id int4 REFERENCES res_partner (id) ON DELETE SET NULL,
        ref varchar,
        lang varchar,
        tz varchar,
        vat varchar,
        company_id int4,
        type varchar DEFAULT 'contact',
        street varchar,
        street2 varchar,
        zip varchar,
        city varchar,
        state_id int4,
        country_id int4 REFERENCES res_country (id) ON DELETE RESTRICT,
        email varchar,
        phone varchar,
        mobile varchar,
        is_company boolean DEFAULT false,
        active boolean DEFAULT true,
        employee boolean,
        function varchar,
        commercial_partner_id int4,
        commercial_company_name varchar,
        create_uid int4,
        create_date timestamp without time zone,
        write_uid int4,
        write_date timestamp without time zone,
        CONSTRAINT res_partner_check_name CHECK ((type = 'contact' AND name IS NOT NULL) OR (type != 'contact'))
    )""",
    "CREATE INDEX res_partner__name_index ON res_partner (name)",
    "CREATE INDEX res_partner__complete_name_index ON res_partner (complete_name)",
    "CREATE INDEX res_partner__parent_id_index ON res_partner (parent_id)",
    "CREATE INDEX res_partner__ref_index ON res_partner (ref)",
    "CREATE INDEX res_partner__vat_index ON res_partner (vat)",
    "CREATE INDEX res_partner__company_id_index ON res_partner (company_id)",
    "CREATE INDEX res_partner__commercial_partner_id_index ON res_partner (commercial_partner_id)",
    "CREATE INDEX res_partner__country_id_index ON res_partner (country_id) WHERE country_id IS NOT NULL",
    "CREATE INDEX res_partner__state_id_index ON res_partner (state_id) WHERE state_id IS NOT NULL",
    "CREATE INDEX res_partner_write_date_id_index ON res_partner (write_date, id)",  # ADDED
)

# A few more countries than the people live in, as a real res_country has ~250.
COUNTRIES = {**COUNTRY_NAMES, "US": "United States", "ES": "Spain", "NL": "Netherlands"}


class Odoo(CrmFixture):
    name = "odoo"
    dialect = "postgresql"
    DDL = DDL

    def _fill(self, conn: sa.Connection) -> None:
        country_ids = {}
        for n, (code, name) in enumerate(sorted(COUNTRIES.items()), start=1):
            conn.execute(
                sa.text("INSERT INTO res_country (id, name, code) VALUES (:id, CAST(:name AS jsonb), :code)"),
                {"id": n, "name": f'{{"en_US": "{name}"}}', "code": code},
            )
            country_ids[code] = n
        conn.execute(sa.text("SELECT setval('res_country_id_seq', :n)"), {"n": len(COUNTRIES)})
        stamps = past_stamps(len(self.people))
        # Companies first (the accounts), each with a valid mobile: if a sync let companies
        # through, these numbers would show up in the datastore.
        phones = PhoneBook(random.Random(17))
        companies: dict[str, int] = {}
        self.never_sent: set[str] = set()  # msisdns of rows that are not contacts
        for person in self.people:
            if person.account and person.account not in companies:
                number = phones.number(person.country or "DE")
                self.never_sent.add(e164(number))
                companies[person.account] = conn.execute(
                    sa.text(
                        "INSERT INTO res_partner (name, complete_name, type, is_company, active, mobile, country_id, "
                        "create_date, write_date) VALUES (:name, :name, 'contact', true, true, :mobile, :country, :at, :at) "
                        "RETURNING id"
                    ),
                    {
                        "name": person.account,
                        "mobile": phones.written(number, "international"),
                        "country": country_ids[person.country or "DE"],
                        "at": stamps[0],
                    },
                ).scalar_one()
        for person, at in zip(self.people, stamps, strict=True):
            parent = companies.get(person.account or "")
            pid = conn.execute(
                sa.text(
                    "INSERT INTO res_partner (name, complete_name, parent_id, type, is_company, active, email, phone, "
                    "mobile, country_id, commercial_company_name, create_date, write_date) VALUES (:name, :complete, "
                    ":parent, 'contact', false, :active, :email, :phone, :mobile, :country, :company, :at, :at) RETURNING id"
                ),
                {
                    "name": person.full_name,
                    "complete": f"{person.account}, {person.full_name}" if parent else person.full_name,
                    "parent": parent,
                    "active": not person.deleted,
                    "email": person.primary_email.stored if person.primary_email else None,
                    "phone": person.landline,
                    "mobile": person.mobile,
                    "country": country_ids[person.country] if person.country else None,
                    "company": person.account if parent else None,
                    "at": at,
                },
            ).scalar_one()
            self.keys[person.index] = pid
            if parent and person.index % 5 == 0:
                # An invoice address of the company: a res_partner row that is not a person.
                number = phones.number(person.country or "DE")
                self.never_sent.add(e164(number))
                conn.execute(
                    sa.text(
                        "INSERT INTO res_partner (name, parent_id, type, is_company, active, mobile, country_id, "
                        "create_date, write_date) VALUES (NULL, :parent, 'invoice', false, true, :mobile, :country, :at, :at)"
                    ),
                    {"parent": parent, "mobile": phones.written(number, "national"), "country": country_ids[person.country or "DE"], "at": at},
                )
        self.company_ids = companies

    def expected(self, person: Person) -> dict[str, str] | None:
        """Odoo keeps one `name`: a person without a first name has a one-word name, which a
        name split may call a first or a last name; only the rest is certain (`uncertain`)."""
        record = person.expected()
        if record is not None and not person.first:
            record.pop("lastname", None)
        return record

    def uncertain(self, person: Person) -> set[str]:
        return {"firstname", "lastname"} if not person.first else set()

    def write(self, person: Person, *, at: datetime | None = None, conn: sa.Connection | None = None, **values: object) -> None:
        """`partner.write(values)`: the columns and `write_date`."""
        assignments = "".join(f"{column} = :{column}, " for column in values)
        sql = f"UPDATE res_partner SET {assignments}write_date = :at WHERE id = :id"
        params = {**values, "at": stamp(at), "id": self.key(person)}
        if conn is not None:
            conn.execute(sa.text(sql), params)
        else:
            self.execute(sql, **params)

    def soft_delete(self, person: Person, *, at: datetime | None = None) -> None:
        """`partner.action_archive()`: `active = false`; the row stays."""
        self.write(person, at=at, active=False)

    def make_company(self, person: Person, *, at: datetime | None = None) -> None:
        """The person is turned into a company (the 'Company' radio button)."""
        self.write(person, at=at, is_company=True)

