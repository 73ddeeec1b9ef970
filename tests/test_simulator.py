"""The Add-contacts API simulator, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from syncd.simulator import (
    ADD_CONTACTS_PATH,
    RunningSimulator,
    SimulatorConfig,
    start_in_thread,
)

from .crm import wait_for

TOKEN = "demo-token"
# One pooled client keeps requests at about a millisecond, which the rate-limit test needs.
client = httpx.Client()


@pytest.fixture(autouse=True, scope="module")
def _close_client() -> Iterator[None]:
    yield
    client.close()


@pytest.fixture
def sim() -> Iterator[RunningSimulator]:
    with start_in_thread() as running:
        yield running


def contacts(*msisdns: str, **extra: Any) -> list[dict[str, Any]]:
    return [{"msisdn": m, "firstname": "John Smith", **extra} for m in msisdns]


def push(
    sim: RunningSimulator,
    records: Any,
    *,
    token: str | None = TOKEN,
    datastore: str | None = "1466",
    timeout: float = 5,
) -> httpx.Response:
    body: dict[str, Any] = {"feed-id": "1499", "records": records}
    if datastore is not None:
        body["datastore-id"] = datastore
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return client.post(sim.url, json=body, headers=headers, timeout=timeout)


def test_ack_then_asynchronous_insert_keeps_latest_record_per_msisdn(sim: RunningSimulator) -> None:
    first = push(sim, contacts("+442332223424", "+442332223425"))
    second = push(sim, [{"msisdn": "+442332223424", "firstname": "Jane"}])

    assert first.status_code == 200
    ack = first.json()
    assert ack["statuscode"] == 0
    assert len(ack["trans_id"]) == 32 and ack["trans_id"] != second.json()["trans_id"]
    assert ack["result"]["status"] == 0 and len(ack["result"]["correlation_id"]) == 36
    sim.wait_inserted("1466", 3)
    assert sim.received("1466") == 3
    assert sorted(sim.records("1466"), key=lambda r: r["msisdn"]) == [
        {"msisdn": "+442332223424", "firstname": "Jane"},
        {"msisdn": "+442332223425", "firstname": "John Smith"},
    ]
    log = sim.requests()
    assert [(e["status"], e["statuscode"], e["records"], e["key"]) for e in log] == [
        (200, 0, 2, "key#1"),
        (200, 0, 1, "key#1"),
    ]
    assert log[0]["trans_id"] == ack["trans_id"]


def test_insert_happens_after_the_ack() -> None:
    with start_in_thread(SimulatorConfig(insert_delay_s=0.3)) as sim:
        assert push(sim, contacts("+1")).json()["statuscode"] == 0
        assert sim.records("1466") == []
        sim.wait_inserted("1466", 1, timeout=2)
        assert sim.records("1466") == contacts("+1")


def test_authorization_failed_for_missing_or_unknown_key(sim: RunningSimulator) -> None:
    for token in (None, "not-a-key"):
        response = push(sim, contacts("+1"), token=token)
        assert response.status_code == 401
        assert response.json()["statuscode"] == 430
        assert response.json()["description"].startswith("Authorization failed.")
    assert sim.received("1466") == 0
    assert [e["key"] for e in sim.requests()] == ["none", "unknown"]


def test_key_rotation_expires_the_old_key(sim: RunningSimulator) -> None:
    sim.set_tokens(valid=[TOKEN, "key-2"])  # both valid during the rotation
    assert push(sim, contacts("+1")).status_code == 200
    assert push(sim, contacts("+2"), token="key-2").status_code == 200

    sim.set_tokens(valid=["key-2"], expired=[TOKEN])
    expired = push(sim, contacts("+3"))
    assert expired.status_code == 498
    assert expired.json() == {"statuscode": 498, "description": "Invalid token or Access token expired"}
    assert push(sim, contacts("+4"), token="key-2").status_code == 200

    log = sim.requests()
    assert [e["key"] for e in log] == ["key#1", "key#2", "key#1", "key#2"]
    assert TOKEN not in repr(log) and "key-2" not in repr(log)  # only labels, never keys


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_other_methods_are_not_supported(sim: RunningSimulator, method: str) -> None:
    response = client.request(method, sim.url, headers={"authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 405
    assert response.json() == {"statuscode": 405, "description": "Method not supported"}


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"{not json", "Invalid input JSON"),
        (b'["a list"]', "JSON object"),
        (b'{"datastore-id": "1466", "records": [{"msisdn": "+1"}]}', "feed-id"),
        (b'{"feed-id": 1499, "datastore-id": "1466", "records": [{"msisdn": "+1"}]}', "feed-id"),
        (b'{"feed-id": "1499", "datastore-id": 1466, "records": [{"msisdn": "+1"}]}', "datastore-id"),
        (b'{"feed-id": "1499", "datastore-id": "1466", "records": []}', "records"),
        (b'{"feed-id": "1499", "datastore-id": "1466", "records": ["+1"]}', "record 0"),
        (b'{"feed-id": "1499", "records": [{"msisdn": "+1"}, {"msisdn": "+2", "tags": ["a"]}]}', "record 1: tags"),
    ],
)
def test_invalid_input_json(sim: RunningSimulator, body: bytes, says: str) -> None:
    response = client.post(sim.url, content=body, headers={"authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 400
    assert response.json()["statuscode"] == 1001
    assert response.json()["description"].startswith("Invalid input JSON: ")
    assert says in response.json()["description"]


def test_missing_mandatory_field_rejects_the_whole_request(sim: RunningSimulator) -> None:
    records = [*contacts("+1", "+2", "+3"), {"firstname": "No Phone"}, {"msisdn": "", "firstname": "Empty"}]
    response = push(sim, records)
    assert response.status_code == 400
    assert response.json() == {"statuscode": 1002, "description": "Mandatory field missing: msisdn (record 3)"}
    assert push(sim, contacts("+9")).status_code == 200
    sim.wait_inserted("1466", 1)  # inserts run in order: one for the refused request would have run first
    assert sim.received("1466") == 1 and [r["msisdn"] for r in sim.records("1466")] == ["+9"]


def test_mandatory_attributes_are_configurable() -> None:
    with start_in_thread(SimulatorConfig(mandatory=("msisdn", "emailid"))) as sim:
        response = push(sim, [{"msisdn": "+1", "emailid": "a@example.com"}, {"msisdn": "+2"}])
        assert response.json()["description"] == "Mandatory field missing: emailid (record 1)"


def test_too_many_records() -> None:
    with start_in_thread(SimulatorConfig(max_records=2)) as sim:
        assert push(sim, contacts("+1", "+2")).status_code == 200
        response = push(sim, contacts("+1", "+2", "+3"))
        assert response.status_code == 413
        assert response.json()["statuscode"] == 413
        assert "at most 2" in response.json()["description"]


def test_unknown_datastore_gets_an_ack_without_result_and_stores_nothing() -> None:
    with start_in_thread(SimulatorConfig(datastores=("1466",))) as sim:
        for datastore in ("9999", None):
            ack = push(sim, contacts("+1"), datastore=datastore)
            assert ack.status_code == 200
            assert ack.json().keys() == {"statuscode", "trans_id"}
            assert ack.json()["statuscode"] == 0
        assert "result" in push(sim, contacts("+1")).json()
        sim.wait_inserted("1466", 1)
        assert sim.received("9999") == 0 and sim.records("9999") == []


def test_rate_limit_per_key_with_retry_after() -> None:
    with start_in_thread(SimulatorConfig(rate_limit=2, tokens=(TOKEN, "key-2"))) as sim:
        assert [push(sim, contacts("+1")).status_code for _ in range(2)] == [200, 200]
        throttled = push(sim, contacts("+1"))
        assert throttled.status_code == 429
        assert throttled.json() == {
            "statuscode": 429,
            "description": "Too many requests. Throttle limit reached for the time window.",
        }
        assert throttled.headers["retry-after"] == "1"  # whole seconds unless configured
        assert push(sim, contacts("+2"), token="key-2").status_code == 200  # own budget per key

        sim.set_faults(rate_limit=10, retry_after=0.2)
        statuses = [push(sim, contacts("+1")).status_code for _ in range(15)]
        assert statuses[:10] == [200] * 10 and 429 in statuses  # a burst of 10, then throttled
        throttled = push(sim, contacts("+1"))
        assert throttled.headers["retry-after"] == "0.2"
        time.sleep(0.2)
        assert push(sim, contacts("+1")).status_code == 200  # honouring Retry-After works


def test_scripted_faults_are_served_in_order(sim: RunningSimulator) -> None:
    sim.queue_faults(
        {"status": 500},
        {"status": 429, "retry_after": 3},
        {"status": 200, "code": 1010},
        {"status": 499, "description": "Request failed: backend busy"},
        {"drop": True},
    )
    answers = [push(sim, contacts("+1")) for _ in range(4)]
    assert [(r.status_code, r.json()["statuscode"]) for r in answers] == [(500, 500), (429, 429), (200, 1010), (499, 499)]
    assert answers[0].json()["description"] == "Internal server error"
    assert answers[1].headers["retry-after"] == "3"
    assert answers[2].json()["description"] == "The request was not processed."
    assert answers[3].json()["description"] == "Request failed: backend busy"
    with pytest.raises(httpx.RemoteProtocolError):
        push(sim, contacts("+1"))
    assert push(sim, contacts("+1")).status_code == 200  # queue exhausted: normal again

    sim.wait_inserted("1466", 1)
    assert sim.received("1466") == 1  # none of the faulted requests stored anything
    log = sim.requests()
    assert [e["status"] for e in log] == [500, 429, 200, 499, None, 200]
    assert [e["fault"] for e in log] == ["scripted"] * 5 + [None]
    assert log[4]["records"] == 1  # what the dropped request carried is still logged
    assert sim.stats()["by_status"] == {"500": 1, "429": 1, "200": 2, "499": 1, "dropped": 1}


def test_accepted_then_client_timed_out(sim: RunningSimulator) -> None:
    """The server stores the batch but answers too late: the client cannot know."""
    sim.queue_faults({"accept_then_delay_s": 1})
    with pytest.raises(httpx.ReadTimeout):
        push(sim, contacts("+1", "+2"), timeout=0.3)
    sim.wait_inserted("1466", 2, timeout=1)
    assert len(sim.records("1466")) == 2


def test_scripted_delay_then_normal_processing(sim: RunningSimulator) -> None:
    sim.queue_faults({"delay_s": 0.3})
    started = time.monotonic()
    assert push(sim, contacts("+1")).json()["statuscode"] == 0
    assert time.monotonic() - started >= 0.3


def test_random_faults() -> None:
    with start_in_thread(SimulatorConfig(fail_rate=1.0)) as sim:
        response = push(sim, contacts("+1"))
        assert response.status_code == 500
        assert response.json() == {"statuscode": 500, "description": "Internal server error"}

        sim.set_faults(fail_rate=0.0, not_processed_rate=1.0)
        response = push(sim, contacts("+1"))
        assert (response.status_code, response.json()["statuscode"]) == (200, 1010)

        sim.set_faults(not_processed_rate=0.0, drop_rate=1.0)
        with pytest.raises(httpx.RemoteProtocolError):
            push(sim, contacts("+1"))
        time.sleep(0.05)
        assert sim.received("1466") == 0
        assert [e["fault"] for e in sim.requests()] == ["random"] * 3


def test_seeded_faults_are_reproducible() -> None:
    def statuses(seed: int) -> list[int]:
        with start_in_thread(SimulatorConfig(fail_rate=0.5, seed=seed)) as sim:
            return [push(sim, contacts("+1")).status_code for _ in range(20)]

    first = statuses(7)
    assert first == statuses(7)
    assert {200, 500} == set(first)


def test_latency_is_added_to_every_request() -> None:
    with start_in_thread(SimulatorConfig(latency_s=0.2)) as sim:
        started = time.monotonic()
        push(sim, contacts("+1"))
        assert time.monotonic() - started >= 0.2


def test_count_store_keeps_only_counters() -> None:
    with start_in_thread(SimulatorConfig(store="count")) as sim:
        push(sim, contacts("+1", "+2"))
        push(sim, contacts("+1"))
        sim.wait_inserted("1466", 3)
        assert sim.records("1466") == []
        assert sim.stats()["records_accepted"] == 3


def test_records_without_the_key_attribute_are_all_kept() -> None:
    with start_in_thread(SimulatorConfig(mandatory=(), key_attribute="emailid")) as sim:
        push(sim, [{"msisdn": "+1"}, {"msisdn": "+2"}, {"emailid": "a@x"}, {"emailid": "a@x", "msisdn": "+3"}])
        sim.wait_inserted("1466", 4)
        assert len(sim.records("1466")) == 3


def test_control_endpoints(sim: RunningSimulator) -> None:
    base = sim.base_url
    assert client.get(f"{base}/_sim/health").status_code == 200

    faults = client.post(f"{base}/_sim/faults", json={"queue": [{"status": 500}], "latency_s": 0.01})
    assert faults.status_code == 200
    assert faults.json()["queue"] == [{"status": 500}] and faults.json()["latency_s"] == 0.01
    for bad in ({"fail_rate": 2}, {"bogus": 1}, {"queue": [{"nothing": 1}]}, [1]):
        response = client.post(f"{base}/_sim/faults", json=bad)
        assert response.status_code == 400, bad
    assert client.get(f"{base}/_sim/faults").json()["queue"] == [{"status": 500}]  # bad posts changed nothing

    assert push(sim, contacts("+1")).status_code == 500
    assert client.post(f"{base}/_sim/tokens", json={"valid": ["new"], "expired": [TOKEN]}).status_code == 200
    assert push(sim, contacts("+1")).status_code == 498
    assert push(sim, contacts("+1", "+2"), token="new").status_code == 200
    sim.wait_inserted("1466", 2)

    stored = client.get(f"{base}/_sim/records", params={"datastore-id": "1466"}).json()
    assert stored["received"] == 2 and len(stored["records"]) == 2
    assert client.get(f"{base}/_sim/records").status_code == 400
    log = client.get(f"{base}/_sim/requests").json()["requests"]
    assert [e["status"] for e in log] == [500, 498, 200]
    stats = client.get(f"{base}/_sim/stats").json()
    assert stats["by_status"] == {"500": 1, "498": 1, "200": 1}
    assert stats["by_statuscode"] == {"500": 1, "498": 1, "0": 1}
    assert stats["records_accepted"] == 2

    client.post(f"{base}/_sim/faults", json={"queue": [{"status": 500}]})
    assert client.post(f"{base}/_sim/reset").status_code == 200
    assert sim.records("1466") == [] and sim.requests() == []
    assert push(sim, contacts("+1"), token="new").status_code == 200  # queue cleared, tokens kept


def test_invalid_settings_are_refused(sim: RunningSimulator) -> None:
    with pytest.raises(ValueError, match="fail_rate"):
        SimulatorConfig(fail_rate=1.5)
    with pytest.raises(ValueError, match="store"):
        SimulatorConfig(store="disk")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown setting"):
        sim.set_faults(tokens=("x",))
    with pytest.raises(ValueError, match="exactly one"):
        sim.queue_faults({"status": 500, "drop": True})


def test_port_in_use_is_reported(sim: RunningSimulator) -> None:
    port = int(sim.base_url.rsplit(":", 1)[1])
    with pytest.raises(OSError):
        start_in_thread(port=port)


def test_cli_prints_its_url_and_stops_on_sigterm() -> None:
    code = (
        "import argparse, sys\n"
        "from syncd.simulator import add_cli_arguments, run_from_args\n"
        "parser = argparse.ArgumentParser()\n"
        "add_cli_arguments(parser)\n"
        "sys.exit(run_from_args(parser.parse_args(sys.argv[1:])))\n"
    )
    args = ["--port", "0", "--token", "cli-key", "--datastore", "1466", "--rate-limit", "100", "--seed", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        url = proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert url.startswith("http://127.0.0.1:") and url.endswith(ADD_CONTACTS_PATH)
        assert not url.endswith(":0" + ADD_CONTACTS_PATH)
        body = {"datastore-id": "1466", "feed-id": "1499", "records": contacts("+1")}
        ack = httpx.post(url, json=body, headers={"authorization": "Bearer cli-key"}).json()
        assert ack["statuscode"] == 0 and "result" in ack
        assert httpx.post(url, json=body, headers={"authorization": f"Bearer {TOKEN}"}).status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=5)
    assert proc.returncode == 0, err
    assert out == ""  # exactly one line, already read


def test_cli_rejects_bad_options() -> None:
    code = (
        "import argparse\n"
        "from syncd.simulator import add_cli_arguments\n"
        "parser = argparse.ArgumentParser()\n"
        "add_cli_arguments(parser)\n"
        "parser.parse_args(['--fail-rate', '2'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=10)
    assert proc.returncode == 2
    assert "--fail-rate" in proc.stderr and "between 0 and 1" in proc.stderr


def test_random_throttling_and_stalls_after_the_accept_switch_at_run_time() -> None:
    with start_in_thread(SimulatorConfig(store="history", retry_after=0.2)) as sim:
        sim.set_faults(throttle_rate=1.0)
        response = push(sim, contacts("+1"))
        assert (response.status_code, response.headers["Retry-After"]) == (429, "0.2")

        sim.set_faults(throttle_rate=0.0, stall_rate=1.0, stall_s=0.6)
        with pytest.raises(httpx.ReadTimeout):
            push(sim, contacts("+1", "+2"), timeout=0.3)
        sim.wait_inserted("1466", 2, timeout=1)  # stored although the client gave up

        sim.set_faults(stall_rate=0.0)
        assert push(sim, contacts("+1")).json()["statuscode"] == 0
        sim.wait_inserted("1466", 3)
        # The stalled request is logged when it answers, after the one that followed it.
        wait_for(lambda: len(sim.requests()) == 3, what="the stalled request to answer")
        assert sorted(str(e["fault"]) for e in sim.requests()) == ["None", "random", "random"]
        assert [r["msisdn"] for r in sim.history("1466")] == ["+1", "+2", "+1"]  # duplicates kept, in order
        assert len(sim.records("1466")) == 2
        with pytest.raises(ValueError, match="add up"):
            sim.set_faults(fail_rate=0.6, stall_rate=0.6)


def test_history_endpoint() -> None:
    with start_in_thread(SimulatorConfig(store="history")) as sim:
        push(sim, contacts("+1"))
        push(sim, contacts("+1"))
        sim.wait_inserted("1466", 2)
        body = client.get(f"{sim.base_url}/_sim/history", params={"datastore-id": "1466"}).json()
        assert [r["msisdn"] for r in body["records"]] == ["+1", "+1"]
        assert client.get(f"{sim.base_url}/_sim/history").status_code == 400
        assert client.post(f"{sim.base_url}/_sim/faults", json={"stall_rate": 0.5, "stall_s": 2}).json()["stall_s"] == 2


def test_start_over_serves_on_as_if_just_started_with_the_new_settings(sim: RunningSimulator) -> None:
    sim.set_tokens(["old-key", TOKEN])
    assert push(sim, contacts("+1"), token="old-key").status_code == 200
    sim.set_faults(fail_rate=1.0)
    sim.queue_faults({"status": 500})

    url = sim.url
    sim.start_over(SimulatorConfig(tokens=("new-key",), key_attribute="firstname"))

    assert sim.url == url and sim.requests() == [] and sim.records("1466") == []
    assert push(sim, contacts("+2"), token=TOKEN).status_code == 401  # the old keys are gone
    assert push(sim, contacts("+3", "+4"), token="new-key").status_code == 200  # no fault left
    sim.wait_inserted("1466", 2)
    assert [e["key"] for e in sim.requests()][-1] == "key#1"  # labels start again
    assert sim.records("1466") == [{"msisdn": "+4", "firstname": "John Smith"}]  # keyed by firstname now
