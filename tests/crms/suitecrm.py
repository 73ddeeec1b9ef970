"""SuiteCRM 7 on MariaDB: contacts, their e-mail addresses and accounts.

Tables, columns, types and indexes follow salesagility/SuiteCRM (7.x branch):
- `contacts`: modules/Contacts/vardefs.php (indices, account/e-mail links) with the fields of
  include/SugarObjects/templates/person/vardefs.php (first_name/last_name varchar(100),
  phone_* varchar(100), primary_address_* ...) and the `basic` template (id, date_entered,
  date_modified, deleted, ...). Only the contact-relevant columns are rebuilt.
- `email_addresses` and `email_addr_bean_rel`: metadata/email_addressesMetaData.php (the
  relation table is declared there; modules/EmailAddresses/vardefs.php includes that file).
- `accounts_contacts`: metadata/accounts_contactsMetaData.php.
- `accounts`: modules/Accounts/vardefs.php (+ the company template).
SugarCRM's `id` type is CHAR(36) holding a uuid, `bool` is TINYINT(1), `datetime` is a naive
DATETIME that SuiteCRM always writes in UTC (TimeDate::nowDb()). `email_address` is declared
with `'length' => 100`, a key the schema builder ignores, so the column is the default
varchar(255).

Indexes: those the vardefs declare, under their names. The `*_date_modified_*` indexes marked
ADDED are not SuiteCRM's: they are what a change feed on `date_modified` needs (an operator
adds them, or lives with a scan per poll).

Writes follow what SuiteCRM does: a contact's e-mail addresses live in `email_addresses`,
linked through `email_addr_bean_rel` (`bean_module = 'Contacts'`, one `primary_address`);
SugarEmailAddress::saveEmail edits those rows (and their `date_modified`) without touching
the contact's own `date_modified` when only an address changes; deleting sets `deleted = 1`
and bumps `date_modified`.
"""

from __future__ import annotations

import uuid
from datetime import datetime

import sqlalchemy as sa

from .common import CrmFixture, stamp
from .people import Person, past_stamps

NAMESPACE = uuid.UUID("0c5e3f0e-5b1d-4f3c-9a77-6f1d2b3c4d5e")

DDL = (
    """CREATE TABLE contacts (
        id CHAR(36) NOT NULL,
        date_entered DATETIME NULL,
        date_modified DATETIME NULL,
        modified_user_id CHAR(36) NULL,
        created_by CHAR(36) NULL,
        description TEXT NULL,
        deleted TINYINT(1) NULL DEFAULT 0,
        assigned_user_id CHAR(36) NULL,
        salutation VARCHAR(255) NULL,
        first_name VARCHAR(100) NULL,
        last_name VARCHAR(100) NULL,
        title VARCHAR(100) NULL,
        department VARCHAR(255) NULL,
        do_not_call TINYINT(1) NULL DEFAULT 0,
        phone_home VARCHAR(100) NULL,
        phone_mobile VARCHAR(100) NULL,
        phone_work VARCHAR(100) NULL,
        phone_other VARCHAR(100) NULL,
        phone_fax VARCHAR(100) NULL,
        primary_address_street VARCHAR(150) NULL,
        primary_address_city VARCHAR(100) NULL,
        primary_address_state VARCHAR(100) NULL,
        primary_address_postalcode VARCHAR(20) NULL,
        primary_address_country VARCHAR(255) NULL,
        lead_source VARCHAR(255) NULL,
        reports_to_id CHAR(36) NULL,
        birthdate DATE NULL,
        campaign_id CHAR(36) NULL,
        PRIMARY KEY (id),
        KEY idx_cont_last_first (last_name, first_name, deleted),
        KEY idx_contacts_del_last (deleted, last_name),
        KEY idx_cont_del_reports (deleted, reports_to_id, last_name),
        KEY idx_reports_to_id (reports_to_id),
        KEY idx_del_id_user (deleted, id, assigned_user_id),
        KEY idx_cont_assigned (assigned_user_id),
        KEY idx_contacts_date_modified_id (date_modified, id) -- ADDED for the model's watermark
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
    """CREATE TABLE email_addresses (
        id CHAR(36) NOT NULL,
        email_address VARCHAR(255) NULL,
        email_address_caps VARCHAR(255) NULL,
        invalid_email TINYINT(1) NULL DEFAULT 0,
        opt_out TINYINT(1) NULL DEFAULT 0,
        date_created DATETIME NULL,
        date_modified DATETIME NULL,
        deleted TINYINT(1) NULL DEFAULT 0,
        PRIMARY KEY (id),
        KEY idx_ea_caps_opt_out_invalid (email_address_caps, opt_out, invalid_email),
        KEY idx_ea_opt_out_invalid (email_address, opt_out, invalid_email),
        KEY idx_ea_date_modified_id (date_modified, id) -- ADDED for a change feed
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
    """CREATE TABLE email_addr_bean_rel (
        id CHAR(36) NOT NULL,
        email_address_id CHAR(36) NOT NULL,
        bean_id CHAR(36) NOT NULL,
        bean_module VARCHAR(100) NOT NULL,
        primary_address TINYINT(1) NULL DEFAULT 0,
        reply_to_address TINYINT(1) NULL DEFAULT 0,
        date_created DATETIME NULL,
        date_modified DATETIME NULL,
        deleted TINYINT(1) NULL DEFAULT 0,
        PRIMARY KEY (id),
        KEY idx_email_address_id (email_address_id),
        KEY idx_bean_id (bean_id, bean_module),
        KEY idx_eabr_date_modified_bean (date_modified, bean_id) -- ADDED for a change feed
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
    """CREATE TABLE accounts (
        id CHAR(36) NOT NULL,
        name VARCHAR(150) NULL,
        date_entered DATETIME NULL,
        date_modified DATETIME NULL,
        deleted TINYINT(1) NULL DEFAULT 0,
        assigned_user_id CHAR(36) NULL,
        account_type VARCHAR(50) NULL,
        industry VARCHAR(50) NULL,
        billing_address_country VARCHAR(255) NULL,
        phone_office VARCHAR(100) NULL,
        parent_id CHAR(36) NULL,
        PRIMARY KEY (id),
        KEY idx_accnt_id_del (id, deleted),
        KEY idx_accnt_name_del (name, deleted),
        KEY idx_accnt_assigned_del (deleted, assigned_user_id),
        KEY idx_accnt_parent_id (parent_id)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
    """CREATE TABLE accounts_contacts (
        id VARCHAR(36) NOT NULL,
        contact_id VARCHAR(36) NULL,
        account_id VARCHAR(36) NULL,
        date_modified DATETIME NULL,
        deleted TINYINT(1) NULL DEFAULT 0,
        PRIMARY KEY (id),
        KEY idx_account_contact (account_id, contact_id),
        KEY idx_contid_del_accid (contact_id, deleted, account_id),
        KEY idx_ac_date_modified_contact (date_modified, contact_id) -- ADDED for a change feed
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
)


def uid(kind: str, n: object) -> str:
    """A stable uuid, as SuiteCRM's create_guid() makes them (CHAR(36))."""
    return str(uuid.uuid5(NAMESPACE, f"{kind}-{n}"))


class SuiteCrm(CrmFixture):
    name = "suitecrm"
    dialect = "mysql"
    DDL = DDL

    def _fill(self, conn: sa.Connection) -> None:
        stamps = past_stamps(len(self.people))
        accounts: dict[str, str] = {}
        contacts, addresses, relations, links = [], [], [], []
        for person, at in zip(self.people, stamps, strict=True):
            cid = uid("contact", person.index)
            self.keys[person.index] = cid
            contacts.append(
                {
                    "id": cid,
                    "date_entered": at,
                    "date_modified": at,
                    "deleted": int(person.deleted),
                    "first_name": person.first or None,  # no first name: NULL here (EspoCRM keeps '')
                    "last_name": person.last,
                    "phone_mobile": person.mobile,
                    "phone_work": person.landline,
                    "primary_address_country": person.country_name,
                }
            )
            for n, email in enumerate(person.emails):
                eid = uid("email", f"{person.index}-{n}")
                addresses.append(
                    {
                        "id": eid,
                        "email_address": email.stored,
                        "email_address_caps": email.stored.upper(),
                        "date_created": at,
                        "date_modified": at,
                    }
                )
                relations.append(
                    {
                        "id": uid("rel", f"{person.index}-{n}"),
                        "email_address_id": eid,
                        "bean_id": cid,
                        "bean_module": "Contacts",
                        "primary_address": int(n == 0),
                        "date_created": at,
                        "date_modified": at,
                    }
                )
            if person.account:
                account_id = accounts.setdefault(person.account, uid("account", person.account))
                links.append({"id": uid("ac", person.index), "contact_id": cid, "account_id": account_id, "date_modified": at})
        at = stamps[0]
        conn.execute(
            sa.text("INSERT INTO accounts (id, name, date_entered, date_modified, deleted) VALUES (:id, :name, :at, :at, 0)"),
            [{"id": aid, "name": name, "at": at} for name, aid in accounts.items()],
        )
        conn.execute(
            sa.text(
                "INSERT INTO contacts (id, date_entered, date_modified, deleted, first_name, last_name, phone_mobile, "
                "phone_work, primary_address_country) VALUES (:id, :date_entered, :date_modified, :deleted, :first_name, "
                ":last_name, :phone_mobile, :phone_work, :primary_address_country)"
            ),
            contacts,
        )
        conn.execute(
            sa.text(
                "INSERT INTO email_addresses (id, email_address, email_address_caps, invalid_email, opt_out, date_created, "
                "date_modified, deleted) VALUES (:id, :email_address, :email_address_caps, 0, 0, :date_created, :date_modified, 0)"
            ),
            addresses,
        )
        conn.execute(
            sa.text(
                "INSERT INTO email_addr_bean_rel (id, email_address_id, bean_id, bean_module, primary_address, reply_to_address, "
                "date_created, date_modified, deleted) VALUES (:id, :email_address_id, :bean_id, :bean_module, :primary_address, "
                "0, :date_created, :date_modified, 0)"
            ),
            relations,
        )
        conn.execute(
            sa.text(
                "INSERT INTO accounts_contacts (id, contact_id, account_id, date_modified, deleted) "
                "VALUES (:id, :contact_id, :account_id, :date_modified, 0)"
            ),
            links,
        )

    def expected(self, person: Person) -> dict[str, str] | None:
        """The README's SuiteCRM config also sends the account's name as `company`."""
        record = person.expected()
        if record is not None and person.account:
            record["company"] = person.account
        return record

    # -- the CRM's own ways of changing a contact

    def update_contact(self, person: Person, *, at: datetime | None = None, conn: sa.Connection | None = None, **values: object) -> None:
        """Saving the contact bean: its columns and `date_modified`."""
        assignments = ", ".join(f"{column} = :{column}" for column in values)
        sql = f"UPDATE contacts SET {assignments}{', ' if values else ''}date_modified = :at WHERE id = :id"
        params = {**values, "at": stamp(at), "id": self.key(person)}
        if conn is not None:
            conn.execute(sa.text(sql), params)
        else:
            self.execute(sql, **params)

    def edit_email_in_place(self, person: Person, new_address: str, *, at: datetime | None = None) -> None:
        """The primary address row edited (a typo fixed through the EmailAddresses module):
        `email_addresses.date_modified` moves, the contact row does not."""
        self.execute(
            "UPDATE email_addresses ea JOIN email_addr_bean_rel r ON r.email_address_id = ea.id "
            "SET ea.email_address = :address, ea.email_address_caps = UPPER(:address), ea.date_modified = :at "
            "WHERE r.bean_id = :id AND r.bean_module = 'Contacts' AND r.primary_address = 1 AND r.deleted = 0",
            address=new_address,
            at=stamp(at),
            id=self.key(person),
        )

    def replace_primary_email(self, person: Person, new_address: str, *, at: datetime | None = None) -> None:
        """SugarEmailAddress::saveEmail for a new primary address: a new `email_addresses` row,
        the old relation marked deleted, a new primary relation; the contact row untouched."""
        when, cid = stamp(at), self.key(person)
        eid = str(uuid.uuid4())
        with self.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO email_addresses (id, email_address, email_address_caps, invalid_email, opt_out, "
                    "date_created, date_modified, deleted) VALUES (:id, :a, UPPER(:a), 0, 0, :at, :at, 0)"
                ),
                {"id": eid, "a": new_address, "at": when},
            )
            conn.execute(
                sa.text(
                    "UPDATE email_addr_bean_rel SET deleted = 1, date_modified = :at "
                    "WHERE bean_id = :id AND bean_module = 'Contacts' AND primary_address = 1 AND deleted = 0"
                ),
                {"id": cid, "at": when},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO email_addr_bean_rel (id, email_address_id, bean_id, bean_module, primary_address, "
                    "reply_to_address, date_created, date_modified, deleted) VALUES (:rid, :eid, :id, 'Contacts', 1, 0, :at, :at, 0)"
                ),
                {"rid": str(uuid.uuid4()), "eid": eid, "id": cid, "at": when},
            )

    def add_second_primary(self, person: Person, address: str, *, at: datetime | None = None) -> None:
        """A second relation row flagged primary: what imports and merges leave behind in real
        SuiteCRM databases, and what makes a plain LEFT JOIN model hold the contact twice."""
        when = stamp(at)
        eid = str(uuid.uuid4())
        self.execute(
            "INSERT INTO email_addresses (id, email_address, email_address_caps, invalid_email, opt_out, date_created, "
            "date_modified, deleted) VALUES (:id, :a, UPPER(:a), 0, 0, :at, :at, 0)",
            id=eid,
            a=address,
            at=when,
        )
        self.execute(
            "INSERT INTO email_addr_bean_rel (id, email_address_id, bean_id, bean_module, primary_address, reply_to_address, "
            "date_created, date_modified, deleted) VALUES (:rid, :eid, :id, 'Contacts', 1, 0, :at, :at, 0)",
            rid=str(uuid.uuid4()),
            eid=eid,
            id=self.key(person),
            at=when,
        )

    def soft_delete(self, person: Person, *, at: datetime | None = None) -> None:
        """SugarBean::mark_deleted: `deleted = 1` and a new `date_modified`; the row stays."""
        self.update_contact(person, at=at, deleted=1)
