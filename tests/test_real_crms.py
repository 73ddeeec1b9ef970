"""The four real CRMs (SuiteCRM 7, Odoo 17, EspoCRM, vtiger 7) as a new user meets them.

The fixtures (tests/crms/) rebuild each CRM's published contact schema on its own database
and fill it with the same generated people. The first tests check the fixtures themselves
(what is in the tables, by SQL) and that today's syncd can `check` a plain table of each.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from syncd.config_text import render_config

from .crm import TOKEN, stored, syncd, wait_for
from .crms.common import CrmFixture
from .crms.espocrm import EspoCrm
from .crms.fixtures import datastore, espocrm, odoo, real_crm, suitecrm, vtiger  # noqa: F401  (fixtures)
from .crms.odoo import Odoo
from .crms.people import SPECIAL, Person, generate, naive_utc_now
from .crms.suitecrm import SuiteCrm
from .crms.vtiger import Vtiger

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


def test_syncd_checks_a_plain_table_of_each_crm(real_crm: CrmFixture, datastore, tmp_path: Path):
    table, key, watermark, fields = PLAIN[real_crm.name]
    (tmp_path / "api-token").write_text(TOKEN + "\n")
    config = tmp_path / "syncd.toml"
    config.write_text(
        render_config(
            state={"url": f"sqlite:///{tmp_path / 'state.db'}"},
            api={"url": datastore.url, "token_file": str(tmp_path / "api-token")},
            sources={"crm": {"url": real_crm.url}},
            syncs=[
                {
                    "name": "contacts",
                    "source": "crm",
                    "table": table,
                    "key": key,
                    "watermark": watermark,
                    "interval": "30s",
                    "datastore_id": "1466",
                    "feed_id": "1499",
                    "fields": tomllib.loads(fields),
                }
            ],
        )
    )
    result = syncd("check", "-c", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"table {table}:" in result.stdout
    assert "error" not in result.stdout.split()



# -- the worked configs of README.md's "Real CRMs" section

README = Path(__file__).resolve().parent.parent / "README.md"
README_API_URL = "http://127.0.0.1:8080/v1/datastores/contacts"
README_TOKEN_FILE = "/run/credentials/syncd.service/api-token"
README_DB_URL = {
    "suitecrm": "mysql+pymysql://syncd@127.0.0.1/suitecrm",
    "odoo": "postgresql+psycopg://syncd@127.0.0.1/odoo",
    "espocrm": "mysql+pymysql://syncd@127.0.0.1/espocrm",
    "vtiger": "mysql+pymysql://syncd@127.0.0.1/vtiger",
}


def readme_block(name: str) -> str:
    """The ```toml block that follows `<!-- real-crm: NAME -->` in README.md."""
    text = README.read_text()
    marker = f"<!-- real-crm: {name} -->"
    assert text.count(marker) == 1, f"README.md should have one {marker}"
    block = re.match(r"\s*```toml\n(.*?)\n```", text.split(marker, 1)[1], re.S)
    assert block, f"no ```toml block after {marker}"
    return block.group(1)


def readme_config(
    crm: CrmFixture, tmp_path: Path, api_url: str, *, source_url: str | None = None, edits: tuple[tuple[str, str], ...] = ()
) -> Path:
    """The README's config for `crm` as written, with the test's database, endpoint, token
    file and state database swapped in (and `edits`, each replacing text that must exist)."""
    token_file = tmp_path / "api-token"
    token_file.write_text(TOKEN + "\n")
    text = readme_block(crm.name)
    for placeholder, value in (
        (README_API_URL, api_url),
        (README_TOKEN_FILE, str(token_file)),
        (README_DB_URL[crm.name], source_url or crm.url),
        *edits,
    ):
        assert text.count(placeholder) == 1, f"README's {crm.name} config should hold {placeholder!r} once"
        text = text.replace(placeholder, value)
    path = tmp_path / f"{crm.name}.toml"
    path.write_text(f'[state]\nurl = "sqlite:///{tmp_path / "state.db"}"\n\n[log]\nlevel = "warning"\n\n{text}\n')
    return path


def model_sql(crm: CrmFixture, sync: dict) -> str:
    """The model as syncd reads it: the table or the query, wrapped, under the filter."""
    source = f"({sync['query']})" if "query" in sync else sync["table"]
    where = f" WHERE {sync['filter']}" if "filter" in sync else ""
    return f"SELECT * FROM {source} m{where}"


def test_readme_models_are_sql_that_selects_exactly_the_contacts(real_crm: CrmFixture):
    """Today, without syncd: each README model (query + filter) holds one row per live
    contact, with every column the config names, and its change feeds run."""
    config = tomllib.loads(readme_block(real_crm.name))
    (sync,) = config["syncs"]
    with real_crm.engine.connect() as conn:
        result = conn.execute(sa.text(model_sql(real_crm, sync)))
        columns, rows = list(result.keys()), result.all()
    keys = [row[columns.index(sync["key"])] for row in rows]
    assert sorted(keys, key=str) == sorted((real_crm.key(p) for p in real_crm.people if not p.deleted), key=str)
    named = {sync["key"], sync["watermark"]}
    for spec in sync["fields"].values():
        spec = spec if isinstance(spec, dict) else {"column": spec}
        named |= {spec["column"]} | set(re.findall(r"\{(\w+)\}", spec.get("region", "")))
    assert named <= set(columns)
    for feed in sync.get("changes", []):
        with real_crm.engine.connect() as conn:
            found = {row[0] for row in conn.execute(sa.text(f"SELECT f.{feed['key']}, f.{feed['watermark']} FROM ({model_sql(real_crm, feed)}) f"))}
        assert found and found <= {real_crm.key(p) for p in real_crm.people}


# -- the READMEs' configs run by syncd


def once(config: Path) -> subprocess.CompletedProcess[str]:
    return syncd("once", "-c", str(config), "--no-progress")


def status(config: Path) -> dict:
    (sync,) = json.loads(syncd("status", "-c", str(config), "--json").stdout)["syncs"]
    return sync


def dead_letters(config: Path) -> list[dict]:
    result = syncd("dead-letters", "-c", str(config), "list", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["dead_letters"]


def records_pushed(datastore, since: int = 0) -> int:
    """Records in the acknowledged requests from the `since`-th request on."""
    return sum(entry["records"] for entry in datastore.requests()[since:] if entry["status"] == 200)


def arrived(crm: CrmFixture, datastore) -> dict[str, dict]:
    """Wait until every contact the fixture expects is in the datastore; what is there."""
    expected = {p.msisdn for p in crm.people if crm.expected(p)}
    return wait_for(lambda: s if expected <= (s := stored(datastore, "msisdn")).keys() else None, what="the expected contacts")


def assert_record(crm: CrmFixture, person: Person, record: dict) -> None:
    """`record` is what `crm` must send for `person`. The e-mail address is compared without
    case: whether a normalised address keeps the local part's case is the transform's call."""
    expected = crm.expected(person)
    assert expected is not None
    got = {k: record.get(k) for k in expected}
    if "emailid" in expected and got["emailid"] is not None:
        got["emailid"], expected["emailid"] = got["emailid"].lower(), expected["emailid"].lower()
    assert got == expected, person
    assert set(record) - set(expected) <= crm.uncertain(person), person
    assert all(str(value).strip() for value in record.values()), f"a blank attribute was sent: {record}"


def test_readme_config_sends_the_right_contacts(real_crm: CrmFixture, datastore, tmp_path):
    config = readme_config(real_crm, tmp_path, datastore.url)
    result = once(config)
    assert result.returncode == 0, result.stderr

    records = arrived(real_crm, datastore)
    sent = [p for p in real_crm.people if real_crm.expected(p)]
    assert set(records) == {p.msisdn for p in sent}  # nothing else: no deleted, archived, company rows
    for person in sent:
        assert_record(real_crm, person, records[person.msisdn])
    case = {name: real_crm.people[i] for i, name in enumerate(SPECIAL)}
    assert records[case["german_national"].msisdn]["msisdn"].startswith("+49")  # '0170 …' in Germany
    assert records[case["no_country_german"].msisdn]["msisdn"].startswith("+49")  # default_region
    assert "firstname" not in records[case["blank_first_name"].msisdn] or real_crm.name == "odoo"
    for never in getattr(real_crm, "never_sent", set()):  # Odoo's companies and invoice addresses
        assert never not in records

    bad = {str(real_crm.key(p)): p for p in real_crm.people if not p.deleted and p.dead_letter_reason()}
    letters = dead_letters(config)
    assert {letter["key"] for letter in letters} == set(bad)
    for letter in letters:
        if bad[letter["key"]].dead_letter_reason() == "emailid":
            assert "emailid" in letter["reason"], letter
    assert status(config)["dead_letters"] == len(bad)


def test_region_comes_from_the_row_not_the_default(suitecrm, datastore, tmp_path):
    """With a British default region, German national numbers still get +49 from the row's
    country (they are valid-looking UK numbers otherwise)."""
    config = readme_config(suitecrm, tmp_path, datastore.url, edits=(('default_region = "DE"', 'default_region = "GB"'),))
    assert once(config).returncode == 0
    records = arrived_without(suitecrm, datastore, "no_country_german")
    germans = [p for p in suitecrm.people if p.country == "DE" and suitecrm.expected(p)]
    assert len(germans) >= 3
    for person in germans:
        assert records[person.msisdn]["msisdn"].startswith("+49")


def arrived_without(crm: CrmFixture, datastore, case: str) -> dict[str, dict]:
    """Like `arrived`, for a config under which one special case is not expected."""
    skip = crm.people[SPECIAL.index(case)]
    expected = {p.msisdn for p in crm.people if crm.expected(p) and p is not skip}
    return wait_for(lambda: s if expected <= (s := stored(datastore, "msisdn")).keys() else None, what="the expected contacts")


def change_email(crm: CrmFixture, person: Person, address: str) -> None:
    """Each CRM's own way of giving a contact a new primary e-mail address."""
    if isinstance(crm, SuiteCrm):
        crm.edit_email_in_place(person, address)  # email_addresses only: the contact row is untouched
    elif isinstance(crm, Odoo):
        crm.write(person, email=address)
    elif isinstance(crm, EspoCrm):
        crm.change_primary_email(person, address)
    elif isinstance(crm, Vtiger):
        crm.save(person, "vtiger_contactdetails", email=address)


def test_an_edit_in_a_related_table_arrives_in_the_next_once(real_crm: CrmFixture, datastore, tmp_path):
    config = readme_config(real_crm, tmp_path, datastore.url)
    assert once(config).returncode == 0
    arrived(real_crm, datastore)
    sent = [p for p in real_crm.people if real_crm.expected(p)]
    first, second = sent[0], sent[1]
    change_email(real_crm, first, "first.changed@example.com")
    if isinstance(real_crm, SuiteCrm):
        real_crm.replace_primary_email(second, "second.changed@example.com")  # a new relation row
    else:
        change_email(real_crm, second, "second.changed@example.com")
    before = len(datastore.requests())

    assert once(config).returncode == 0
    wait_for(
        lambda: stored(datastore, "msisdn")[first.msisdn].get("emailid") == "first.changed@example.com"
        and stored(datastore, "msisdn")[second.msisdn].get("emailid") == "second.changed@example.com",
        what="the changed addresses",
    )
    assert records_pushed(datastore, since=before) == 2  # exactly those two contacts


def test_a_contact_deleted_after_sending_is_removed_and_unsubscribed(real_crm: CrmFixture, datastore, tmp_path):
    config = readme_config(real_crm, tmp_path, datastore.url)
    assert once(config).returncode == 0
    arrived(real_crm, datastore)
    sent = [p for p in real_crm.people if real_crm.expected(p)]
    leaving = [sent[0]]
    real_crm.soft_delete(sent[0])
    if isinstance(real_crm, Odoo):
        real_crm.make_company(sent[1])  # a person turned into a company leaves the model too
        leaving.append(sent[1])

    assert once(config).returncode == 0
    assert status(config)["removed"] == len(leaving)
    for person in leaving:
        wait_for(lambda p=person: stored(datastore, "msisdn")[p.msisdn].get("status") == "unsubscribed", what="the removed record")
    assert all("status" not in stored(datastore, "msisdn")[p.msisdn] for p in sent[len(leaving) :])


NAIVE_JOIN = """
SELECT c.id, c.first_name, c.last_name, c.phone_mobile, c.primary_address_country,
       ea.email_address, NULL AS account_name, c.deleted, c.date_modified
  FROM contacts c
  LEFT JOIN email_addr_bean_rel r ON r.bean_id = c.id AND r.bean_module = 'Contacts'
       AND r.primary_address = 1 AND r.deleted = 0
  LEFT JOIN email_addresses ea ON ea.id = r.email_address_id
"""


def test_a_model_with_duplicate_keys_is_reported_not_flipped(suitecrm, datastore, tmp_path):
    """A plain LEFT JOIN model, and a contact with two addresses flagged primary (imports
    leave those behind): the key is reported, and the contact is not sent back and forth."""
    person = next(p for p in suitecrm.people if suitecrm.expected(p))
    suitecrm.add_second_primary(person, "other.primary@example.com")
    query = re.search(r'query = """(.*?)"""', readme_block("suitecrm"), re.S).group(1)
    config = readme_config(suitecrm, tmp_path, datastore.url, edits=((query, NAIVE_JOIN),))

    checked = syncd("check", "-c", str(config))
    assert checked.returncode == 1
    assert "suitecrm-contacts" in checked.stdout and "unique" in checked.stdout.lower()

    result = once(config)
    reported = (status(config)["last_error"] or "") + result.stderr
    assert suitecrm.key(person) in reported
    pushed = records_pushed(datastore)
    syncd("reconcile", "-c", str(config))
    syncd("reconcile", "-c", str(config))
    assert records_pushed(datastore) == pushed  # nothing flips back and forth


def test_naive_utc_under_a_berlin_session_with_a_late_commit(odoo, datastore, tmp_path):
    """Odoo writes `write_date` in UTC, the database session is in Europe/Berlin, and a
    transaction commits after a later one while the daemon polls: both changes arrive."""
    url = sa.make_url(odoo.url)
    berlin = url.update_query_dict({"options": f"{url.query['options']} -ctimezone=Europe/Berlin"})
    config = readme_config(
        odoo,
        tmp_path,
        datastore.url,
        source_url=berlin.render_as_string(hide_password=False),
        edits=(('interval = "30s"', 'interval = "100ms"'),),
    )
    with running_daemon(config, tmp_path) as port:
        arrived(odoo, datastore)
        sent = [p for p in odoo.people if odoo.expected(p) and p.first]
        late, early = sent[0], sent[1]
        with odoo.late_transaction() as conn:
            # As the ORM writes: write_date is the transaction's start, in UTC.
            conn.execute(
                sa.text("UPDATE res_partner SET name = 'Late Commit', write_date = (now() AT TIME ZONE 'UTC') WHERE id = :id"),
                {"id": odoo.key(late)},
            )
            odoo.write(early, at=naive_utc_now(precision="microsecond"), name="Early Commit")  # starts later, commits first
            cycles = cycles_run(port)
            wait_for(lambda: cycles_run(port) >= cycles + 2, what="two polls while the late transaction is open")
        wait_for(
            lambda: stored(datastore, "msisdn")[late.msisdn].get("firstname") == "Late"
            and stored(datastore, "msisdn")[early.msisdn].get("firstname") == "Early",
            what="both changes",
        )


@contextmanager
def running_daemon(config: Path, tmp_path: Path) -> Iterator[int]:
    """`syncd run` with its metrics on a free port (yielded); stopped with SIGTERM."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config.write_text(f'[metrics]\nlisten = "127.0.0.1:{port}"\n\n' + config.read_text())
    with (tmp_path / "daemon.log").open("w") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "syncd.cli", "run", "-c", str(config)], stderr=log)
        try:
            yield port
        finally:
            daemon.terminate()
            daemon.wait(30)


def cycles_run(port: int) -> float:
    """Cycles the daemon has finished, from its metrics (0 until it serves them)."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.TransportError:
        return 0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("syncd_cycles_total"))


def test_same_second_updates_at_second_precision_with_no_settle(suitecrm, datastore, tmp_path):
    """MariaDB DATETIME has whole seconds: a row of second S with a lower key, committed after
    a cycle read a row of S, must still arrive (the bound never reaches into S while S lasts)."""
    config = readme_config(
        suitecrm, tmp_path, datastore.url, edits=(('interval = "30s"', 'interval = "50ms"\nsettle = "0s"'),)
    )
    with running_daemon(config, tmp_path) as port:
        arrived(suitecrm, datastore)
        sent = sorted((p for p in suitecrm.people if suitecrm.expected(p)), key=suitecrm.key)
        low, high = sent[0], sent[-1]
        for attempt in range(5):
            wait_for(lambda: suitecrm.scalar("SELECT MICROSECOND(UTC_TIMESTAMP(6))") < 200_000, what="a new second")
            second = suitecrm.scalar("SELECT UTC_TIMESTAMP()")
            suitecrm.update_contact(high, at=second, first_name=f"High{attempt}")
            cycles = cycles_run(port)
            wait_for(lambda c=cycles: cycles_run(port) >= c + 2, what="two polls after the write")
            suitecrm.update_contact(low, at=second, first_name=f"Low{attempt}")
            if suitecrm.scalar("SELECT UTC_TIMESTAMP()") == second:
                break  # both writes landed within the second, with polls in between
        else:
            pytest.skip("could not write twice within one second on this machine")
        wait_for(
            lambda: stored(datastore, "msisdn")[low.msisdn].get("firstname") == f"Low{attempt}"
            and stored(datastore, "msisdn")[high.msisdn].get("firstname") == f"High{attempt}",
            what="both same-second updates",
        )
