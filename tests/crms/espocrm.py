"""EspoCRM on MariaDB: `contact`, with e-mail addresses and phone numbers in relation tables.

Columns follow espocrm/espocrm:
- `contact`: application/Espo/Modules/Crm/Resources/metadata/entityDefs/Contact.json
  (firstName/lastName varchar(100) with default "", salutationName, address* fields,
  createdAt/modifiedAt datetime, account/assignedUser links), stored by Espo's ORM in
  snake_case with `id` varchar(17) and `deleted` tinyint(1).
- `email_address`: application/Espo/Resources/metadata/entityDefs/EmailAddress.json
  (name, lower (indexed), invalid, optOut).
- `phone_number`: application/Espo/Resources/metadata/entityDefs/PhoneNumber.json
  (name varchar(36) indexed, type, numeric).
- `entity_email_address` / `entity_phone_number`: the many-to-many relations that
  application/Espo/Core/Utils/Database/Orm/FieldConverters/Email.php (and Phone.php) declare
  for every `email`/`phone` field: mid keys entityId + emailAddressId (phoneNumberId), extra
  columns entityType varchar(100) and `primary` bool; Espo's relation tables have an
  auto-increment `id`, `deleted`, an index per mid key and a unique key over the mid keys
  and the condition column. They have no timestamps: EspoCRM saves a changed address as
  part of saving the contact, which stamps `contact.modified_at`.
Datetimes are naive DATETIME in UTC (Espo's DateTime::getSystemNowString()).

Indexes: the link and field indexes Espo creates (IDX_ACCOUNT_ID, IDX_ASSIGNED_USER_ID, ...,
IDX_FIRST_NAME, IDX_NAME, IDX_CREATED_AT); IDX_MODIFIED_AT_ID is ADDED for the model's
watermark.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

import sqlalchemy as sa

from .common import CrmFixture, stamp
from .people import Person, past_stamps

DDL = (
    """CREATE TABLE contact (
        id VARCHAR(17) NOT NULL,
        name VARCHAR(255) NULL,
        deleted TINYINT(1) NULL DEFAULT 0,
        salutation_name VARCHAR(255) NULL,
        first_name VARCHAR(100) NULL DEFAULT '',
        last_name VARCHAR(100) NULL DEFAULT '',
        description MEDIUMTEXT NULL,
        do_not_call TINYINT(1) NOT NULL DEFAULT 0,
        address_street VARCHAR(255) NULL,
        address_city VARCHAR(255) NULL,
        address_state VARCHAR(255) NULL,
        address_country VARCHAR(255) NULL,
        address_postal_code VARCHAR(255) NULL,
        created_at DATETIME NULL,
        modified_at DATETIME NULL,
        account_id VARCHAR(17) NULL,
        created_by_id VARCHAR(17) NULL,
        modified_by_id VARCHAR(17) NULL,
        assigned_user_id VARCHAR(17) NULL,
        PRIMARY KEY (id),
        KEY IDX_FIRST_NAME (first_name, deleted),
        KEY IDX_NAME (first_name, last_name),
        KEY IDX_ASSIGNED_USER (assigned_user_id, deleted),
        KEY IDX_CREATED_AT (created_at),
        KEY IDX_ACCOUNT_ID (account_id),
        KEY IDX_CREATED_BY_ID (created_by_id),
        KEY IDX_MODIFIED_BY_ID (modified_by_id),
        KEY IDX_ASSIGNED_USER_ID (assigned_user_id),
        KEY IDX_MODIFIED_AT_ID (modified_at, id) -- ADDED for the model's watermark
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
    """CREATE TABLE email_address (
        id VARCHAR(17) NOT NULL,
        name VARCHAR(255) NULL,
        deleted TINYINT(1) NULL DEFAULT 0,
        `lower` VARCHAR(255) NULL,
        invalid TINYINT(1) NOT NULL DEFAULT 0,
        opt_out TINYINT(1) NOT NULL DEFAULT 0,
        PRIMARY KEY (id),
        KEY IDX_LOWER (`lower`)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
    """CREATE TABLE entity_email_address (
        id INT NOT NULL AUTO_INCREMENT,
        entity_id VARCHAR(17) NULL,
        email_address_id VARCHAR(17) NULL,
        entity_type VARCHAR(100) NULL,
        `primary` TINYINT(1) NOT NULL DEFAULT 0,
        deleted TINYINT(1) NULL DEFAULT 0,
        PRIMARY KEY (id),
        KEY IDX_ENTITY_ID (entity_id),
        KEY IDX_EMAIL_ADDRESS_ID (email_address_id),
        UNIQUE KEY UNIQ_ENTITY_ID_EMAIL_ADDRESS_ID_ENTITY_TYPE (entity_id, email_address_id, entity_type)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
    """CREATE TABLE phone_number (
        id VARCHAR(17) NOT NULL,
        name VARCHAR(36) NULL,
        deleted TINYINT(1) NULL DEFAULT 0,
        type VARCHAR(255) NULL,
        `numeric` VARCHAR(36) NULL,
        invalid TINYINT(1) NOT NULL DEFAULT 0,
        opt_out TINYINT(1) NOT NULL DEFAULT 0,
        PRIMARY KEY (id),
        KEY IDX_NAME (name),
        KEY IDX_NUMERIC (`numeric`)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
    """CREATE TABLE entity_phone_number (
        id INT NOT NULL AUTO_INCREMENT,
        entity_id VARCHAR(17) NULL,
        phone_number_id VARCHAR(17) NULL,
        entity_type VARCHAR(100) NULL,
        `primary` TINYINT(1) NOT NULL DEFAULT 0,
        deleted TINYINT(1) NULL DEFAULT 0,
        PRIMARY KEY (id),
        KEY IDX_ENTITY_ID (entity_id),
        KEY IDX_PHONE_NUMBER_ID (phone_number_id),
        UNIQUE KEY UNIQ_ENTITY_ID_PHONE_NUMBER_ID_ENTITY_TYPE (entity_id, phone_number_id, entity_type)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
)


def espo_id(kind: str, n: object) -> str:
    """A 17-character hex id, the shape EspoCRM's id generator produces."""
    return hashlib.sha1(f"{kind}-{n}".encode()).hexdigest()[:17]


class EspoCrm(CrmFixture):
    name = "espocrm"
    dialect = "mysql"
    DDL = DDL

    def _fill(self, conn: sa.Connection) -> None:
        stamps = past_stamps(len(self.people))
        contacts, emails, email_links, phones, phone_links = [], [], [], [], []
        for person, at in zip(self.people, stamps, strict=True):
            cid = espo_id("contact", person.index)
            self.keys[person.index] = cid
            contacts.append(
                {
                    "id": cid,
                    "name": person.full_name,
                    "deleted": int(person.deleted),
                    "first_name": person.first,  # '' when blank: the field's default
                    "last_name": person.last,
                    "address_country": person.country_name,
                    "at": at,
                }
            )
            for n, email in enumerate(person.emails):
                eid = espo_id("email", f"{person.index}-{n}")
                emails.append({"id": eid, "name": email.stored, "lower": email.stored.lower()})
                email_links.append({"entity_id": cid, "email_address_id": eid, "primary": int(n == 0)})
            # The mobile is the primary number (Contact.json's defaultType), the office number a second one.
            for n, (number, kind) in enumerate(((person.mobile, "Mobile"), (person.landline, "Office"))):
                if number is None:
                    continue
                nid = espo_id("phone", f"{person.index}-{n}")
                phones.append({"id": nid, "name": number, "type": kind, "numeric": "".join(c for c in number if c.isdigit())})
                phone_links.append({"entity_id": cid, "phone_number_id": nid, "primary": int(n == 0)})
        conn.execute(
            sa.text(
                "INSERT INTO contact (id, name, deleted, first_name, last_name, address_country, created_at, modified_at) "
                "VALUES (:id, :name, :deleted, :first_name, :last_name, :address_country, :at, :at)"
            ),
            contacts,
        )
        conn.execute(
            sa.text("INSERT INTO email_address (id, name, deleted, `lower`, invalid, opt_out) VALUES (:id, :name, 0, :lower, 0, 0)"),
            emails,
        )
        conn.execute(
            sa.text(
                "INSERT INTO entity_email_address (entity_id, email_address_id, entity_type, `primary`, deleted) "
                "VALUES (:entity_id, :email_address_id, 'Contact', :primary, 0)"
            ),
            email_links,
        )
        conn.execute(
            sa.text(
                "INSERT INTO phone_number (id, name, deleted, type, `numeric`, invalid, opt_out) "
                "VALUES (:id, :name, 0, :type, :numeric, 0, 0)"
            ),
            phones,
        )
        conn.execute(
            sa.text(
                "INSERT INTO entity_phone_number (entity_id, phone_number_id, entity_type, `primary`, deleted) "
                "VALUES (:entity_id, :phone_number_id, 'Contact', :primary, 0)"
            ),
            phone_links,
        )

    def update_contact(self, person: Person, *, at: datetime | None = None, **values: object) -> None:
        """Saving the contact: its columns and `modified_at`."""
        assignments = "".join(f"{column} = :{column}, " for column in values)
        self.execute(f"UPDATE contact SET {assignments}modified_at = :at WHERE id = :id", **values, at=stamp(at), id=self.key(person))

    def change_primary_email(self, person: Person, new_address: str, *, at: datetime | None = None) -> None:
        """Saving the contact with a new primary address: a new `email_address` row, the
        relation moved to it, and the contact's `modified_at` (the relation has no timestamp)."""
        cid, eid = self.key(person), espo_id("email", f"{person.index}-{new_address}")
        with self.engine.begin() as conn:
            conn.execute(
                sa.text("INSERT INTO email_address (id, name, deleted, `lower`, invalid, opt_out) VALUES (:id, :a, 0, LOWER(:a), 0, 0)"),
                {"id": eid, "a": new_address},
            )
            conn.execute(
                sa.text("UPDATE entity_email_address SET deleted = 1 WHERE entity_id = :id AND `primary` = 1 AND deleted = 0"),
                {"id": cid},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO entity_email_address (entity_id, email_address_id, entity_type, `primary`, deleted) "
                    "VALUES (:id, :eid, 'Contact', 1, 0)"
                ),
                {"id": cid, "eid": eid},
            )
            conn.execute(sa.text("UPDATE contact SET modified_at = :at WHERE id = :id"), {"id": cid, "at": stamp(at)})

    def soft_delete(self, person: Person, *, at: datetime | None = None) -> None:
        """Removing the contact: `deleted = 1`, stamped like a save (an EspoCRM that leaves
        `modified_at` alone on removal is seen only by reconcile)."""
        self.update_contact(person, at=at, deleted=1)
