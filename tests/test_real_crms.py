"""The four real CRMs (SuiteCRM 7, Odoo 17, EspoCRM, vtiger 7) as a new user meets them.

The fixtures (tests/crms/) rebuild each CRM's published contact schema on its own database
and fill it with the same generated people. The first tests check the fixtures themselves
(what is in the tables, by SQL) and that today's syncd can `check` a plain table of each.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


from .crm import TOKEN
from .crms.common import CrmFixture
from .crms.fixtures import datastore, espocrm, odoo, real_crm, suitecrm, vtiger  # noqa: F401  (fixtures)
from .crms.people import SPECIAL, Person, generate

# What each CRM's contact looks like when its tables are joined by hand: one row per contact
# with (key, first name, last name, soft-deleted?, country as stored, mobile, primary e-mail).
CONTACT_SQL = {
    "suitecrm": """
        SELECT c.id, c.first_name, c.last_name, c.deleted, c.primary_address_country, c.phone_mobile, ea.email_address
        FROM contacts c
        LEFT JOIN email_addr_bean_rel r ON r.bean_id = c.id AND r.bean_module = 'Contacts'
             AND r.primary_address = 1 AND r.deleted = 0
        LEFT JOIN email_addresses ea ON ea.id = r.email_address_id AND ea.deleted = 0""",
    "odoo": """
        SELECT p.id, NULL, p.name, NOT p.active, c.code, p.mobile, p.email
        FROM res_partner p LEFT JOIN res_country c ON c.id = p.country_id
        WHERE NOT p.is_company AND p.type = 'contact'""",
    "espocrm": """
        SELECT c.id, c.first_name, c.last_name, c.deleted, c.address_country, pn.name, ea.name
        FROM contact c
        LEFT JOIN entity_phone_number ep ON ep.entity_id = c.id AND ep.entity_type = 'Contact'
             AND ep.`primary` = 1 AND ep.deleted = 0
        LEFT JOIN phone_number pn ON pn.id = ep.phone_number_id AND pn.deleted = 0
        LEFT JOIN entity_email_address ee ON ee.entity_id = c.id AND ee.entity_type = 'Contact'
             AND ee.`primary` = 1 AND ee.deleted = 0
        LEFT JOIN email_address ea ON ea.id = ee.email_address_id AND ea.deleted = 0""",
    "vtiger": """
        SELECT cd.contactid, cd.firstname, cd.lastname, ce.deleted, ca.mailingcountry, cd.mobile, cd.email
        FROM vtiger_contactdetails cd
        JOIN vtiger_crmentity ce ON ce.crmid = cd.contactid AND ce.setype = 'Contacts'
        JOIN vtiger_contactaddress ca ON ca.contactaddressid = cd.contactid
        JOIN vtiger_contactsubdetails cs ON cs.contactsubscriptionid = cd.contactid""",
}


def test_each_crm_holds_the_generated_people_in_its_own_tables(real_crm: CrmFixture):
    rows = {row[0]: row[1:] for row in real_crm.rows(CONTACT_SQL[real_crm.name])}
    assert len(rows) == len(real_crm.people)  # one row per contact: no duplicate from the joins
    for person in real_crm.people:
        first, last, deleted, country, mobile, email = rows[real_crm.key(person)]
        if real_crm.name == "odoo":  # one name column
            assert (first, last) == (None, person.full_name)
            assert country == person.country  # res_country.code
        else:
            assert (first or "", last) == (person.first, person.last)
            assert (country or None) == person.country_name
        assert bool(deleted) == person.deleted
        assert mobile == person.mobile
        assert email == person.primary_email.stored


def test_the_generated_people_cover_every_case_the_configs_must_handle():
    people = generate()
    case = {name: people[i] for i, name in enumerate(SPECIAL)}
    assert case["german_national"].mobile.startswith("017") and case["german_national"].msisdn.startswith("+49")
    assert case["no_country_german"].country is None and case["no_country_german"].mobile.startswith("01")
    assert case["extension"].mobile.endswith(" ext. 12") and case["extension"].expected() is None
    assert case["blank_first_name"].first == "" and "firstname" not in case["blank_first_name"].expected()
    assert case["display_name_email"].dead_letter_reason() == "emailid"
    assert case["email_list"].dead_letter_reason() == "emailid"
    assert case["upper_case_email"].expected()["emailid"] == case["upper_case_email"].primary_email.stored.lower()
    assert case["soft_deleted"].deleted and case["soft_deleted"].expected() is None
    msisdns = [p.msisdn for p in people if p.msisdn]
    assert len(msisdns) == len(set(msisdns))  # the datastore keys by msisdn
    assert generate() == people  # seeded: the same people every run


def test_suitecrm_keeps_addresses_in_relation_rows_with_one_primary(suitecrm):
    people = suitecrm.people
    assert suitecrm.scalar("SELECT COUNT(*) FROM email_addresses") == sum(len(p.emails) for p in people)
    per_contact = suitecrm.rows(
        "SELECT bean_id, SUM(primary_address), COUNT(*) FROM email_addr_bean_rel "
        "WHERE bean_module = 'Contacts' AND deleted = 0 GROUP BY bean_id"
    )
    assert {bean: (int(primary), n) for bean, primary, n in per_contact} == {
        suitecrm.key(p): (1, len(p.emails)) for p in people
    }
    assert suitecrm.scalar("SELECT COUNT(*) FROM accounts_contacts WHERE deleted = 0") == sum(1 for p in people if p.account)
    assert suitecrm.scalar("SELECT LENGTH(id) FROM contacts LIMIT 1") == 36


def test_suitecrm_writes_move_the_related_rows_not_the_contact(suitecrm):
    person = suitecrm.people[0]
    before = suitecrm.scalar("SELECT date_modified FROM contacts WHERE id = :id", id=suitecrm.key(person))
    suitecrm.edit_email_in_place(person, "fixed@example.com")
    suitecrm.replace_primary_email(suitecrm.people[1], "new@example.com")
    assert suitecrm.scalar("SELECT date_modified FROM contacts WHERE id = :id", id=suitecrm.key(person)) == before
    changed = suitecrm.rows(
        "SELECT ea.email_address, ea.date_modified > :before FROM email_addresses ea "
        "JOIN email_addr_bean_rel r ON r.email_address_id = ea.id AND r.deleted = 0 AND r.primary_address = 1 "
        "WHERE r.bean_id IN (:a, :b) ORDER BY ea.email_address",
        before=before,
        a=suitecrm.key(person),
        b=suitecrm.key(suitecrm.people[1]),
    )
    assert [(address, bool(newer)) for address, newer in changed] == [("fixed@example.com", True), ("new@example.com", True)]
    suitecrm.add_second_primary(person, "second@example.com")
    assert suitecrm.scalar(
        "SELECT COUNT(*) FROM email_addr_bean_rel WHERE bean_id = :id AND primary_address = 1 AND deleted = 0",
        id=suitecrm.key(person),
    ) == 2


def test_odoo_mixes_persons_companies_and_addresses_in_res_partner(odoo):
    people = odoo.people
    assert odoo.scalar("SELECT COUNT(*) FROM res_partner WHERE is_company") == len({p.account for p in people if p.account})
    assert odoo.scalar("SELECT COUNT(*) FROM res_partner WHERE type = 'invoice'") > 0
    assert odoo.scalar("SELECT COUNT(*) FROM res_partner WHERE NOT active") == sum(p.deleted for p in people)
    assert odoo.scalar("SELECT pg_typeof(write_date)::text FROM res_partner LIMIT 1") == "timestamp without time zone"
    person = people[0]
    odoo.make_company(person)
    odoo.soft_delete(people[1])
    assert odoo.rows("SELECT is_company FROM res_partner WHERE id = :id", id=odoo.key(person))[0][0] is True
    assert odoo.rows("SELECT active FROM res_partner WHERE id = :id", id=odoo.key(people[1]))[0][0] is False


def test_espocrm_keeps_blank_names_and_relations_without_timestamps(espocrm):
    blank = espocrm.people[SPECIAL.index("blank_first_name")]
    assert espocrm.scalar("SELECT first_name FROM contact WHERE id = :id", id=espocrm.key(blank)) == ""
    assert espocrm.scalar("SELECT LENGTH(id) FROM contact LIMIT 1") == 17
    columns = {row[0] for row in espocrm.rows("SHOW COLUMNS FROM entity_email_address")}
    assert columns == {"id", "entity_id", "email_address_id", "entity_type", "primary", "deleted"}
    person = espocrm.people[0]
    espocrm.change_primary_email(person, "moved@example.com")
    assert espocrm.rows(
        "SELECT ea.name FROM entity_email_address ee JOIN email_address ea ON ea.id = ee.email_address_id "
        "WHERE ee.entity_id = :id AND ee.`primary` = 1 AND ee.deleted = 0",
        id=espocrm.key(person),
    ) == [("moved@example.com",)]


def test_vtiger_spreads_a_contact_over_four_tables_with_one_crmid(vtiger):
    assert vtiger.scalar("SELECT COUNT(*) FROM vtiger_crmentity WHERE setype = 'Contacts'") == len(vtiger.people)
    assert vtiger.scalar("SELECT COUNT(*) FROM vtiger_crmentity WHERE setype = 'Accounts'") == len(
        {p.account for p in vtiger.people if p.account}
    )
    person = vtiger.people[0]
    before = vtiger.scalar("SELECT modifiedtime FROM vtiger_crmentity WHERE crmid = :id", id=vtiger.key(person))
    vtiger.save(person, "vtiger_contactaddress", at=before.replace(year=before.year + 1), mailingcountry="Austria")
    assert vtiger.rows(
        "SELECT ca.mailingcountry, ce.modifiedtime > :before FROM vtiger_contactaddress ca "
        "JOIN vtiger_crmentity ce ON ce.crmid = ca.contactaddressid WHERE ca.contactaddressid = :id",
        id=vtiger.key(person),
        before=before,
    ) == [("Austria", 1)]


# -- today's syncd against the plain tables

PLAIN = {
    "suitecrm": ("contacts", "id", "date_modified", 'msisdn = { column = "phone_mobile", transform = "e164" }\nfirstname = "first_name"'),
    "odoo": ("res_partner", "id", "write_date", 'msisdn = { column = "mobile", transform = "e164" }\nlastname = "name"'),
    "espocrm": ("contact", "id", "modified_at", 'firstname = "first_name"\nlastname = "last_name"'),
    "vtiger": ("vtiger_crmentity", "crmid", "modifiedtime", 'lastname = "label"'),
}


def syncd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "syncd.cli", *args], capture_output=True, text=True, timeout=180)


def test_syncd_checks_a_plain_table_of_each_crm(real_crm: CrmFixture, tmp_path: Path):
    table, key, watermark, fields = PLAIN[real_crm.name]
    (tmp_path / "api-token").write_text(TOKEN + "\n")
    config = tmp_path / "syncd.toml"
    config.write_text(
        f"""
[state]
url = "sqlite:///{tmp_path / 'state.db'}"

[api]
url = "http://127.0.0.1:9/add-contacts"
token_file = "{tmp_path / 'api-token'}"

[sources.crm]
url = "{real_crm.url}"

[[syncs]]
name = "contacts"
source = "crm"
table = "{table}"
key = "{key}"
watermark = "{watermark}"
interval = "30s"
datastore_id = "1466"
feed_id = "1499"

[syncs.fields]
{fields}
"""
    )
    result = syncd("check", "-c", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"table {table}:" in result.stdout
    assert "error" not in result.stdout.split()

