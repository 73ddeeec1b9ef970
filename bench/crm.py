"""A 1M-contact SuiteCRM-shaped model against the single-table backfill, in one run.

    .venv/bin/python bench/crm.py                      # 1M contacts, 3 rounds
    .venv/bin/python bench/crm.py --rows 100000 --repeat 1
    .venv/bin/python bench/crm.py --seed-only          # just build the two data sets

Measures, side by side (the issue's "Performance" targets in brackets):
1. backfill rows/s of `syncd once` over the model (contacts + e-mail relation + e-mail
   addresses + accounts, read with the README's SuiteCRM filter and change feeds, through a
   join (`--model join`, the default) or README's subquery form (`--model subquery`)) and
   over the single table of bench/seed.py, interleaved `--repeat` times, medians
   [model ≥ half of the single table];
2. an idle poll of the model with its two change feeds in a warm daemon (bench/warm_idle.py:
   the daemon's `run_cycle`, several times in one process) [≤ 20 ms];
3. 1% of the e-mail address rows changed in place (`email_addresses` only, the contacts
   untouched): `syncd once` must push exactly the live contacts behind them [≤ 2 s].

Data: PostgreSQL, like bench/run.py, so that both backfills read from the same server in
the same run and the single-table figure is the one bench/README.md already reports;
`generate_series` seeds the rows inside the server, no Python in the loop (at 1M contacts on
the shared 2-core dev box: the single table in 9 s, the model's five tables with their
indexes in about 2 min 15 s; a MariaDB variant would INSERT ... SELECT from `seq_1_to_N`). The tables have
the SuiteCRM columns that matter here (tests/crms/suitecrm.py is the full rebuild, with the
sources), PostgreSQL types for MariaDB's: ids are uuid text in CHAR(36), `deleted` a
smallint, `date_modified` a naive timestamp written in UTC. Every contact has one primary
address (and every tenth a second, non-primary one), 2% are soft-deleted, and 100,000
accounts hold them all. The indexes are SuiteCRM's plus the ADDED `(date_modified, key)`
ones the watermark and the feeds need.

The model config uses syncd features that land with the models/mapping/time branches
(`query`, `filter`, `[[syncs.changes]]`, `timezone`, `transform = "email"`, per-row region);
until then only the seeding and the single-table backfill run (`--seed-only` checks the
former). Results are printed as a markdown table and written to `--json`.
"""

from __future__ import annotations

import argparse
import re
import secrets
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson
import psycopg
from common import write_config as single_table_config
from measure import Measured, run_measured
from psycopg import sql
from run import PYTHON, SYNCD, figures, machine, say, simulator
from seed import TABLE as SINGLE_TABLE
from seed import seed as seed_single_table

from syncd.config_text import render_config

HERE = Path(__file__).resolve().parent
ACCOUNTS = 100_000


def seed_model(dsn: str, schema: str, rows: int) -> dict[str, int]:
    """(Re)create the SuiteCRM-shaped tables in `schema` with `rows` contacts; row counts."""
    s = sql.Identifier(schema)
    statements = [
        sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(s),
        sql.SQL("CREATE SCHEMA {}").format(s),
        sql.SQL(
            """CREATE TABLE {}.contacts (
                id char(36) NOT NULL PRIMARY KEY, date_entered timestamp, date_modified timestamp,
                deleted smallint DEFAULT 0, first_name varchar(100), last_name varchar(100),
                phone_mobile varchar(100), phone_work varchar(100), primary_address_country varchar(255),
                assigned_user_id char(36))"""
        ).format(s),
        sql.SQL(
            """CREATE TABLE {}.email_addresses (
                id char(36) NOT NULL PRIMARY KEY, email_address varchar(255), email_address_caps varchar(255),
                invalid_email smallint DEFAULT 0, opt_out smallint DEFAULT 0,
                date_created timestamp, date_modified timestamp, deleted smallint DEFAULT 0)"""
        ).format(s),
        sql.SQL(
            """CREATE TABLE {}.email_addr_bean_rel (
                id char(36) NOT NULL PRIMARY KEY, email_address_id char(36) NOT NULL, bean_id char(36) NOT NULL,
                bean_module varchar(100) NOT NULL, primary_address smallint DEFAULT 0, reply_to_address smallint DEFAULT 0,
                date_created timestamp, date_modified timestamp, deleted smallint DEFAULT 0)"""
        ).format(s),
        sql.SQL(
            """CREATE TABLE {}.accounts (
                id char(36) NOT NULL PRIMARY KEY, name varchar(150), date_entered timestamp, date_modified timestamp,
                deleted smallint DEFAULT 0)"""
        ).format(s),
        sql.SQL(
            # SuiteCRM declares these varchar(36); on PostgreSQL `varchar = char` compares as
            # text and cannot use the index, so they take the ids' own type here.
            """CREATE TABLE {}.accounts_contacts (
                id varchar(36) NOT NULL PRIMARY KEY, contact_id char(36), account_id char(36),
                date_modified timestamp, deleted smallint DEFAULT 0)"""
        ).format(s),
        # Rows generated in the server. md5(...)::uuid gives stable uuids; every fourth contact
        # shares its date_modified with its neighbours, as in bench/seed.py.
        sql.SQL(
            """INSERT INTO {}.accounts SELECT md5('a' || j)::uuid::text, 'Account ' || j,
                   now() AT TIME ZONE 'UTC' - interval '2 days', now() AT TIME ZONE 'UTC' - interval '2 days', 0
               FROM generate_series(1, %(accounts)s) AS j"""
        ).format(s),
        sql.SQL(
            """INSERT INTO {}.contacts SELECT md5('c' || i)::uuid::text,
                   now() AT TIME ZONE 'UTC' - interval '1 day',
                   now() AT TIME ZONE 'UTC' - interval '1 day' + (i / 4) * interval '10 microseconds',
                   CASE WHEN i %% 50 = 7 THEN 1 ELSE 0 END, 'First' || i, 'Last' || i,
                   '07' || lpad((400000000 + i)::text, 9, '0'), NULL, 'United Kingdom', NULL
               FROM generate_series(1, %(rows)s) AS i"""
        ).format(s),
        sql.SQL(
            """INSERT INTO {}.email_addresses SELECT md5('e' || i)::uuid::text,
                   'Person' || i || '@Example.COM', 'PERSON' || i || '@EXAMPLE.COM', 0, 0,
                   now() AT TIME ZONE 'UTC' - interval '1 day', now() AT TIME ZONE 'UTC' - interval '1 day' + (i / 4) * interval '10 microseconds', 0
               FROM generate_series(1, %(rows)s) AS i
               UNION ALL SELECT md5('e2-' || i)::uuid::text, 'p' || i || '@work.example.com', 'P' || i || '@WORK.EXAMPLE.COM',
                   0, 0, now() AT TIME ZONE 'UTC' - interval '1 day', now() AT TIME ZONE 'UTC' - interval '1 day', 0
               FROM generate_series(10, %(rows)s, 10) AS i"""
        ).format(s),
        sql.SQL(
            """INSERT INTO {}.email_addr_bean_rel SELECT md5('r' || i)::uuid::text, md5('e' || i)::uuid::text,
                   md5('c' || i)::uuid::text, 'Contacts', 1, 0, now() AT TIME ZONE 'UTC' - interval '1 day',
                   now() AT TIME ZONE 'UTC' - interval '1 day' + (i / 4) * interval '10 microseconds', 0
               FROM generate_series(1, %(rows)s) AS i
               UNION ALL SELECT md5('r2-' || i)::uuid::text, md5('e2-' || i)::uuid::text, md5('c' || i)::uuid::text,
                   'Contacts', 0, 0, now() AT TIME ZONE 'UTC' - interval '1 day', now() AT TIME ZONE 'UTC' - interval '1 day', 0
               FROM generate_series(10, %(rows)s, 10) AS i"""
        ).format(s),
        sql.SQL(
            """INSERT INTO {}.accounts_contacts SELECT md5('ac' || i)::uuid::text, md5('c' || i)::uuid::text,
                   md5('a' || (i %% %(accounts)s + 1))::uuid::text, now() AT TIME ZONE 'UTC' - interval '1 day', 0
               FROM generate_series(1, %(rows)s) AS i"""
        ).format(s),
    ]
    indexes = [
        # SuiteCRM's own (modules/Contacts/vardefs.php, metadata/email_addressesMetaData.php,
        # metadata/accounts_contactsMetaData.php, modules/Accounts/vardefs.php) ...
        ("contacts", "idx_cont_last_first", "last_name, first_name, deleted"),
        ("contacts", "idx_del_id_user", "deleted, id, assigned_user_id"),
        ("email_addresses", "idx_ea_caps_opt_out_invalid", "email_address_caps, opt_out, invalid_email"),
        ("email_addr_bean_rel", "idx_email_address_id", "email_address_id"),
        ("email_addr_bean_rel", "idx_bean_id", "bean_id, bean_module"),
        ("accounts_contacts", "idx_account_contact", "account_id, contact_id"),
        ("accounts_contacts", "idx_contid_del_accid", "contact_id, deleted, account_id"),
        ("accounts", "idx_accnt_id_del", "id, deleted"),
        # ... and the ADDED ones for the model's watermark and the change feeds.
        ("contacts", "idx_contacts_date_modified_id", "date_modified, id"),
        ("email_addresses", "idx_ea_date_modified_id", "date_modified, id"),
        ("email_addr_bean_rel", "idx_eabr_date_modified_bean", "date_modified, bean_id"),
        ("accounts_contacts", "idx_ac_date_modified_contact", "date_modified, contact_id"),
    ]
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement, {"rows": rows, "accounts": ACCOUNTS})
        for table, name, columns in indexes:
            conn.execute(
                sql.SQL("CREATE INDEX {} ON {}.{} ({})").format(
                    sql.Identifier(name), s, sql.Identifier(table), sql.SQL(columns)
                )
            )
        counts = {}
        for table in ("contacts", "email_addresses", "email_addr_bean_rel", "accounts", "accounts_contacts"):
            conn.execute(sql.SQL("VACUUM ANALYZE {}.{}").format(s, sql.Identifier(table)))
            counts[table] = conn.execute(sql.SQL("SELECT COUNT(*) FROM {}.{}").format(s, sql.Identifier(table))).fetchone()[0]
    return counts


def change_email_rows(dsn: str, schema: str, every: int, tag: str) -> tuple[int, int]:
    """Edit one primary address in `every` in place (email_addresses only, as SuiteCRM's
    EmailAddresses module does): (addresses changed, live contacts behind them)."""
    s = sql.Identifier(schema)
    with psycopg.connect(dsn, autocommit=True) as conn:
        changed = conn.execute(
            sql.SQL(
                """UPDATE {s}.email_addresses ea
                      SET email_address = %(prefix)s || substr(ea.id, 1, 8) || '@example.com',
                          email_address_caps = upper(%(prefix)s || substr(ea.id, 1, 8) || '@example.com'),
                          date_modified = clock_timestamp() AT TIME ZONE 'UTC'
                    FROM {s}.email_addr_bean_rel r
                   WHERE r.email_address_id = ea.id AND r.primary_address = 1
                     AND ('x' || substr(r.bean_id, 1, 8))::bit(32)::int %% %(every)s = 0"""
            ).format(s=s),
            {"prefix": f"changed-{tag}-", "every": every},
        ).rowcount
        live = conn.execute(
            sql.SQL(
                """SELECT COUNT(DISTINCT c.id) FROM {s}.contacts c
                     JOIN {s}.email_addr_bean_rel r ON r.bean_id = c.id AND r.primary_address = 1
                     JOIN {s}.email_addresses ea ON ea.id = r.email_address_id
                    WHERE c.deleted = 0 AND ea.email_address LIKE %(like)s"""
            ).format(s=s),
            {"like": f"changed-{tag}-%"},
        ).fetchone()[0]
        conn.execute(sql.SQL("ANALYZE {}.email_addresses").format(s))
    return changed, live


# The model's query. `join` picks the primary address with a join (one row per contact as
# long as each has one primary address, as here); `subquery` is README.md's SuiteCRM query,
# which picks one address even where imports left two flagged primary, at the price of
# dependent subqueries per row (first 50,000-row keyset chunk at 1M contacts on the 2-core
# dev box, PostgreSQL 15: 1.22 s `join`, 1.57 s `subquery`, 0.08 s for the single table).
MODELS = {
    "join": """SELECT c.id, c.first_name, c.last_name, c.phone_mobile, c.primary_address_country,
       ea.email_address, a.name AS account_name, c.deleted, c.date_modified
  FROM {schema}.contacts c
  LEFT JOIN {schema}.email_addr_bean_rel r ON r.bean_id = c.id AND r.bean_module = 'Contacts'
       AND r.primary_address = 1 AND r.deleted = 0
  LEFT JOIN {schema}.email_addresses ea ON ea.id = r.email_address_id AND ea.deleted = 0
  LEFT JOIN {schema}.accounts_contacts ac ON ac.contact_id = c.id AND ac.deleted = 0
  LEFT JOIN {schema}.accounts a ON a.id = ac.account_id AND a.deleted = 0
""",
    "subquery": """SELECT c.id, c.first_name, c.last_name, c.phone_mobile, c.primary_address_country,
       (SELECT ea.email_address
          FROM {schema}.email_addr_bean_rel r
          JOIN {schema}.email_addresses ea ON ea.id = r.email_address_id AND ea.deleted = 0
         WHERE r.bean_id = c.id AND r.bean_module = 'Contacts' AND r.deleted = 0
         ORDER BY r.primary_address DESC, r.date_created, r.id
         LIMIT 1) AS email_address,
       (SELECT a.name
          FROM {schema}.accounts_contacts ac
          JOIN {schema}.accounts a ON a.id = ac.account_id AND a.deleted = 0
         WHERE ac.contact_id = c.id AND ac.deleted = 0
         ORDER BY ac.date_modified DESC, ac.id
         LIMIT 1) AS account_name,
       c.deleted, c.date_modified
  FROM {schema}.contacts c
""",
}


def model_config(path: Path, *, model: str, schema: str, source_url: str, api_url: str, token_file: Path, state: Path, max_in_flight: int) -> Path:
    """README's SuiteCRM config with the `model` query, two feeds and the bench's batch size."""
    path.write_text(
        render_config(
            comment="written by bench/crm.py",
            state={"url": f"sqlite:///{state}"},
            log={"level": "info", "format": "json"},
            api={
                "url": api_url,
                "token_file": str(token_file),
                "timeout_s": 60,
                "requests_per_second": 0,
                "max_in_flight": max_in_flight,
                "max_batch_records": 500,
            },
            sources={"crm": {"url": source_url, "timezone": "UTC"}},
            syncs=[
                {
                    "name": "contacts",
                    "source": "crm",
                    "query": MODELS[model].format(schema=schema),
                    "key": "id",
                    "watermark": "date_modified",
                    "filter": "deleted = 0",
                    "interval": "30s",
                    "settle": "0s",
                    "reconcile": "off",
                    "datastore_id": "1466",
                    "feed_id": "1499",
                    "changes": [
                        {
                            "table": f"{schema}.email_addr_bean_rel",
                            "key": "bean_id",
                            "watermark": "date_modified",
                            "filter": "bean_module = 'Contacts'",
                        },
                        {
                            "query": f"""SELECT r.bean_id, ea.date_modified
  FROM {schema}.email_addresses ea
  JOIN {schema}.email_addr_bean_rel r ON r.email_address_id = ea.id AND r.bean_module = 'Contacts'
""",
                            "key": "bean_id",
                            "watermark": "date_modified",
                        },
                    ],
                    "fields": {
                        "msisdn": {
                            "column": "phone_mobile",
                            "transform": "e164",
                            "region": "{primary_address_country}",
                            "default_region": "GB",
                            "mobile_only": True,
                            "required": True,
                        },
                        "firstname": "first_name",
                        "lastname": "last_name",
                        "emailid": {"column": "email_address", "transform": "email"},
                        "company": "account_name",
                    },
                }
            ],
        )
    )
    return path


class CrmBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="syncd-crm-bench-"))
        self.token_file = self.work / "api-token"
        self.token_file.write_text(secrets.token_hex(16) + "\n")
        self.api_url = ""

    @property
    def source_url(self) -> str:
        return re.sub(r"^postgresql(\+\w+)?://", "postgresql+psycopg://", self.args.dsn)

    def single_config(self, state: Path) -> Path:
        return single_table_config(
            self.work / "single.toml",
            source_url=self.source_url,
            table=f"{self.args.single_schema}.{SINGLE_TABLE}",
            api_url=self.api_url,
            token_file=self.token_file,
            state_url=f"sqlite:///{state}",
            max_in_flight=self.args.max_in_flight,
        )

    def model_config(self, state: Path) -> Path:
        return model_config(
            self.work / "model.toml",
            model=self.args.model,
            schema=self.args.schema,
            source_url=self.source_url,
            api_url=self.api_url,
            token_file=self.token_file,
            state=state,
            max_in_flight=self.args.max_in_flight,
        )

    def seed(self) -> dict[str, Any]:
        args = self.args
        say(f"seeding the single table: {args.rows:,} rows")
        seed_single_table(args.dsn, args.single_schema, args.rows)
        say(f"seeding the SuiteCRM model: {args.rows:,} contacts")
        return seed_model(args.dsn, args.schema, args.rows)

    def run(self) -> dict[str, Any]:
        args = self.args
        results: dict[str, Any] = {"machine": machine(args.dsn), "rows": args.rows, "params": {k: str(v) for k, v in vars(args).items()}}
        token = self.token_file.read_text().strip()
        with simulator(token) as self.api_url:
            results["counts"] = self.seed()
            if args.seed_only:
                return results
            results["backfill"] = self.backfills()
            results["idle_warm_ms"] = self.idle_warm()
            results["changed"] = self.changed()
        return results

    def backfills(self) -> dict[str, list[dict[str, float]]]:
        runs: dict[str, list[dict[str, float]]] = {"single": [], "model": []}
        live = self.args.rows - len(range(7, self.args.rows + 1, 50))
        for round_ in range(self.args.repeat):
            for name, config in (("single", self.single_config), ("model", self.model_config)):
                say(f"backfill round {round_ + 1}/{self.args.repeat}: {name}")
                state = self.work / f"{name}-{round_}.db"
                run = self.syncd("once", config(state))
                cycles = run.json_lines("cycle")
                sample = figures(run, {"rows": sum(c["sent"] for c in cycles), "seconds": sum(c["duration_s"] for c in cycles)})
                expected = self.args.rows if name == "single" else live
                if sample["rows"] != expected:
                    raise RuntimeError(f"{name} backfill pushed {sample['rows']:,} rows, expected {expected:,}")
                runs[name].append(sample)
                if name == "model":
                    self.state = state  # the idle and changed cycles continue from it
        return runs

    def idle_warm(self) -> list[float]:
        """The model's idle cycle (two feeds) in one warm process, as the daemon runs it."""
        say("idle polls of the model in a warm process")
        warm = run_measured([PYTHON, str(HERE / "warm_idle.py"), str(self.model_config(self.state)), "10"]).check()
        return [seconds * 1000 for seconds in warm.result()["warm_s"]]

    def changed(self) -> list[dict[str, float]]:
        samples = []
        for round_ in range(self.args.repeat):
            changed, live = change_email_rows(self.args.dsn, self.args.schema, self.args.changed_every, tag=str(round_))
            say(f"changed {changed:,} e-mail rows ({live:,} live contacts); syncd once")
            run = self.syncd("once", self.model_config(self.state))
            cycles = run.json_lines("cycle")
            sent = sum(c["sent"] for c in cycles)
            if sent != live:
                raise RuntimeError(f"{changed} e-mail rows of {live} live contacts changed, but syncd sent {sent}")
            samples.append({"addresses": changed, "sent": sent, "duration_s": sum(c["duration_s"] for c in cycles), "wall_s": run.wall_s})
        return samples

    def syncd(self, command: str, config: Path) -> Measured:
        return run_measured([SYNCD, command, "-c", str(config), "--no-progress"]).check()


def render(results: dict[str, Any]) -> str:
    m, n = results["machine"], results["rows"]
    lines = [
        f"Run {m['date']} on {m['nproc']} × {m['cpu']}, PostgreSQL {m['postgres']}, Python {m['python']}; "
        f"N = {n:,} contacts, model `{results['params']['model']}`; seeded: " + ", ".join(f"{table} {count:,}" for table, count in results["counts"].items()) + ".",
    ]
    if "backfill" not in results:
        return "\n".join(lines)
    single, model = results["backfill"]["single"], results["backfill"]["model"]
    idle, changed = results["idle_warm_ms"], results["changed"]

    def med(samples: list[dict[str, float]], key: str) -> float:
        return statistics.median(sample[key] for sample in samples)

    def each(values: list[float], spec: str) -> str:
        return ", ".join(format(value, spec) for value in values)

    lines += [
        "",
        "| SuiteCRM model | measured (median) | target | runs |",
        "|---|---:|---|---|",
        f"| backfill, single table | {med(single, 'rows_per_s'):,.0f} rows/s | | {each([s['rows_per_s'] for s in single], ',.0f')} |",
        f"| backfill, model (4 tables, 2 feeds) | {med(model, 'rows_per_s'):,.0f} rows/s | ≥ ½ single table | "
        f"{each([s['rows_per_s'] for s in model], ',.0f')} |",
        f"| model / single table | {med(model, 'rows_per_s') / med(single, 'rows_per_s'):.2f} | ≥ 0.5 | |",
        f"| idle poll, model + 2 feeds, warm daemon | {statistics.median(idle):.1f} ms | ≤ 20 ms | {each(idle, '.1f')} |",
        f"| 1% of e-mail rows changed ({med(changed, 'sent'):,.0f} contacts pushed, exactly those) | "
        f"{med(changed, 'duration_s'):.2f} s | ≤ 2 s | {each([s['duration_s'] for s in changed], '.2f')} |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="contacts (default 1,000,000)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of each measurement; medians (default 3)")
    parser.add_argument("--changed-every", type=int, default=100, help="change one e-mail row in N (default 100 = 1%%)")
    parser.add_argument("--max-in-flight", type=int, default=3, help="syncd's api.max_in_flight (default 3)")
    parser.add_argument("--dsn", default="postgresql://root@127.0.0.1:5432/test")
    parser.add_argument("--schema", default="bench_crm", help="schema of the model's tables (dropped and recreated)")
    parser.add_argument("--single-schema", default="bench_crm_single", help="schema of the single table (dropped and recreated)")
    parser.add_argument("--model", choices=sorted(MODELS), default="join", help="the model's query (default join; see MODELS)")
    parser.add_argument("--seed-only", action="store_true", help="seed both data sets, measure nothing")
    parser.add_argument("--json", type=Path, default=None, help="also write every sample here")
    args = parser.parse_args(argv)
    bench = CrmBench(args)
    try:
        results = bench.run()
    finally:
        shutil.rmtree(bench.work, ignore_errors=True)
    if args.json:
        args.json.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
