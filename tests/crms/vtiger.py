"""vtiger CRM 7 on MariaDB: a contact is spread over `vtiger_crmentity` (owner, `deleted`,
`modifiedtime`), `vtiger_contactdetails`, `vtiger_contactaddress` and
`vtiger_contactsubdetails`, all keyed by the same integer (crmid = contactid =
contactaddressid = contactsubscriptionid).

Tables, columns and indexes follow vtiger-crm/vtigercrm schema/DatabaseSchema.xml (the AXMLS
schema vtiger installs from; type I = int, C = varchar, T = datetime, X = text, D = date) for
those four tables and `vtiger_account`. vtiger 7 adds `label` (varchar(255), indexed as
`vtiger_crmentity_labelidx`) to `vtiger_crmentity`; it is included. `modifiedtime` is a
naive DATETIME that vtiger writes in the server's default time zone, UTC in a default install.

Index marked ADDED: `(modifiedtime, crmid)` on `vtiger_crmentity`, for the model's
watermark; vtiger declares none on it.

Writes follow CRMEntity::save: every save of a contact updates its `vtiger_crmentity` row
(`modifiedtime`, `modifiedby`), whatever table the changed column lives in; deleting sets
`vtiger_crmentity.deleted = 1` (and a new `modifiedtime`).
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa

from .common import CrmFixture, stamp
from .people import Person, past_stamps

DDL = (
    """CREATE TABLE vtiger_crmentity (
        crmid INT(19) NOT NULL,
        smcreatorid INT(19) NOT NULL DEFAULT 0,
        smownerid INT(19) NOT NULL DEFAULT 0,
        modifiedby INT(19) NOT NULL DEFAULT 0,
        setype VARCHAR(30) NOT NULL,
        description TEXT NULL,
        createdtime DATETIME NOT NULL,
        modifiedtime DATETIME NOT NULL,
        viewedtime DATETIME NULL,
        status VARCHAR(50) NULL,
        version INT(19) NOT NULL DEFAULT 0,
        presence INT(1) NULL DEFAULT 1,
        deleted INT(1) NOT NULL DEFAULT 0,
        label VARCHAR(255) NULL,
        PRIMARY KEY (crmid),
        KEY crmentity_smcreatorid_idx (smcreatorid),
        KEY crmentity_modifiedby_idx (modifiedby),
        KEY crmentity_deleted_idx (deleted),
        KEY crm_ownerid_del_setype_idx (smownerid, deleted, setype),
        KEY vtiger_crmentity_labelidx (label),
        KEY crmentity_modifiedtime_crmid_idx (modifiedtime, crmid) -- ADDED for the model's watermark
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
    """CREATE TABLE vtiger_account (
        accountid INT(19) NOT NULL DEFAULT 0,
        account_no VARCHAR(100) NOT NULL,
        accountname VARCHAR(100) NOT NULL,
        parentid INT(19) NULL DEFAULT 0,
        account_type VARCHAR(200) NULL,
        industry VARCHAR(200) NULL,
        phone VARCHAR(30) NULL,
        email1 VARCHAR(100) NULL,
        PRIMARY KEY (accountid),
        UNIQUE KEY account_no (account_no),
        UNIQUE KEY accountname (accountname),
        KEY account_account_type_idx (account_type),
        CONSTRAINT fk_1_vtiger_account FOREIGN KEY (accountid) REFERENCES vtiger_crmentity (crmid) ON DELETE CASCADE
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
    """CREATE TABLE vtiger_contactdetails (
        contactid INT(19) NOT NULL DEFAULT 0,
        contact_no VARCHAR(100) NOT NULL,
        accountid INT(19) NULL,
        salutation VARCHAR(200) NULL,
        firstname VARCHAR(40) NULL,
        lastname VARCHAR(80) NOT NULL,
        email VARCHAR(100) NULL,
        phone VARCHAR(50) NULL,
        mobile VARCHAR(50) NULL,
        title VARCHAR(50) NULL,
        department VARCHAR(30) NULL,
        fax VARCHAR(50) NULL,
        reportsto VARCHAR(30) NULL,
        training VARCHAR(50) NULL,
        usertype VARCHAR(50) NULL,
        contacttype VARCHAR(50) NULL,
        otheremail VARCHAR(100) NULL,
        secondaryemail VARCHAR(100) NULL,
        donotcall VARCHAR(3) NULL,
        emailoptout VARCHAR(3) NULL DEFAULT '0',
        imagename VARCHAR(150) NULL,
        reference VARCHAR(3) NULL,
        notify_owner VARCHAR(3) NULL DEFAULT '0',
        PRIMARY KEY (contactid),
        UNIQUE KEY contact_no (contact_no),
        KEY contactdetails_accountid_idx (accountid),
        CONSTRAINT fk_1_vtiger_contactdetails FOREIGN KEY (contactid) REFERENCES vtiger_crmentity (crmid) ON DELETE CASCADE
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
    """CREATE TABLE vtiger_contactaddress (
        contactaddressid INT(19) NOT NULL DEFAULT 0,
        mailingcity VARCHAR(40) NULL,
        mailingstreet VARCHAR(250) NULL,
        mailingcountry VARCHAR(40) NULL,
        othercountry VARCHAR(30) NULL,
        mailingstate VARCHAR(30) NULL,
        mailingpobox VARCHAR(30) NULL,
        othercity VARCHAR(40) NULL,
        otherstate VARCHAR(50) NULL,
        mailingzip VARCHAR(30) NULL,
        otherzip VARCHAR(30) NULL,
        otherstreet VARCHAR(250) NULL,
        otherpobox VARCHAR(30) NULL,
        PRIMARY KEY (contactaddressid),
        CONSTRAINT fk_1_vtiger_contactaddress FOREIGN KEY (contactaddressid) REFERENCES vtiger_contactdetails (contactid) ON DELETE CASCADE
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
    """CREATE TABLE vtiger_contactsubdetails (
        contactsubscriptionid INT(19) NOT NULL DEFAULT 0,
        homephone VARCHAR(50) NULL,
        otherphone VARCHAR(50) NULL,
        assistant VARCHAR(30) NULL,
        assistantphone VARCHAR(50) NULL,
        birthday DATE NULL,
        laststayintouchrequest INT(30) NULL DEFAULT 0,
        laststayintouchsavedate INT(19) NULL DEFAULT 0,
        leadsource VARCHAR(200) NULL,
        PRIMARY KEY (contactsubscriptionid),
        CONSTRAINT fk_1_vtiger_contactsubdetails FOREIGN KEY (contactsubscriptionid) REFERENCES vtiger_contactdetails (contactid) ON DELETE CASCADE
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
)

FIRST_CRMID = 1000  # vtiger's crmids come from one sequence (vtiger_crmentity_seq) for all modules


class Vtiger(CrmFixture):
    name = "vtiger"
    dialect = "mysql"
    DDL = DDL

    def _fill(self, conn: sa.Connection) -> None:
        stamps = past_stamps(len(self.people))
        next_id = FIRST_CRMID
        accounts: dict[str, int] = {}
        entities, details, addresses, subdetails, account_rows = [], [], [], [], []
        for person in self.people:
            if person.account and person.account not in accounts:
                accounts[person.account] = next_id
                entities.append(
                    {"crmid": next_id, "setype": "Accounts", "at": stamps[0], "deleted": 0, "label": person.account}
                )
                account_rows.append({"accountid": next_id, "account_no": f"ACC{next_id}", "accountname": person.account})
                next_id += 1
        for person, at in zip(self.people, stamps, strict=True):
            crmid = next_id
            next_id += 1
            self.keys[person.index] = crmid
            entities.append(
                {"crmid": crmid, "setype": "Contacts", "at": at, "deleted": int(person.deleted), "label": person.full_name}
            )
            email = person.primary_email
            details.append(
                {
                    "contactid": crmid,
                    "contact_no": f"CON{crmid}",
                    "accountid": accounts.get(person.account or ""),
                    "firstname": person.first,  # vtiger saves an empty field as ''
                    "lastname": person.last,
                    "email": email.stored if email else None,
                    "secondaryemail": person.emails[1].stored if len(person.emails) > 1 else None,
                    "phone": person.landline,
                    "mobile": person.mobile,
                }
            )
            addresses.append({"contactaddressid": crmid, "mailingcountry": person.country_name or ""})
            subdetails.append({"contactsubscriptionid": crmid})
        conn.execute(
            sa.text(
                "INSERT INTO vtiger_crmentity (crmid, smcreatorid, smownerid, modifiedby, setype, createdtime, modifiedtime, "
                "presence, deleted, label) VALUES (:crmid, 1, 1, 1, :setype, :at, :at, 1, :deleted, :label)"
            ),
            entities,
        )
        conn.execute(
            sa.text("INSERT INTO vtiger_account (accountid, account_no, accountname) VALUES (:accountid, :account_no, :accountname)"),
            account_rows,
        )
        conn.execute(
            sa.text(
                "INSERT INTO vtiger_contactdetails (contactid, contact_no, accountid, firstname, lastname, email, secondaryemail, "
                "phone, mobile) VALUES (:contactid, :contact_no, :accountid, :firstname, :lastname, :email, :secondaryemail, "
                ":phone, :mobile)"
            ),
            details,
        )
        conn.execute(
            sa.text("INSERT INTO vtiger_contactaddress (contactaddressid, mailingcountry) VALUES (:contactaddressid, :mailingcountry)"),
            addresses,
        )
        conn.execute(sa.text("INSERT INTO vtiger_contactsubdetails (contactsubscriptionid) VALUES (:contactsubscriptionid)"), subdetails)

    def save(self, person: Person, table: str, *, at: datetime | None = None, **values: object) -> None:
        """CRMEntity::save: the changed columns of one of the contact's tables, then its
        `vtiger_crmentity` row (`modifiedtime`), in one transaction."""
        key_column = {
            "vtiger_contactdetails": "contactid",
            "vtiger_contactaddress": "contactaddressid",
            "vtiger_contactsubdetails": "contactsubscriptionid",
            "vtiger_crmentity": "crmid",
        }[table]
        crmid = self.key(person)
        with self.engine.begin() as conn:
            if values and table != "vtiger_crmentity":
                assignments = ", ".join(f"{column} = :{column}" for column in values)
                conn.execute(sa.text(f"UPDATE {table} SET {assignments} WHERE {key_column} = :id"), {**values, "id": crmid})
            entity_values = values if table == "vtiger_crmentity" else {}
            assignments = "".join(f"{column} = :{column}, " for column in entity_values)
            conn.execute(
                sa.text(f"UPDATE vtiger_crmentity SET {assignments}modifiedtime = :at, modifiedby = 1 WHERE crmid = :id"),
                {**entity_values, "at": stamp(at), "id": crmid},
            )

    def soft_delete(self, person: Person, *, at: datetime | None = None) -> None:
        """CRMEntity::trash: `vtiger_crmentity.deleted = 1`; the module's rows stay."""
        self.save(person, "vtiger_crmentity", at=at, deleted=1)
