"""Reconcile: a full compare that maps only rows whose source changed, on every source database."""

from __future__ import annotations

from syncd.cli import main
from syncd.state import StateStore

from .crm import Crm, contact, once, pushed_records, stored


def reconcile(config, capsys) -> str:
    assert main(["reconcile", "-c", str(config)]) == 0
    return capsys.readouterr().out


def test_reconcile_finds_silent_edits_and_sends_nothing_else(source_url, api, state_url, capsys, syncd_config):
    crm = Crm(source_url)
    crm.insert([contact(i) for i in range(1, 41)])
    config = syncd_config(source_url, batch=7)
    assert once(config) == 0
    capsys.readouterr()

    crm.update([5], bump=False, first_name="Silent")  # the watermark does not move
    crm.update([6], bump=False, email="PERSON6@EXAMPLE.COM")  # the source changes, the payload does not
    assert once(config) == 0 and pushed_records(api) == 40

    out = reconcile(config, capsys)
    assert "compared 40, sent 1, unchanged 39" in out
    api.wait_inserted("1466", 41)
    assert stored(api)["acct-5"]["firstname"] == "Silent"

    state = StateStore(state_url)
    before = state.known_source_hashes("contacts", ["6"])
    assert "compared 40, sent 0, unchanged 40" in reconcile(config, capsys)
    assert state.known_source_hashes("contacts", ["6"]) == before  # row 6's new fingerprint was kept
    assert pushed_records(api) == 41
    crm.dispose()


def test_a_changed_mapping_is_reconciled_in_full_once(sqlite_url, api, capsys, syncd_config):
    crm = Crm(sqlite_url)
    crm.insert([contact(i) for i in range(1, 21)])
    config = syncd_config(sqlite_url)
    assert once(config) == 0
    capsys.readouterr()

    # A new constant attribute changes every payload although no source row changed.
    config.write_text(config.read_text() + 'origin = { value = "crm" }\n')
    assert "compared 20, sent 20" in reconcile(config, capsys)
    api.wait_inserted("1466", 20)
    assert all(record["origin"] == "crm" for record in stored(api).values())

    assert "compared 20, sent 0" in reconcile(config, capsys)  # and the shortcut is armed again
    crm.update([3], bump=False, last_name="Quiet")
    assert "compared 20, sent 1" in reconcile(config, capsys)
    crm.dispose()


def test_reconcile_maps_only_rows_whose_source_changed(source_url, syncd_config):
    from syncd.config import load_config
    from syncd.runtime import Runtime

    crm = Crm(source_url)
    crm.insert([contact(i) for i in range(1, 31)])
    config = load_config(syncd_config(source_url))
    with Runtime.open(config) as runtime:
        runner = runtime.runners["contacts"]
        assert runner.run_cycle().sent == 30
        mapped = []
        real = runner.mapping
        runner.mapping = lambda row: mapped.append(row[0]) or real(row)

        crm.update([12], bump=False, first_name="Silent")
        report = runner.reconcile()

        assert (report.rows_read, report.sent, report.unchanged) == (30, 1, 29)
        assert mapped == [12]
    crm.dispose()


def test_a_new_datastore_gets_every_row_from_reconcile(sqlite_url, api, capsys, syncd_config):
    crm = Crm(sqlite_url)
    crm.insert([contact(i) for i in range(1, 11)])
    config = syncd_config(sqlite_url)
    assert once(config) == 0
    capsys.readouterr()
    config.write_text(config.read_text().replace('datastore_id = "1466"', 'datastore_id = "2001"'))
    assert "compared 10, sent 10" in reconcile(config, capsys)
    api.wait_inserted("2001", 10)
    assert "compared 10, sent 0" in reconcile(config, capsys)
    crm.dispose()
