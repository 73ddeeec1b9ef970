"""The core pipeline end to end: a real source database, `syncd once`, the simulator over HTTP."""

from __future__ import annotations

from datetime import timedelta

from syncd.state import StateStore

from .crm import contact, once, pushed_records, stored


def test_backfill_delivers_every_row_mapped(crm, api, state_url, syncd_config):
    crm.insert([contact(i) for i in range(1, 51)])
    config = syncd_config(crm.url)

    assert once(config) == 0

    api.wait_inserted("1466", 50)
    records = stored(api)
    assert len(records) == 50
    assert records["acct-7"] == {
        "msisdn": "+442079460007",
        "firstname": "First7",
        "lastname": "Last7",
        "emailid": "person7@example.com",
        "accountid": "acct-7",
    }
    status = StateStore(state_url).status()[0]
    assert status.records_sent == 50 and status.state == "ok"


def test_only_real_changes_are_sent(crm, api, syncd_config):
    crm.insert([contact(i) for i in range(1, 21)])
    config = syncd_config(crm.url)
    assert once(config) == 0
    assert pushed_records(api) == 20

    crm.update([3], first_name="Changed")  # a real change
    crm.update([4], email="PERSON4@example.com")  # bumps the watermark, same mapped payload
    crm.update([5])  # bumps the watermark only
    assert once(config) == 0

    assert pushed_records(api) == 21
    api.wait_inserted("1466", 21)
    assert stored(api)["acct-3"]["firstname"] == "Changed"

    assert once(config) == 0  # nothing new: nothing sent
    assert pushed_records(api) == 21


def test_rows_sharing_one_watermark_across_batches_all_arrive(crm, api, syncd_config):
    same = crm.stamp(age=timedelta(seconds=5))
    crm.insert([contact(i) for i in range(1, 3001)], stamp=same)
    config = syncd_config(crm.url, batch=7)

    assert once(config) == 0

    api.wait_inserted("1466", 3000)
    assert len(stored(api)) == 3000
    assert pushed_records(api) == 3000  # each exactly once


def test_restarted_once_resumes_without_sending_twice(crm, api, state_url, syncd_config):
    crm.insert([contact(i) for i in range(1, 101)])
    config = syncd_config(crm.url, batch=10, in_flight=1, api={"max_attempts": 2})
    # The 4th batch gets a 500 on both attempts: the first three land, the run fails.
    passes = {"delay_s": 0}
    api.queue_faults(passes, passes, passes, {"status": 500}, {"status": 500})
    assert once(config) == 1
    assert pushed_records(api) == 30
    state = StateStore(state_url)
    # A first backfill sets the watermark at its end; the digests hold what landed.
    assert state.cursor("contacts") is None
    assert state.digest_count("contacts") == 30
    assert state.status()[0].state == "failing"

    assert once(config) == 0  # resumes: rows 1-30 are found unchanged, nothing is sent twice
    api.wait_inserted("1466", 100)
    assert len(stored(api)) == 100
    assert pushed_records(api) == 100
