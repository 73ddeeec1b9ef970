"""`syncd preview` and `syncd inspect` as a user runs them: what they show, and that they change nothing."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime

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
    assert never["acknowledged"]["any"] is False and never["acknowledged"]["matches_current"] is None
    assert never["acknowledged"]["trans_id"] is None and never["removed"] is None

    started = datetime.now(UTC)
    assert once(config) == 0
    (request,) = api.requests()  # key 2 is refused by the mapping: one request, key 1 alone
    sent = inspect("1")
    assert sent["source_row"]["phone"] == "+442079460001"
    ack = sent["acknowledged"]
    assert ack["any"] is True and ack["matches_current"] is True and ack["before_push_tracking"] is False
    assert ack["trans_id"] == request["trans_id"]  # what the API answered for the push that carried it
    assert started <= datetime.fromisoformat(ack["at"]) <= datetime.now(UTC)
    listed = json.loads(syncd("pushes", "-c", str(config), "--json").stdout)["pushes"]
    assert [push for push in listed if push["trans_id"] == request["trans_id"]] == [ack["push"]]
    assert sent["dead_letters"] == []

    bad = inspect("2")
    assert bad["record"] is None and "msisdn" in bad["rejected"]
    assert bad["acknowledged"]["any"] is False
    (letter,) = bad["dead_letters"]
    assert letter["resolution"] is None and "msisdn" in letter["reason"]

    crm.update([2], phone="+44 20 7946 0002")  # fixed in the CRM
    crm.update([1], bump=False, first_name="Edited")  # edited without a watermark bump
    edited = inspect("1")["acknowledged"]
    assert edited["matches_current"] is False and edited["trans_id"] == request["trans_id"]
    assert once(config) == 0
    fixed = inspect("2")
    assert fixed["acknowledged"]["matches_current"] is True
    assert fixed["acknowledged"]["trans_id"] == api.requests()[-1]["trans_id"] != request["trans_id"]
    assert [letter["resolution"] for letter in fixed["dead_letters"]] == ["delivered"]

    text = syncd("inspect", "-c", str(config), "--sync", "contacts", "2").stdout
    assert "acknowledged: yes, the same record as now" in text and "delivered at" in text
    assert f"trans_id {fixed['acknowledged']['trans_id']}" in text
    assert max(len(line) for line in text.splitlines()) <= 80

    gone = syncd("inspect", "-c", str(config), "--sync", "contacts", "404")
    assert gone.returncode == 0 and "not in the model" in gone.stdout
    bad_key = syncd("inspect", "-c", str(config), "--sync", "contacts", "not-a-number")
    assert bad_key.returncode == 1 and "not-a-number" in bad_key.stderr and "Traceback" not in bad_key.stderr
    assert StateStore(state_url).lease_holder("contacts") == (None, None)


def test_inspect_names_the_trans_id_of_each_part_of_a_bisected_batch(crm, api, state_url, tmp_path):  # noqa: F811
    """The API refuses the whole batch once: it is split, and each half lands under its own trans_id."""
    crm.insert([contact(i) for i in range(1, 5)])
    config = write_config(tmp_path / "syncd.toml", source_url=crm.url, api_url=api.url, state_url=state_url)
    api.queue_faults({"status": 400, "code": 1001, "description": "Invalid input JSON"})
    assert once(config) == 0

    refused, first, second = api.requests()
    assert (refused["statuscode"], refused["records"]) == (1001, 4)
    assert (first["records"], second["records"]) == (2, 2) and first["trans_id"] != second["trans_id"]

    def acknowledged(key: str) -> dict:
        result = syncd("inspect", "-c", str(config), "--sync", "contacts", key, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["acknowledged"]

    assert [acknowledged(key)["trans_id"] for key in "1234"] == [first["trans_id"]] * 2 + [second["trans_id"]] * 2
    assert acknowledged("1")["push_id"] != acknowledged("3")["push_id"]
    assert acknowledged("3")["push"]["records"] == 2

    text = syncd("inspect", "-c", str(config), "--sync", "contacts", "3").stdout
    assert f"trans_id {second['trans_id']}" in text and "2 records  ack" in text


def test_inspect_says_a_key_acknowledged_before_push_tracking_is_not_attributed(crm, api, state_url, tmp_path):  # noqa: F811
    crm.insert([contact(1)])
    config = write_config(tmp_path / "syncd.toml", source_url=crm.url, api_url=api.url, state_url=state_url)
    assert once(config) == 0
    with sqlite3.connect(tmp_path / "state.db") as conn:  # as migration 0005 leaves an older key
        conn.execute("UPDATE digests SET push_id = NULL")

    story = json.loads(syncd("inspect", "-c", str(config), "--sync", "contacts", "1", "--json").stdout)
    ack = story["acknowledged"]
    assert ack["any"] is True and ack["matches_current"] is True and ack["before_push_tracking"] is True
    assert ack["trans_id"] is None and ack["at"] is None and ack["push"] is None
    text = syncd("inspect", "-c", str(config), "--sync", "contacts", "1").stdout
    assert "acknowledged before push tracking" in text


def test_inspect_tells_when_and_why_a_contact_left_the_model(crm, api, state_url, tmp_path):  # noqa: F811
    crm.insert([contact(1)])
    config = write_config(
        tmp_path / "syncd.toml",
        source_url=crm.url,
        api_url=api.url,
        state_url=state_url,
        extra_sync="filter = \"first_name <> 'Gone'\"",
    )
    assert once(config) == 0
    assert json.loads(syncd("inspect", "-c", str(config), "--sync", "contacts", "1", "--json").stdout)["removed"] is None
    crm.update([1], first_name="Gone")  # e.g. a soft delete
    assert once(config) == 0

    story = json.loads(syncd("inspect", "-c", str(config), "--sync", "contacts", "1", "--json").stdout)
    assert story["removed"]["reason"] == "filter" and story["removed"]["at"] is not None
    assert story["acknowledged"]["any"] is False  # its digest went with the removal
    text = syncd("inspect", "-c", str(config), "--sync", "contacts", "1").stdout
    assert "removed at" in text and "filter" in text
