"""The commands as an operator uses them: status, reset, migrate, simulate-api, demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta

import httpx

from syncd.cli import main

from .crm import TOKEN, Crm, contact, write_config
from .test_pipeline import api, once, pushed_records, state_url, stored  # noqa: F401  (fixtures)


def syncd(*args: str, cwd=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncd.cli", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_status_json_follows_the_contract(sqlite_url, api, state_url, tmp_path):  # noqa: F811
    crm = Crm(sqlite_url)
    crm.insert([contact(i) for i in range(1, 6)])
    crm.insert([contact(6, phone="not a phone")])
    config = write_config(tmp_path / "syncd.toml", source_url=sqlite_url, api_url=api.url, state_url=state_url)

    before = json.loads(syncd("status", "-c", str(config), "--json").stdout)
    assert before == {
        "syncs": [
            {
                "name": "contacts",
                "state": "never_run",
                "watermark": None,
                "last_run_at": None,
                "last_error": None,
                "records_sent": 0,
                "backlog": 6,
                "dead_letters": 0,
                "running": False,
                "progress": None,
                "owner": None,
                "last_success_at": None,
            }
        ]
    }
    assert once(config) == 0
    crm.insert([contact(7)], stamp=crm.stamp(age=timedelta(seconds=-3600)))  # in the future: not yet read
    (after,) = json.loads(syncd("status", "-c", str(config), "--json").stdout)["syncs"]
    assert after["state"] == "ok"
    assert after["records_sent"] == 5
    assert after["dead_letters"] == 1
    assert after["backlog"] == 1
    assert after["watermark"] is not None and after["last_run_at"] is not None
    assert after["last_success_at"] == after["last_run_at"] and after["running"] is False

    table = syncd("status", "-c", str(config)).stdout
    assert table.splitlines()[0].split()[:3] == ["SYNC", "STATE", "WATERMARK"]
    assert "contacts" in table and " ok " in table
    crm.dispose()


def test_reset_resends_from_the_start_or_from_a_value(sqlite_url, api, state_url, tmp_path):  # noqa: F811
    crm = Crm(sqlite_url, watermark="int")
    for i in range(1, 11):
        crm.insert([contact(i)])  # watermarks 1..10
    config = write_config(tmp_path / "syncd.toml", source_url=sqlite_url, api_url=api.url, state_url=state_url)
    assert once(config) == 0
    assert pushed_records(api) == 10

    assert main(["reset", "-c", str(config), "--sync", "contacts", "--to", "8"]) == 0
    assert once(config) == 0
    assert pushed_records(api) == 13  # 8, 9 and 10 again: --to is inclusive

    assert main(["reset", "-c", str(config), "--sync", "contacts", "--keep-digests"]) == 0
    assert once(config) == 0
    assert pushed_records(api) == 13  # re-read, but nothing changed: nothing sent

    assert main(["reset", "-c", str(config), "--sync", "contacts"]) == 0
    assert once(config) == 0
    assert pushed_records(api) == 23
    crm.dispose()


def test_unknown_sync_and_bad_reset_value_exit_2(sqlite_url, api, state_url, tmp_path, capsys):  # noqa: F811
    Crm(sqlite_url).dispose()
    config = write_config(tmp_path / "syncd.toml", source_url=sqlite_url, api_url=api.url, state_url=state_url)
    assert main(["reset", "-c", str(config), "--sync", "nope"]) == 2
    assert "no sync named 'nope'" in capsys.readouterr().err
    assert main(["reset", "-c", str(config), "--sync", "contacts", "--to", "yesterday"]) == 2
    assert "--to 'yesterday'" in capsys.readouterr().err
    assert main(["once", "-c", str(config), "--sync", "nope"]) == 2


def test_migrate_creates_and_reports_the_schema(tmp_path, api):  # noqa: F811
    config = write_config(
        tmp_path / "syncd.toml", source_url=f"sqlite:///{tmp_path}/crm.db", api_url=api.url, state_url=f"sqlite:///{tmp_path}/s.db"
    )
    result = syncd("migrate", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout
    assert (tmp_path / "s.db").exists()


def test_simulate_api_command_serves_the_endpoint(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "syncd.cli", "simulate-api", "--port", "0", "--token", TOKEN],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = process.stdout.readline().strip()
        ok = httpx.post(
            url,
            json={"datastore-id": "1", "feed-id": "2", "records": [{"msisdn": "+442079460001"}]},
            headers={"authorization": f"Bearer {TOKEN}"},
        )
        assert ok.status_code == 200 and ok.json()["statuscode"] == 0 and ok.json()["trans_id"]
        refused = httpx.post(url, json={"feed-id": "2", "records": [{"msisdn": "+1"}]}, headers={"authorization": "Bearer wrong"})
        assert (refused.status_code, refused.json()["statuscode"]) == (401, 430)
    finally:
        process.terminate()
        process.wait(10)


def test_demo_runs_end_to_end(tmp_path):
    result = syncd("demo", "--rows", "60", "--dir", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "contacts in the datastore        : 60 of 60" in result.stdout
    assert "rows skipped as unchanged        : 4" in result.stdout
    assert "(1 resolved by the fix)" in result.stdout


def test_no_command_or_unknown_flag_is_usage_error():
    assert syncd().returncode == 2
    assert syncd("once").returncode == 2  # -c is required
    assert "required" in syncd("once").stderr
    env_bad = subprocess.run(
        [sys.executable, "-m", "syncd.cli", "status", "-c", "/nonexistent.toml"],
        capture_output=True,
        text=True,
        env={**os.environ},
    )
    assert env_bad.returncode == 2 and "cannot read config" in env_bad.stderr and "Traceback" not in env_bad.stderr
