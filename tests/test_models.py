"""Models: a sync reads a query with joins, a filter, change feeds of related tables, and
records keys that leave the model — on SQLite, PostgreSQL and MariaDB.

The CRM here is shaped like SuiteCRM: contacts with a `deleted` flag, e-mail addresses in
their own table, joined through `email_addr_bean_rel`, each with its own `date_modified`.
"""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from syncd.cli import main
from syncd.simulator import SimulatorConfig
from syncd.state import StateStore

from .crm import TOKEN, Crm, contact, once, pushed_records, stored, wait_for, write_config

# One row per contact: the primary, not deleted, e-mail address (or none).
QUERY = '''query = """
SELECT c.id, c.first_name, c.last_name, c.phone, c.account_id, c.deleted, c.updated_at,
       ea.email_address AS email
FROM contacts c
LEFT JOIN email_addr_bean_rel r ON r.bean_id = c.id AND r.deleted = 0 AND r.primary_address = 1
LEFT JOIN email_addresses ea ON ea.id = r.email_address_id
"""'''

FEEDS = '''
[[syncs.changes]]
table = "email_addr_bean_rel"
key = "bean_id"
watermark = "date_modified"
filter = "bean_module = 'Contacts'"

[[syncs.changes]]
query = "SELECT r.bean_id, ea.date_modified FROM email_addr_bean_rel r JOIN email_addresses ea ON ea.id = r.email_address_id"
key = "bean_id"
watermark = "date_modified"
'''

REMOVED = '''
[syncs.removed]
msisdn = { sent = "msisdn" }
status = { value = "unsubscribed" }
'''


@pytest.fixture
def api_config() -> SimulatorConfig:
    return SimulatorConfig(tokens=(TOKEN,), key_attribute="msisdn")


@pytest.fixture
def suite(source_url):
    crm = Crm(source_url, deleted=True, emails=True)
    yield crm
    crm.dispose()


def phone(i: int) -> str:
    return f"+4420{7946_0000 + i:08d}"


def status_json(config, capsys) -> dict:
    capsys.readouterr()
    main(["status", "-c", str(config), "--json"])
    (row,) = json.loads(capsys.readouterr().out)["syncs"]
    return row


def config_for(crm: Crm, api_url: str, state_url: str, tmp_path, **kwargs):
    return write_config(tmp_path / "syncd.toml", source_url=crm.url, api_url=api_url, state_url=state_url, **kwargs)


NOWHERE = "http://127.0.0.1:9/x"  # for commands that never call the API


def test_a_query_model_joins_related_tables(suite, api, state_url, tmp_path):
    suite.insert([contact(i) for i in range(1, 6)])
    for i in range(1, 5):
        suite.link_email(i, f"Joined{i}@Example.com")
    config = config_for(suite, api.url, state_url, tmp_path, model=QUERY)

    assert once(config) == 0

    api.wait_inserted("1466", 5)
    records = stored(api, "msisdn")
    assert records[phone(2)]["emailid"] == "joined2@example.com"
    assert "emailid" not in records[phone(5)]  # no address: left out, never blanked
    assert pushed_records(api) == 5
    assert once(config) == 0 and pushed_records(api) == 5


def test_editing_only_a_related_table_pushes_exactly_the_touched_contacts(suite, api, state_url, tmp_path):
    suite.insert([contact(i) for i in range(1, 11)])
    for i in range(1, 11):
        suite.link_email(i, f"before{i}@example.com")
    config = config_for(suite, api.url, state_url, tmp_path, model=QUERY, tables=FEEDS)
    assert once(config) == 0
    assert pushed_records(api) == 10  # the feeds' first pass re-reads the contacts: nothing changed

    suite.change_email(4, "after4@example.com")  # email_addresses only
    suite.unlink_email(7)  # email_addr_bean_rel only
    suite.link_email(99, "nobody@example.com")  # names a key the model does not have
    assert once(config) == 0

    assert pushed_records(api) == 12
    api.wait_inserted("1466", 10)
    records = stored(api, "msisdn")
    assert records[phone(4)]["emailid"] == "after4@example.com"
    assert "emailid" not in records[phone(7)]
    assert once(config) == 0 and pushed_records(api) == 12  # the feeds' cursors moved on

    state = StateStore(state_url)
    assert state.feed_cursor("contacts", "email_addr_bean_rel") is not None
    assert state.removals("contacts") == {}  # key 99 was never sent: it did not leave anything


def test_a_feed_cursor_stays_until_its_keys_are_acknowledged(suite, api, state_url, tmp_path):
    suite.insert([contact(i) for i in range(1, 6)])
    for i in range(1, 6):
        suite.link_email(i, f"before{i}@example.com")
    config = config_for(suite, api.url, state_url, tmp_path, model=QUERY, tables=FEEDS, extra_api="max_attempts = 2")
    assert once(config) == 0
    state = StateStore(state_url)
    feed = "email_addr_bean_rel"
    before = state.feed_cursor("contacts", feed)

    suite.unlink_email(3)
    api.queue_faults({"status": 500}, {"status": 500})  # the API is down for this cycle
    assert once(config) == 1
    assert state.feed_cursor("contacts", feed) == before  # nothing acknowledged: the change is kept
    assert pushed_records(api) == 5

    assert once(config) == 0  # the API is back: the change arrives
    assert pushed_records(api) == 6
    api.wait_inserted("1466", 5)
    assert "emailid" not in stored(api, "msisdn")[phone(3)]
    assert state.feed_cursor("contacts", feed) != before


def test_soft_deleted_rows_are_never_sent_and_sent_ones_are_removed(suite, api, state_url, tmp_path, capsys):
    suite.insert([contact(i) for i in range(1, 8)])
    suite.insert([contact(i, deleted=1) for i in range(8, 11)])  # deleted before syncd ever saw them
    config = config_for(suite, api.url, state_url, tmp_path, extra_sync='filter = "deleted = 0"', tables=REMOVED)
    assert once(config) == 0
    api.wait_inserted("1466", 7)
    assert sorted(stored(api, "msisdn")) == sorted(phone(i) for i in range(1, 8))
    assert status_json(config, capsys)["removed"] == 0

    suite.update([2], deleted=1)  # a soft delete bumps the watermark
    assert once(config) == 0
    assert pushed_records(api) == 8
    unsubscribed = {"msisdn": phone(2), "status": "unsubscribed"}
    wait_for(lambda: stored(api, "msisdn").get(phone(2)) == unsubscribed, what="the removal record to land")
    state = StateStore(state_url)
    assert set(state.removals("contacts")) == {"2"}
    assert state.removals("contacts")["2"][1] == "filter"
    assert status_json(config, capsys)["removed"] == 1
    assert once(config) == 0 and pushed_records(api) == 8  # recorded once, pushed once

    suite.update([2], deleted=0)  # restored: sent again, in full
    assert once(config) == 0
    assert pushed_records(api) == 9
    assert state.removals("contacts") == {}
    assert status_json(config, capsys)["removed"] == 0

    with suite.engine.begin() as conn:  # a hard delete: only reconcile can tell
        conn.execute(suite.table.delete().where(suite.table.c.id == 5))
    suite.update([6], bump=False, deleted=1)  # so can it tell a soft delete that left the watermark alone
    capsys.readouterr()
    assert main(["reconcile", "-c", str(config)]) == 0
    assert pushed_records(api) == 11
    assert {key: why for key, (_, why) in state.removals("contacts").items()} == {"5": "not in the model", "6": "filter"}
    assert status_json(config, capsys)["removed"] == 2
    wait_for(lambda: stored(api, "msisdn").get(phone(5), {}).get("status") == "unsubscribed", what="the removal of 5 to land")


def test_removals_without_a_removed_record_are_recorded_only(suite, api, state_url, tmp_path, capsys):
    suite.insert([contact(i) for i in range(1, 5)])
    config = config_for(suite, api.url, state_url, tmp_path, extra_sync='filter = "deleted = 0"')
    assert once(config) == 0
    suite.update([1, 3], deleted=1)
    assert once(config) == 0
    assert pushed_records(api) == 4  # nothing to push without [syncs.removed]
    assert status_json(config, capsys)["removed"] == 2


DUPLICATING = '''query = """
SELECT c.id, c.first_name, c.last_name, c.phone, c.account_id, c.updated_at, ea.email_address AS email
FROM contacts c
LEFT JOIN email_addr_bean_rel r ON r.bean_id = c.id
LEFT JOIN email_addresses ea ON ea.id = r.email_address_id
"""'''


def test_a_duplicate_key_is_reported_and_never_pushed_back_and_forth(suite, api, state_url, tmp_path, capsys):
    suite.insert([contact(i) for i in range(1, 6)])
    for i in range(1, 6):
        suite.link_email(i, f"first{i}@example.com")
    with suite.engine.begin() as conn:  # contact 3 gets a second address: two rows in a plain LEFT JOIN
        conn.execute(suite.addresses.insert().values(id="ea-3b", email_address="second3@example.com", date_modified=suite.stamp()))
        conn.execute(
            suite.relations.insert().values(
                id="rel-3b", email_address_id="ea-3b", bean_id=3, bean_module="Contacts", date_modified=suite.stamp()
            )
        )
    config = config_for(suite, api.url, state_url, tmp_path, model=DUPLICATING)

    assert once(config) == 0
    assert pushed_records(api) == 4
    api.wait_inserted("1466", 4)
    assert phone(3) not in stored(api, "msisdn")
    (letter,) = StateStore(state_url).dead_letters("contacts")
    assert letter.key == "3" and "duplicate key in model" in letter.reason

    capsys.readouterr()
    for _ in range(2):  # reconciles read in key order, with both rows side by side
        assert main(["reconcile", "-c", str(config)]) == 0
        assert "sent 0" in capsys.readouterr().out
    assert pushed_records(api) == 4


def second_address(crm: Crm, contact_id: int) -> None:
    """A second address row and relation for one contact: two rows of its key in DUPLICATING."""
    with crm.engine.begin() as conn:
        address = f"ea-{contact_id}b"
        conn.execute(
            crm.addresses.insert().values(id=address, email_address=f"second{contact_id}@example.com", date_modified=crm.stamp())
        )
        conn.execute(
            crm.relations.insert().values(
                id=f"rel-{contact_id}b", email_address_id=address, bean_id=contact_id, bean_module="Contacts",
                date_modified=crm.stamp(),
            )
        )


def test_a_key_a_change_feed_finds_twice_is_reported_and_not_pushed(suite, api, state_url, tmp_path):
    """The feed's re-read of a key returns all of its rows: two rows, a dead letter, nothing sent."""
    suite.insert([contact(i) for i in range(1, 6)])
    for i in range(1, 6):
        suite.link_email(i, f"first{i}@example.com")
    config = config_for(suite, api.url, state_url, tmp_path, model=DUPLICATING, tables=FEEDS)
    assert once(config) == 0
    assert pushed_records(api) == 5

    second_address(suite, 3)  # only the relation tables change: the feeds find key 3
    suite.change_email(4, "changed4@example.com")
    assert once(config) == 0

    assert pushed_records(api) == 6  # contact 4's new address, not contact 3
    api.wait_inserted("1466", 5)
    assert stored(api, "msisdn")[phone(3)]["emailid"] == "first3@example.com"
    (letter,) = StateStore(state_url).dead_letters("contacts")
    assert letter.key == "3" and "duplicate key in model: 2 rows" in letter.reason


def test_a_key_that_turns_duplicate_while_a_first_backfill_reads_is_reported(
    suite, api, state_url, tmp_path, monkeypatch
):
    """A first backfill finds duplicates in what it reads: a key's rows come together. A
    second row committed after its read began is not in that read; the change feed names
    the key, its rows are read again together, and the same run reports it. Only the row
    read while the key was unique went out, once. (SQLite lets no write in while a read
    runs: there the row lands just before the read, which then finds both.)"""
    suite.insert([contact(i) for i in range(1, 6)])
    for i in range(1, 6):
        suite.link_email(i, f"first{i}@example.com")
    config = config_for(suite, api.url, state_url, tmp_path, model=DUPLICATING, tables=FEEDS)
    sqlite = suite.engine.dialect.name == "sqlite"
    looked: list[str] = []

    def duplicate_once(statement: str, when: str) -> None:
        reads_model = "ORDER BY M.ID LIMIT" in " ".join(statement.upper().split())  # in key order: the backfill
        if reads_model and when == ("before" if sqlite else "after") and not looked:
            looked.append(statement)
            second_address(suite, 3)

    create_engine = sa.create_engine

    def listening(*args, **kwargs):  # every engine syncd creates (the source's among them) gets the listeners
        created = create_engine(*args, **kwargs)
        sa.event.listen(created, "before_cursor_execute", lambda *a: duplicate_once(a[2], "before"))
        sa.event.listen(created, "after_cursor_execute", lambda *a: duplicate_once(a[2], "after"))
        return created

    monkeypatch.setattr(sa, "create_engine", listening)
    assert once(config) == 0
    monkeypatch.undo()
    assert looked, "the first backfill's read was not seen"
    assert pushed_records(api) == (4 if sqlite else 5)
    letters = StateStore(state_url).dead_letters("contacts")
    assert {letter.key for letter in letters} == {"3"}
    assert all("duplicate key in model: 2 rows" in letter.reason for letter in letters)
    assert once(config) == 0
    assert pushed_records(api) == (4 if sqlite else 5)  # reported, not sent back and forth


def test_check_verifies_a_query_model_by_data_without_index_advice(suite, api, tmp_path, capfd):
    suite.insert([contact(i) for i in range(1, 4)])
    config = config_for(suite, api.url, f"sqlite:///{tmp_path / 'state.db'}", tmp_path, model=QUERY, tables=FEEDS)
    code = main(["check", "-c", str(config)])
    out = capfd.readouterr().out
    assert code == 0, out
    assert "CREATE INDEX" not in out and "not unique" not in out and "NOT NULL" not in out


def test_check_verifies_a_view_by_data(suite, api, tmp_path, capfd):
    suite.insert([contact(i) for i in range(1, 4)])
    with suite.engine.begin() as conn:
        conn.execute(sa.text("CREATE VIEW contact_people AS SELECT * FROM contacts WHERE deleted = 0"))
        conn.execute(sa.text("CREATE VIEW doubled AS SELECT * FROM contacts UNION ALL SELECT * FROM contacts WHERE id = 2"))
    config = config_for(suite, api.url, f"sqlite:///{tmp_path / 'state.db'}", tmp_path, table="contact_people")
    code = main(["check", "-c", str(config)])
    out = capfd.readouterr().out
    assert code == 0, out
    assert "CREATE INDEX" not in out and "not unique" not in out and "NOT NULL" not in out

    config = config_for(suite, api.url, f"sqlite:///{tmp_path / 'state.db'}", tmp_path, table="doubled")
    assert main(["check", "-c", str(config)]) == 1
    (error,) = [line for line in capfd.readouterr().out.splitlines() if line.startswith("error")]
    assert "sync contacts" in error and "key 'id' is not unique" in error and "2 (2 rows)" in error


def test_check_names_a_failing_query_and_a_bad_filter(suite, api, tmp_path, capfd):
    api = api.url
    state = f"sqlite:///{tmp_path / 'state.db'}"
    config = config_for(suite, api, state, tmp_path, model='query = "SELECT id, updated_at, phone FROM no_such_table"', fields='msisdn = "phone"')
    assert main(["check", "-c", str(config)]) == 1
    (error,) = [line for line in capfd.readouterr().out.splitlines() if line.startswith("error")]
    assert "sync contacts" in error and "query" in error and "no_such_table" in error

    config = config_for(suite, api, state, tmp_path, extra_sync='filter = "no_such_column = 0"')
    assert main(["check", "-c", str(config)]) == 1
    (error,) = [line for line in capfd.readouterr().out.splitlines() if line.startswith("error")]
    assert "sync contacts" in error and "filter" in error and "no_such_column" in error

    feed = '[[syncs.changes]]\ntable = "email_addr_bean_rel"\nkey = "bean_id"\nwatermark = "modified"\n'
    config = config_for(suite, api, state, tmp_path, tables=feed)
    assert main(["check", "-c", str(config)]) == 1
    (error,) = [line for line in capfd.readouterr().out.splitlines() if line.startswith("error")]
    assert "sync contacts" in error and "changes (email_addr_bean_rel)" in error and "'modified' not found" in error


def test_a_query_that_is_not_one_select_is_a_config_error(tmp_path, capfd):
    for query, why in (
        ("DELETE FROM contacts", "not delete"),
        ("SELECT id FROM contacts; DROP TABLE contacts", "not 2"),
    ):
        config = write_config(
            tmp_path / "syncd.toml",
            source_url=f"sqlite:///{tmp_path / 'crm.db'}",
            api_url="http://127.0.0.1:9/x",
            state_url=f"sqlite:///{tmp_path / 'state.db'}",
            model=f'query = "{query}"',
        )
        assert main(["check", "-c", str(config)]) == 2
        err = capfd.readouterr().err
        assert "syncs[0] (contacts).query" in err and why in err and "Traceback" not in err


def test_the_source_is_read_in_read_only_sessions(crm):
    from syncd.config import SourceConfig
    from syncd.source import Source

    source = Source("crm", SourceConfig(url=crm.url))
    try:
        with pytest.raises(sa.exc.DBAPIError, match="(?i)read.only|readonly"), source.engine.begin() as conn:
            conn.execute(sa.text("UPDATE contacts SET first_name = 'x'"))
    finally:
        source.dispose()


@pytest.mark.parametrize(
    ("model", "tables", "key", "why"),
    [
        ('table = "contacts"\nquery = "SELECT 1"', "", "syncs[0] (contacts)", "exactly one of table or query"),
        ("", '[[syncs.changes]]\ntable = "rel"\nkey = "bean_id"\n', "syncs[0] (contacts).changes[0].watermark", "missing"),
        ("", '[syncs.removed]\nmsisdn = { sent = "phone" }\n', "syncs[0] (contacts)", "'phone' is not an attribute"),
        (
            "",
            '[[syncs.changes]]\ntable = "rel"\nkey = "a"\nwatermark = "b"\n[[syncs.changes]]\ntable = "rel"\nkey = "a"\nwatermark = "b"\n',
            "syncs[0] (contacts).changes",
            "'rel' is read by more than one feed",
        ),
        ("", '[syncs.removed]\nstatus = { sent = "msisdn", value = "x" }\n', "syncs[0] (contacts).removed.status", "exactly one of sent or value"),
    ],
)
def test_model_config_errors_name_the_key(model, tables, key, why, tmp_path, capfd):
    config = write_config(
        tmp_path / "syncd.toml",
        source_url=f"sqlite:///{tmp_path / 'crm.db'}",
        api_url=NOWHERE,
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
        model=model or None,
        tables=tables,
    )
    assert main(["check", "-c", str(config)]) == 2
    err = capfd.readouterr().err
    assert key in err and why in err, err


def test_reconcile_runs_daily_unless_configured_otherwise(tmp_path):
    from syncd.config import load_config

    config = write_config(
        tmp_path / "syncd.toml", source_url="sqlite://", api_url=NOWHERE, state_url=f"sqlite:///{tmp_path / 's.db'}"
    )
    assert load_config(config).syncs[0].reconcile == "daily"


def test_a_failing_query_or_filter_fails_the_run_and_pushes_nothing(sqlite_url, api, state_url, tmp_path, capsys):
    crm = Crm(sqlite_url, deleted=True)
    crm.insert([contact(i) for i in range(1, 4)])
    for model, extra in (
        ('query = "SELECT id, phone, updated_at FROM no_such_table"', ""),
        (None, 'filter = "no_such_column = 0"'),
    ):
        config = write_config(
            tmp_path / "syncd.toml",
            source_url=sqlite_url,
            api_url=api.url,
            state_url=state_url,
            model=model,
            extra_sync=extra,
            fields='msisdn = "phone"',
        )
        assert once(config) == 1
        out = capsys.readouterr().out
        assert "failing" in out and ("no_such_table" in out or "no_such_column" in out), out
    assert api.requests() == []
    crm.dispose()
