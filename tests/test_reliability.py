"""Issue 4: syncd under faults, end to end.

Real source databases, the simulator over real HTTP with fault injection, the `syncd`
command (in process, or as a subprocess where it must be killed). Every scenario ends
by checking what a user would: every source row is in the datastore, and the API key
is nowhere it should not be.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from syncd.cli import main
from syncd.config import load_config
from syncd.runtime import Runtime
from syncd.simulator import RunningSimulator, SimulatorConfig
from syncd.state import StateStore

from .crm import TOKEN, Crm, contact, stored, wait_for, write_config

DATASTORE = "1466"



# ---------------------------------------------------------------------------- helpers


def acked_records(api: RunningSimulator) -> int:
    """Records in requests the API acknowledged (a 200 carrying 1010 is not an ACK)."""
    return sum(e["records"] for e in api.requests() if e["status"] == 200 and e["statuscode"] == 0)


def source_ids(crm: Crm) -> set[str]:
    with crm.engine.connect() as conn:
        return {f"acct-{i}" for i in conn.scalars(sa.select(crm.table.c.id))}


def assert_no_row_lost(crm: Crm, api: RunningSimulator, *, except_ids: set[int] = frozenset()) -> None:
    expected = source_ids(crm) - {f"acct-{i}" for i in except_ids}
    wait_for(lambda: expected <= set(stored(api)), what=f"all {len(expected)} source rows in the datastore")


class Cli:
    """Runs `syncd` in process and keeps everything it printed, for the secrets check."""

    def __init__(self, capfd: pytest.CaptureFixture[str]) -> None:
        self.capfd = capfd
        self.outputs: list[str] = []

    def __call__(self, config: Path, command: str, *args: str) -> tuple[int, str, str]:
        code = main([command, "-c", str(config), *args])
        out, err = self.capfd.readouterr()
        self.outputs += [out, err]
        return code, out, err

    def once(self, config: Path, *args: str) -> tuple[int, str, str]:
        return self(config, "once", "--no-progress", *args)

    def status(self, config: Path) -> dict[str, Any]:
        code, out, _ = self(config, "status", "--json")
        (sync,) = orjson.loads(out)["syncs"]
        assert code == (0 if sync["state"] in ("ok", "paused", "never_run") else 3)  # DESIGN: 3 while failing
        return sync

    def dead_letters(self, config: Path, *extra: str) -> list[dict[str, Any]]:
        code, out, _ = self(config, "dead-letters", "list", "--json", *extra)
        assert code == 0
        return orjson.loads(out)["dead_letters"]


@pytest.fixture
def api_config() -> SimulatorConfig:
    return SimulatorConfig(tokens=(TOKEN,), key_attribute="accountid", seed=4)


@pytest.fixture
def state_path(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
def cli(capfd: pytest.CaptureFixture[str], state_path: Path, tmp_path: Path) -> Iterator[Cli]:
    """The CLI; after the test, the API key must be in none of its output nor the state db."""
    runner = Cli(capfd)
    yield runner
    config = tmp_path / "syncd.toml"
    if config.exists():
        runner.status(config)
        runner.dead_letters(config, "--all")
    assert_secret_kept(runner.outputs, state_path)


def assert_secret_kept(outputs: list[str], state_path: Path) -> None:
    for text in outputs:
        assert TOKEN not in text
    files = [p for p in state_path.parent.glob(state_path.name + "*") if p.is_file()]
    assert files, "no state database written"
    for path in files:
        assert TOKEN.encode() not in path.read_bytes(), f"the API key is in {path.name}"


def config_for(crm: Crm, api: RunningSimulator, tmp_path: Path, state_path: Path, **kwargs: Any) -> Path:
    return write_config(
        tmp_path / "syncd.toml",
        source_url=crm.url,
        api_url=api.url,
        state_url=f"sqlite:///{state_path}",
        **kwargs,
    )


# ---------------------------------------------------------------------------- scenarios


def test_throttling_and_random_500s_lose_nothing(crm, api, cli, tmp_path, state_path):
    crm.insert([contact(i) for i in range(1, 301)])
    api.set_faults(rate_limit=25, retry_after=0.05, fail_rate=0.2)
    config = config_for(crm, api, tmp_path, state_path, batch=10, extra_api="max_attempts = 30")

    code, out, _ = cli.once(config)

    assert code == 0, out
    assert_no_row_lost(crm, api)
    assert acked_records(api) == 300  # a 429 or 500 is answered before anything is taken
    by_status = api.stats()["by_status"]
    assert by_status.get("429", 0) > 0 and by_status.get("500", 0) > 0
    pushes = StateStore(f"sqlite:///{state_path}").pushes("contacts", limit=100_000)
    recorded = {(p["http_status"], p["outcome"]) for p in pushes}
    assert (429, "retry") in recorded and (500, "retry") in recorded
    # Every HTTP attempt is in the state db, as the API answered it.
    assert sum(1 for p in pushes if p["http_status"] == 429) == by_status["429"]
    assert sum(1 for p in pushes if p["http_status"] == 500) == by_status["500"]
    assert sum(p["record_count"] for p in pushes if p["outcome"] == "ack") == 300
    assert all(p["trans_id"] for p in pushes if p["outcome"] == "ack")
    assert cli.dead_letters(config) == []
    status = cli.status(config)
    assert status["state"] == "ok" and status["records_sent"] == 300 and status["dead_letters"] == 0


def test_records_missing_a_mandatory_attribute_are_isolated_by_the_api(pg_crm, api, cli, tmp_path, state_path):
    bad = {10, 55, 77}
    pg_crm.insert([contact(i, phone=None if i in (10, 55) else "" if i == 77 else None) if i in bad else contact(i) for i in range(1, 101)])
    # msisdn is mandatory at the API, but not `required` here: only the API can refuse it.
    fields = 'msisdn = "phone"\nfirstname = "first_name"\naccountid = "account_id"\n'
    config = config_for(pg_crm, api, tmp_path, state_path, batch=50, fields=fields)

    code, out, _ = cli.once(config)

    assert code == 0, out
    assert "dead-lettered 3" in out
    wait_for(lambda: len(stored(api)) == 97, what="97 good rows")
    assert not {f"acct-{i}" for i in bad} & set(stored(api))
    letters = cli.dead_letters(config)
    assert sorted(int(letter["key"]) for letter in letters) == sorted(bad)
    for letter in letters:
        assert letter["api_code"] == 1002
        assert "Mandatory field missing" in letter["reason"] and "msisdn" in letter["reason"]
    assert cli.status(config)["dead_letters"] == 3

    pg_crm.update([10, 55], phone="+442079460999")
    pg_crm.update([77], phone="+442079460998")
    code, out, _ = cli.once(config)

    assert code == 0, out
    assert cli.dead_letters(config) == []
    resolved = cli.dead_letters(config, "--all")
    assert {letter["resolution"] for letter in resolved} == {"delivered"}
    assert_no_row_lost(pg_crm, api)
    assert cli.status(config)["dead_letters"] == 0


def test_invalid_phone_numbers_never_reach_the_api(pg_crm, api, cli, tmp_path, state_path):
    pg_crm.insert([contact(i, phone={5: "not a phone", 6: "+44 12"}.get(i, contact(i)["phone"])) for i in range(1, 41)])
    config = config_for(pg_crm, api, tmp_path, state_path)

    code, out, _ = cli.once(config)

    assert code == 0, out
    wait_for(lambda: len(stored(api)) == 38, what="38 valid rows")
    assert acked_records(api) == 38  # the two invalid rows were never sent
    assert sum(e["records"] for e in api.requests()) == 38
    letters = {letter["key"]: letter for letter in cli.dead_letters(config)}
    assert set(letters) == {"5", "6"}
    assert all("msisdn" in letter["reason"] and letter["http_status"] is None for letter in letters.values())

    # The operator fixes row 5 without touching updated_at, and retries its dead letter.
    pg_crm.update([5], bump=False, phone="+442079461005")
    code, out, _ = cli(config, "dead-letters", "retry", str(letters["5"]["id"]))
    assert code == 0, out
    assert "1 dead letter" in out and "0 still open" in out
    wait_for(lambda: stored(api).get("acct-5", {}).get("msisdn") == "+442079461005", what="row 5 delivered")
    assert [letter["key"] for letter in cli.dead_letters(config)] == ["6"]

    code, out, _ = cli(config, "dead-letters", "discard", str(letters["6"]["id"]))
    assert code == 0 and "discarded 1" in out
    assert cli.dead_letters(config) == []
    by_key = {letter["key"]: letter["resolution"] for letter in cli.dead_letters(config, "--all")}
    assert by_key == {"5": "delivered", "6": "discarded"}
    assert_no_row_lost(pg_crm, api, except_ids={6})
    assert "acct-6" not in stored(api)


def _syncd(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from syncd.cli import main; sys.exit(main())", *args]


@pytest.mark.parametrize("command", ["once", "run"])
def test_kill_9_mid_backfill_costs_at_most_the_in_flight_batches(pg_crm, api, cli, tmp_path, state_path, command):
    rows, batch, in_flight = 3000, 20, 2
    pg_crm.insert([contact(i) for i in range(1, rows + 1)])
    api.set_faults(rate_limit=25, retry_after=0.02, latency_s=0.01)
    config = config_for(pg_crm, api, tmp_path, state_path, batch=batch, extra_api="max_attempts = 50")
    argv = [command, "-c", str(config)] + (["--no-progress"] if command == "once" else [])

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen(
            _syncd(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )

    process = start()
    try:
        wait_for(lambda: api.received(DATASTORE) >= 400 or process.poll() is not None, timeout=60, what="400 records")
        assert process.poll() is None, "the backfill finished before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        out, err = process.communicate(timeout=10)
    cli.outputs += [out, err]
    assert process.returncode == -signal.SIGKILL
    assert api.received(DATASTORE) < rows

    api.set_faults(rate_limit=None)
    if command == "once":
        code, out, _ = cli.once(config)
        assert code == 0, out
    else:
        process = start()
        try:
            wait_for(lambda: len(stored(api)) == rows, timeout=60, what="the restarted daemon to finish")
            process.send_signal(signal.SIGTERM)
            out, err = process.communicate(timeout=20)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        cli.outputs += [out, err]
        assert process.returncode == 0, err
    assert_no_row_lost(pg_crm, api)
    wait_for(lambda: api.received(DATASTORE) == acked_records(api), what="every ACKed record inserted")
    duplicates = api.received(DATASTORE) - rows
    assert 0 <= duplicates <= in_flight * batch
    assert cli.status(config)["records_sent"] >= rows


def test_postgres_late_commit_is_not_skipped(pg_crm, api, cli, tmp_path, state_path):
    pg_crm.insert([contact(i) for i in range(1, 21)])
    config = config_for(pg_crm, api, tmp_path, state_path, settle="1s")
    code, out, _ = cli.once(config)
    assert code == 0, out
    wait_for(lambda: len(stored(api)) == 20, what="the first 20 rows")

    pg_crm.update([2], first_name="Before")  # committed before the late transaction starts
    late = sa.create_engine(pg_crm.url)
    with late.connect() as conn:
        transaction = conn.begin()
        # now() is the transaction's start: the row carries a time older than its commit.
        conn.execute(sa.text("UPDATE contacts SET first_name = 'Late', updated_at = now() WHERE id = 1"))
        time.sleep(1.3)  # the open transaction is now older than settle
        pg_crm.update([3], first_name="After")  # committed while the late one is open

        # `once` keeps cycling while the open transaction holds the bound back; let it run.
        result: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: result.update(code=main(["once", "-c", str(config), "--no-progress"])))
        thread.start()
        try:
            wait_for(lambda: stored(api)["acct-2"]["firstname"] == "Before", what="row 2 delivered")
            time.sleep(0.5)  # several more cycles: none may read past the open transaction
            assert stored(api)["acct-3"]["firstname"] == "First3", "a row newer than the open transaction was read"
            assert stored(api)["acct-1"]["firstname"] == "First1"
        finally:
            transaction.commit()
            thread.join(timeout=70)
    late.dispose()
    assert result.get("code") == 0

    code, out, _ = cli.once(config)
    assert code == 0, out
    wait_for(lambda: stored(api)["acct-1"]["firstname"] == "Late", what="the late row")
    wait_for(lambda: stored(api)["acct-3"]["firstname"] == "After", what="row 3")
    assert_no_row_lost(pg_crm, api)


def test_reconcile_sends_exactly_the_rows_changed_without_a_watermark_bump(pg_crm, api, cli, tmp_path, state_path):
    pg_crm.insert([contact(i) for i in range(1, 101)])
    config = config_for(pg_crm, api, tmp_path, state_path, batch=30)
    assert cli.once(config)[0] == 0
    wait_for(lambda: acked_records(api) == 100, what="100 records")

    pg_crm.update([42], bump=False, first_name="Silent")
    code, out, _ = cli.once(config)
    assert code == 0 and acked_records(api) == 100  # the watermark did not move: nothing seen

    code, out, _ = cli(config, "reconcile")

    assert code == 0, out
    assert "sent 1," in out and "compared 100" in out
    assert acked_records(api) == 101
    wait_for(lambda: stored(api)["acct-42"]["firstname"] == "Silent", what="row 42")
    code, out, _ = cli(config, "reconcile")
    assert code == 0 and "sent 0," in out and acked_records(api) == 101
    assert_no_row_lost(pg_crm, api)


def test_source_connection_terminated_mid_cycle(pg_crm, api, cli, tmp_path, state_path):
    pg_crm.insert([contact(i) for i in range(1, 2001)])
    api.set_faults(rate_limit=80, retry_after=0.02)
    config = config_for(pg_crm, api, tmp_path, state_path, batch=20, extra_api="max_attempts = 50")
    source_db = sa.make_url(pg_crm.url)
    readers: set[int] = set()

    def note_reader(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        if conn.engine.url.query == source_db.query and statement.lstrip().upper().startswith("SELECT") and "contacts" in statement:
            readers.add(conn.connection.dbapi_connection.info.backend_pid)

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", note_reader)
    killed: list[int] = []

    def killer() -> None:
        wait_for(lambda: api.received(DATASTORE) >= 300, timeout=60, what="300 records")
        with pg_crm.engine.connect() as conn:
            for pid in list(readers):
                if conn.scalar(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}):
                    killed.append(pid)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        code, out, _ = cli.once(config)
    finally:
        thread.join()
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", note_reader)
    assert killed
    assert code == 1, out
    assert "failing" in out
    status = cli.status(config)
    assert status["state"] == "failing"
    assert "source 'crm'" in status["last_error"]
    assert 300 <= status["records_sent"] < 2000

    api.set_faults(rate_limit=None)
    code, out, _ = cli.once(config)
    assert code == 0, out
    assert_no_row_lost(pg_crm, api)
    assert cli.status(config)["state"] == "ok"


def test_timeout_after_the_server_accepted_resends_and_records_both(pg_crm, api, cli, tmp_path, state_path):
    pg_crm.insert([contact(i) for i in range(1, 21)])
    config = config_for(pg_crm, api, tmp_path, state_path)
    config.write_text(config.read_text().replace("timeout_s = 5", "timeout_s = 0.3"))
    api.queue_faults({"accept_then_delay_s": 1.0})

    code, out, _ = cli.once(config)

    assert code == 0, out
    assert_no_row_lost(pg_crm, api)
    wait_for(lambda: api.received(DATASTORE) == 40, what="both copies inserted")  # it did arrive twice
    pushes = sorted(StateStore(f"sqlite:///{state_path}").pushes("contacts"), key=lambda p: p["id"])
    assert [(p["outcome"], p["attempt"], p["record_count"]) for p in pushes] == [("retry", 1, 20), ("ack", 2, 20)]
    assert "timed out" in pushes[0]["description"] and pushes[0]["http_status"] is None
    assert pushes[1]["trans_id"] and pushes[1]["http_status"] == 200


def test_405_stops_the_sync_with_a_configuration_error(pg_crm, api, cli, tmp_path, state_path):
    pg_crm.insert([contact(i) for i in range(1, 31)])
    # One batch on the wire, so the first batch is the one answered 405.
    config = config_for(pg_crm, api, tmp_path, state_path, batch=10, in_flight=1)
    api.queue_faults({"status": 405})

    code, out, err = cli.once(config)

    assert code == 1
    assert "config_error" in out and "405" in out and "api.url" in out
    assert "Traceback" not in err
    assert StateStore(f"sqlite:///{state_path}").cursor("contacts") is None  # the watermark did not move
    status = cli.status(config)
    assert status["watermark"] is None and status["state"] != "ok" and "405" in status["last_error"]

    code, out, _ = cli.once(config)  # the operator fixed the URL (here: the fault is gone)
    assert code == 0, out
    assert_no_row_lost(pg_crm, api)


def test_refused_key_then_fixed_token_file_resumes(pg_crm, api, cli, tmp_path, state_path):
    pg_crm.insert([contact(i) for i in range(1, 51)])
    token_file = tmp_path / "api-token"
    token_file.write_text("a-revoked-key\n")
    config = config_for(pg_crm, api, tmp_path, state_path, token_file=token_file, batch=10)

    code, out, _ = cli.once(config)

    assert code == 1
    assert "auth_error" in out
    status = cli.status(config)
    assert status["state"] == "auth_error" and status["watermark"] is None and status["records_sent"] == 0
    assert acked_records(api) == 0

    token_file.write_text(TOKEN + "\n")
    code, out, _ = cli.once(config)
    assert code == 0, out
    assert_no_row_lost(pg_crm, api)
    assert cli.status(config)["state"] == "ok"


def test_key_rotation_is_picked_up_without_a_restart(pg_crm, api, cli, tmp_path, state_path):
    """A long-lived runner (as in the daemon) resumes by itself once the token file changes."""
    pg_crm.insert([contact(i) for i in range(1, 21)])
    config_path = config_for(pg_crm, api, tmp_path, state_path)
    token_file = tmp_path / "api-token"
    api.set_tokens(["key-2-" + TOKEN])  # the key in use is revoked; key 2 is issued

    with Runtime.open(load_config(config_path)) as runtime:
        runner = runtime.runners["contacts"]
        assert runner.run_cycle().outcome == "auth_error"
        assert runner.run_cycle().outcome == "auth_error"  # waits, does not hammer the API
        assert sum(1 for e in api.requests() if e["status"] == 401) == 1
        token_file.write_text("key-2-" + TOKEN + "\n")
        report = runner.run_cycle()
        assert report.outcome == "ok" and report.sent == 20
    cli.outputs.append(cli.capfd.readouterr().err)
    assert_no_row_lost(pg_crm, api)


def test_secrets_stay_out_of_state_status_dead_letters_and_logs(pg_crm, api, cli, tmp_path, state_path):
    pg_crm.insert([contact(i, phone="bad" if i == 3 else contact(i)["phone"]) for i in range(1, 41)])
    fields = 'msisdn = { column = "phone", transform = "e164" }\nfirstname = "first_name"\naccountid = "account_id"\n'
    config = config_for(pg_crm, api, tmp_path, state_path, batch=10, fields=fields)
    config.write_text(config.read_text().replace('level = "warning"', 'level = "debug"'))
    pg_crm.update([7], bump=False, phone=None)  # the API refuses it: 1002
    api.queue_faults({"status": 500}, {"status": 429, "retry_after": 0.01}, {"drop": True}, {"status": 401})

    code, out, err = cli.once(config)
    code, out, err = cli.once(config)  # after the 401, a fresh process tries again

    assert code == 0, out
    assert '"level":"info"' in err  # the talkative levels were on (at warning there would be none)
    assert {letter["key"] for letter in cli.dead_letters(config)} == {"3", "7"}
    assert_no_row_lost(pg_crm, api, except_ids={3, 7})
    # The fixture's teardown reads status --json, every dead letter and the state db bytes.


def test_postgres_gate_unavailable_is_said_once_and_settle_still_works(pg_crm, api, cli, tmp_path, state_path):
    """A role that cannot see other sessions falls back to `settle`, with one warning per run."""
    role = "syncd_nostats_" + os.urandom(4).hex()
    url = sa.make_url(pg_crm.url)
    schema = url.query["options"].removeprefix("-csearch_path=")
    with pg_crm.engine.begin() as conn:
        conn.execute(sa.text(f"CREATE ROLE {role} LOGIN PASSWORD 'pw-{role}'"))
        conn.execute(sa.text(f'GRANT USAGE ON SCHEMA "{schema}" TO {role}'))
        conn.execute(sa.text(f'GRANT SELECT ON "{schema}".contacts TO {role}'))
    try:
        pg_crm.insert([contact(i) for i in range(1, 31)])
        restricted = url.set(username=role, password=f"pw-{role}").render_as_string(hide_password=False)
        config = write_config(
            tmp_path / "syncd.toml",
            source_url=restricted,
            api_url=api.url,
            state_url=f"sqlite:///{state_path}",
            settle="0.3s",
        )
        code, out, err = cli.once(config)
        assert code == 0, out + err
        assert err.count("open_transaction_gate_unavailable") == 1, err
        assert "pg_read_all_stats" in err
        assert_no_row_lost(pg_crm, api)
    finally:
        with pg_crm.engine.begin() as conn:
            conn.execute(sa.text(f'REVOKE ALL ON ALL TABLES IN SCHEMA "{schema}" FROM {role}'))
            conn.execute(sa.text(f'REVOKE USAGE ON SCHEMA "{schema}" FROM {role}'))
        pg_crm.engine.dispose()
        with sa.create_engine(pg_crm.url).begin() as conn:
            conn.execute(sa.text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"))
            conn.execute(sa.text(f"DROP ROLE {role}"))


def test_once_waits_out_an_open_transaction_instead_of_exiting_empty_handed(pg_crm, api, cli, tmp_path, state_path):
    """Rows committed before `once` started are delivered by that `once`, even while another
    session's transaction holds the read bound back."""
    config = config_for(pg_crm, api, tmp_path, state_path, settle="0s")
    other = sa.create_engine(pg_crm.url)
    with other.connect() as conn:
        transaction = conn.begin()
        conn.execute(sa.text("SELECT 1"))  # a reporting session, idle in transaction
        time.sleep(0.05)
        pg_crm.insert([contact(i) for i in range(1, 11)], stamp=pg_crm.stamp(age=timedelta(0)))
        result: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: result.update(code=main(["once", "-c", str(config), "--no-progress"])))
        thread.start()
        try:
            time.sleep(0.5)
            assert thread.is_alive(), "once exited while rows committed before it were still unread"
            assert stored(api) == {}
        finally:
            transaction.commit()
            thread.join(timeout=70)
    other.dispose()
    cli.outputs += list(cli.capfd.readouterr())
    assert result.get("code") == 0
    assert_no_row_lost(pg_crm, api)
