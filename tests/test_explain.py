"""`syncd preview` and `syncd inspect` as a user runs them: what they show, and that they change nothing."""

from __future__ import annotations

import json
import sqlite3

from syncd.state import StateStore

from .crm import contact, once, write_config
from .test_cli import syncd


def state_dump(path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return list(conn.iterdump())


def test_preview_before_anything_ran_sends_nothing_and_creates_no_state(crm, api, state_url, tmp_path):
    crm.insert([contact(i) for i in range(1, 6)] + [contact(6, phone="12")])
    config = write_config(tmp_path / "syncd.toml", source_url=crm.url, api_url=api.url, state_url=state_url)

    result = syncd("preview", "-c", str(config), "--sync", "contacts", "--json")
    assert result.returncode == 0, result.stderr
    preview = json.loads(result.stdout)
    assert preview["state_database"] is False and preview["rows"] == 6
    assert [entry["key"] for entry in preview["would_send"]] == ["1", "2", "3", "4", "5"]
    assert preview["would_send"][0]["record"] == {
        "msisdn": "+442079460001",
        "firstname": "First1",
        "lastname": "Last1",
        "emailid": "person1@example.com",
        "accountid": "acct-1",
    }
    assert preview["unchanged"] == []
    (rejected,) = preview["rejected"]
    assert rejected["key"] == "6" and "msisdn" in rejected["reason"] and rejected["row"]["phone"] == "12"

    limited = json.loads(syncd("preview", "-c", str(config), "--sync", "contacts", "--limit", "2", "--json").stdout)
    assert limited["rows"] == 2

    text = syncd("preview", "-c", str(config), "--sync", "contacts").stdout
    assert "would be sent: 5" in text and "rejected: would be dead letters: 1" in text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert api.requests() == []
    assert not (tmp_path / "state.db").exists()


def test_preview_after_a_sync_tells_pending_from_unchanged(crm, api, state_url, tmp_path):
    crm.insert([contact(i) for i in range(1, 6)])
    config = write_config(tmp_path / "syncd.toml", source_url=crm.url, api_url=api.url, state_url=state_url)
    assert once(config) == 0
    requests = len(api.requests())
    crm.update([2], first_name="Changed")  # a change the next cycle reads
    crm.update([3], bump=False, last_name="Quiet")  # a change only reconcile sees
    before = state_dump(tmp_path / "state.db")

    pending = json.loads(syncd("preview", "-c", str(config), "--sync", "contacts", "--json").stdout)
    assert pending["state_database"] is True and pending["watermark"] is not None
    assert [(e["key"], e["record"]["firstname"]) for e in pending["would_send"]] == [("2", "Changed")]

    keys = ("--key", "1", "--key", "3", "--key", "99")
    by_key = json.loads(syncd("preview", "-c", str(config), "--sync", "contacts", *keys, "--json").stdout)
    assert [e["key"] for e in by_key["unchanged"]] == ["1"]
    assert [e["key"] for e in by_key["would_send"]] == ["3"]
    assert by_key["not_in_model"] == ["99"]

    assert state_dump(tmp_path / "state.db") == before  # no migration, no lease, nothing written
    assert len(api.requests()) == requests


def test_inspect_tells_a_contacts_story(crm, api, state_url, tmp_path):
    crm.insert([contact(1), contact(2, phone="12")])
    config = write_config(tmp_path / "syncd.toml", source_url=crm.url, api_url=api.url, state_url=state_url)

    def inspect(key: str) -> dict:
        result = syncd("inspect", "-c", str(config), "--sync", "contacts", key, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    never = inspect("1")  # before anything ran
    assert never["state_database"] is False and never["record"]["accountid"] == "acct-1"
    assert never["acknowledged"] == {"any": False, "matches_current": None}

    assert once(config) == 0
    sent = inspect("1")
    assert sent["source_row"]["phone"] == "+442079460001"
    assert sent["acknowledged"] == {"any": True, "matches_current": True}
    assert sent["dead_letters"] == []

    bad = inspect("2")
    assert bad["record"] is None and "msisdn" in bad["rejected"]
    assert bad["acknowledged"]["any"] is False
    (letter,) = bad["dead_letters"]
    assert letter["resolution"] is None and "msisdn" in letter["reason"]

    crm.update([2], phone="+44 20 7946 0002")  # fixed in the CRM
    crm.update([1], bump=False, first_name="Edited")  # edited without a watermark bump
    assert inspect("1")["acknowledged"] == {"any": True, "matches_current": False}
    assert once(config) == 0
    fixed = inspect("2")
    assert fixed["acknowledged"] == {"any": True, "matches_current": True}
    assert [letter["resolution"] for letter in fixed["dead_letters"]] == ["delivered"]

    text = syncd("inspect", "-c", str(config), "--sync", "contacts", "2").stdout
    assert "acknowledged: yes, the same record as now" in text and "delivered at" in text
    assert max(len(line) for line in text.splitlines()) <= 80

    gone = syncd("inspect", "-c", str(config), "--sync", "contacts", "404")
    assert gone.returncode == 0 and "not in the model" in gone.stdout
    bad_key = syncd("inspect", "-c", str(config), "--sync", "contacts", "not-a-number")
    assert bad_key.returncode == 1 and "not-a-number" in bad_key.stderr and "Traceback" not in bad_key.stderr
    assert StateStore(state_url).lease_holder("contacts") == (None, None)
