"""The idle cycle's queries reach the contacts table through the (updated_at, id) index.

An idle cycle on a big table is only cheap if PostgreSQL seeks to the cursor instead of
reading the table: the keyset condition `(updated_at, id) > (:wm, :key)` must be an index
condition on `ix_contacts_updated_at_id`, never a filter over a sequential scan. We run
a real backfill and then a real idle cycle through `Runtime`, capture every statement the
idle cycle sends to the source (a `before_cursor_execute` listener), and EXPLAIN each one
that touches the table with the parameters it was sent with.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from syncd.config import load_config
from syncd.runtime import Runtime
from syncd.simulator import SimulatorConfig, start_in_thread

from .crm import TOKEN, Crm, write_config

pytestmark = pytest.mark.postgres

ROWS = 20_000
INDEX = "ix_contacts_updated_at_id"


def plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", ()):
        yield from plan_nodes(child)


@pytest.fixture
def crm(postgres_url):
    crm = Crm(postgres_url, watermark="timestamptz")
    with crm.engine.begin() as conn:
        # Like tests/crm.py's contact(i), generated server-side; four rows share each watermark.
        conn.execute(
            sa.text(
                "INSERT INTO contacts SELECT i, 'First' || i, 'Last' || i, 'Person' || i || '@Example.COM', "
                "'+4420' || lpad((79460000 + i)::text, 8, '0'), 'acct-' || i, "
                "now() - interval '1 hour' + (i / 4) * interval '1 millisecond' "
                "FROM generate_series(1, :rows) AS i"
            ),
            {"rows": ROWS},
        )
    with crm.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("ANALYZE contacts"))
    yield crm
    crm.dispose()


def test_idle_cycle_seeks_through_the_watermark_index(crm, tmp_path):
    with start_in_thread(SimulatorConfig(tokens=(TOKEN,), store="count")) as api:
        config = write_config(
            tmp_path / "syncd.toml", source_url=crm.url, api_url=api.url, state_url=f"sqlite:///{tmp_path / 'state.db'}"
        )
        with Runtime.open(load_config(config)) as runtime:
            runner = runtime.runners["contacts"]
            backfill = runner.run_cycle()
            assert (backfill.outcome, backfill.sent) == ("ok", ROWS)

            engine = runner.reader.source.engine
            sent: list[tuple[str, Any]] = []

            def capture(conn, cursor, statement, parameters, context, executemany) -> None:
                sent.append((statement, parameters))

            sa.event.listen(engine, "before_cursor_execute", capture)
            try:
                idle = runner.run_cycle()
            finally:
                sa.event.remove(engine, "before_cursor_execute", capture)
            assert (idle.outcome, idle.rows_read, idle.sent) == ("ok", 0, 0)

            on_table = [(s, p) for s, p in sent if "contacts" in s and s.lstrip().upper().startswith("SELECT")]
            assert on_table, f"the idle cycle sent no query on contacts: {[s for s, _ in sent]}"
            keyset = [(s, p) for s, p in on_table if "ORDER BY" in s.upper()]
            assert keyset, f"no keyset read among {[s for s, _ in on_table]}"

            with engine.connect() as conn:
                for statement, parameters in on_table:
                    (plan,) = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, parameters).scalar()
                    nodes = [n for n in plan_nodes(plan["Plan"]) if n.get("Relation Name") == "contacts"]
                    shown = f"{statement}\n{parameters}\n{plan}"
                    assert nodes, shown
                    assert all(n["Node Type"] != "Seq Scan" for n in nodes), shown
                    assert any(n["Node Type"] in ("Index Scan", "Index Only Scan") for n in nodes), shown
                    if (statement, parameters) in keyset:
                        (scan,) = nodes
                        assert scan["Index Name"] == INDEX, shown
                        # The cursor is where the scan starts, not a filter over everything.
                        assert "ROW(updated_at, id) > ROW(" in scan["Index Cond"], shown
                        assert "Sort" not in {n["Node Type"] for n in plan_nodes(plan["Plan"])}, shown


FEED_INDEX = "ix_email_addr_bean_rel_date_modified_bean_id"


def test_an_idle_change_feed_seeks_through_its_watermark_index(postgres_url, tmp_path):
    """A feed is read like the model: `(date_modified, bean_id) > cursor` is where the scan
    starts on the feed's index, so an idle poll costs an index probe, not a scan per poll."""
    crm = Crm(postgres_url, watermark="timestamptz", emails=True)
    with crm.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO contacts SELECT i, 'First' || i, 'Last' || i, NULL, '+4420' || lpad((79460000 + i)::text, 8, '0'), "
                "'acct-' || i, now() - interval '1 hour' FROM generate_series(1, :rows) AS i"
            ),
            {"rows": ROWS},
        )
        conn.execute(
            sa.text(
                "INSERT INTO email_addr_bean_rel SELECT 'rel-' || i, 'ea-' || i, i, "
                "CASE WHEN i % 10 = 0 THEN 'Accounts' ELSE 'Contacts' END, 1, 0, "
                "localtimestamp - interval '1 hour' + (i / 4) * interval '1 millisecond' FROM generate_series(1, :rows) AS i"
            ),
            {"rows": ROWS},
        )
    with crm.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("ANALYZE"))
    feed = (
        '[[syncs.changes]]\ntable = "email_addr_bean_rel"\nkey = "bean_id"\nwatermark = "date_modified"\n'
        "filter = \"bean_module = 'Contacts' AND deleted = 0\"\n"
    )
    try:
        with start_in_thread(SimulatorConfig(tokens=(TOKEN,), store="count")) as api:
            config = write_config(
                tmp_path / "syncd.toml",
                source_url=crm.url,
                api_url=api.url,
                state_url=f"sqlite:///{tmp_path / 'state.db'}",
                tables=feed,
            )
            with Runtime.open(load_config(config)) as runtime:
                runner = runtime.runners["contacts"]
                assert runner.run_cycle().outcome == "ok"  # the backfill and the feed's first pass
                engine = runner.reader.source.engine
                sent: list[tuple[str, Any]] = []

                def capture(conn, cursor, statement, parameters, context, executemany) -> None:
                    sent.append((statement, parameters))

                sa.event.listen(engine, "before_cursor_execute", capture)
                try:
                    idle = runner.run_cycle()
                finally:
                    sa.event.remove(engine, "before_cursor_execute", capture)
                assert (idle.outcome, idle.rows_read, idle.sent) == ("ok", 0, 0)

                reads = [(s, p) for s, p in sent if "email_addr_bean_rel" in s and "ORDER BY" in s.upper()]
                assert reads, f"the idle cycle did not read the feed: {[s for s, _ in sent]}"
                with engine.connect() as conn:
                    for statement, parameters in reads:
                        (plan,) = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, parameters).scalar()
                        shown = f"{statement}\n{parameters}\n{plan}"
                        nodes = [n for n in plan_nodes(plan["Plan"]) if n.get("Relation Name") == "email_addr_bean_rel"]
                        (scan,) = nodes
                        assert scan["Node Type"] in ("Index Scan", "Index Only Scan"), shown
                        assert scan["Index Name"] == FEED_INDEX, shown
                        assert "ROW(date_modified, bean_id) > ROW(" in scan["Index Cond"], shown
                        assert "Sort" not in {n["Node Type"] for n in plan_nodes(plan["Plan"])}, shown
    finally:
        crm.dispose()


MODEL = '''query = """
SELECT c.id, c.first_name, c.last_name, ea.email_address AS email, c.phone, c.account_id, c.updated_at
  FROM contacts c
  LEFT JOIN email_addr_bean_rel r ON r.bean_id = c.id AND r.bean_module = 'Contacts' AND r.primary_address = 1 AND r.deleted = 0
  LEFT JOIN email_addresses ea ON ea.id = r.email_address_id
"""'''
FEEDS = '''
[[syncs.changes]]
table = "email_addr_bean_rel"
key = "bean_id"
watermark = "date_modified"
filter = "bean_module = 'Contacts'"

[[syncs.changes]]
query = """
SELECT r.bean_id, ea.date_modified
  FROM email_addresses ea JOIN email_addr_bean_rel r ON r.email_address_id = ea.id AND r.bean_module = 'Contacts'
"""
key = "bean_id"
watermark = "date_modified"
'''
WATERMARK_INDEXES = {
    "contacts": "ix_contacts_updated_at_id",
    "email_addr_bean_rel": "ix_email_addr_bean_rel_date_modified_bean_id",
    "email_addresses": "ix_email_addresses_date_modified_id",
}


def test_an_idle_query_model_with_two_feeds_seeks_through_the_watermark_indexes(postgres_url, tmp_path):
    """The SuiteCRM shape: a query model over three tables and two feeds, one of them a query
    whose key (`r.bean_id`) is not in the table its watermark (`ea.date_modified`) comes from.
    Every read of an idle poll starts at its cursor on a watermark index; no table is scanned."""
    crm = Crm(postgres_url, watermark="timestamp", emails=True)
    with crm.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO contacts SELECT i, 'First' || i, 'Last' || i, NULL, '+4420' || lpad((79460000 + i)::text, 8, '0'), "
                "'acct-' || i, localtimestamp - interval '1 hour' + (i / 4) * interval '1 millisecond' "
                "FROM generate_series(1, :rows) AS i"
            ),
            {"rows": ROWS},
        )
        conn.execute(
            sa.text(
                "INSERT INTO email_addresses SELECT 'ea-' || i, 'person' || i || '@example.com', "
                "localtimestamp - interval '1 hour' + (i / 4) * interval '1 millisecond' FROM generate_series(1, :rows) AS i"
            ),
            {"rows": ROWS},
        )
        conn.execute(
            sa.text(
                "INSERT INTO email_addr_bean_rel SELECT 'rel-' || i, 'ea-' || i, i, 'Contacts', 1, 0, "
                "localtimestamp - interval '1 hour' + (i / 4) * interval '1 millisecond' FROM generate_series(1, :rows) AS i"
            ),
            {"rows": ROWS},
        )
        # SuiteCRM's own indexes on the relation (idx_bean_id, idx_email_address_id).
        conn.execute(sa.text("CREATE INDEX ix_rel_bean_id ON email_addr_bean_rel (bean_id, bean_module)"))
        conn.execute(sa.text("CREATE INDEX ix_rel_email_address_id ON email_addr_bean_rel (email_address_id)"))
    with crm.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("ANALYZE"))
    try:
        with start_in_thread(SimulatorConfig(tokens=(TOKEN,), store="count")) as api:
            config = write_config(
                tmp_path / "syncd.toml",
                source_url=crm.url,
                api_url=api.url,
                state_url=f"sqlite:///{tmp_path / 'state.db'}",
                model=MODEL,
                tables=FEEDS,
            )
            with Runtime.open(load_config(config)) as runtime:
                runner = runtime.runners["contacts"]
                assert runner.run_cycle().outcome == "ok"  # the backfill; the feeds start at their last rows
                crm.change_email(7, "changed7@example.com")  # every feed cursor now stands on a row
                crm.unlink_email(8)
                changed = runner.run_cycle()
                assert (changed.outcome, changed.sent) == ("ok", 2)
                engine = runner.reader.source.engine
                sent: list[tuple[str, Any]] = []

                def capture(conn, cursor, statement, parameters, context, executemany) -> None:
                    sent.append((statement, parameters))

                sa.event.listen(engine, "before_cursor_execute", capture)
                try:
                    idle = runner.run_cycle()
                finally:
                    sa.event.remove(engine, "before_cursor_execute", capture)
                assert (idle.outcome, idle.rows_read, idle.sent) == ("ok", 0, 0)

                reads = [(s, p) for s, p in sent if "ORDER BY" in s.upper() and any(t in s for t in WATERMARK_INDEXES)]
                assert len(reads) == 3, f"expected the model's and two feeds' reads: {[s for s, _ in sent]}"
                with engine.connect() as conn:
                    for statement, parameters in reads:
                        (plan,) = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, parameters).scalar()
                        shown = f"{statement}\n{parameters}\n{plan}"
                        nodes = list(plan_nodes(plan["Plan"]))
                        assert not [n for n in nodes if n["Node Type"] == "Seq Scan"], shown
                        starts = [
                            n
                            for n in nodes
                            if n.get("Index Name") == WATERMARK_INDEXES.get(n.get("Relation Name"))
                            and any(c in n.get("Index Cond", "") for c in ("updated_at >=", "date_modified >=", "ROW("))
                        ]
                        assert starts, shown  # the cursor is where a scan on a watermark index starts
    finally:
        crm.dispose()
