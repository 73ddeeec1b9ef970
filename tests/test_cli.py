"""The commands as an operator uses them: status, reset, migrate, simulate-api, demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta

import httpx

from syncd.cli import main

from .crm import TOKEN, Crm, contact, once, pushed_records, syncd, write_config


def test_status_json_follows_the_contract(sqlite_url, tmp_path, syncd_config):
    crm = Crm(sqlite_url)
    crm.insert([contact(i) for i in range(1, 6)])
    crm.insert([contact(6, phone="not a phone")])
    config = syncd_config(sqlite_url)

    missing = syncd("status", "-c", str(config), "--json")
    assert missing.returncode == 1 and missing.stdout == ""
    assert f"no state database at {tmp_path / 'state.db'}" in missing.stderr
    assert not (tmp_path / "state.db").exists()  # status never creates one

    assert syncd("migrate", "-c", str(config)).returncode == 0
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
                "removed": 0,
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

    result = syncd("status", "-c", str(config))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "contacts: ok"
    assert "  records sent  5" in lines and "  backlog       1 rows" in lines and "  dead letters  1 open" in lines
    crm.dispose()


def test_reset_resends_from_the_start_or_from_a_value(sqlite_url, api, syncd_config):
    crm = Crm(sqlite_url, watermark="int")
    for i in range(1, 11):
        crm.insert([contact(i)])  # watermarks 1..10
    config = syncd_config(sqlite_url)
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


def test_unknown_sync_and_bad_reset_value_exit_2(sqlite_url, capsys, syncd_config):
    Crm(sqlite_url).dispose()
    config = syncd_config(sqlite_url)
    assert main(["reset", "-c", str(config), "--sync", "nope"]) == 2
    assert "no sync named 'nope'" in capsys.readouterr().err
    assert main(["reset", "-c", str(config), "--sync", "contacts", "--to", "yesterday"]) == 2
    assert "--to 'yesterday'" in capsys.readouterr().err
    assert main(["once", "-c", str(config), "--sync", "nope"]) == 2


def test_migrate_creates_and_reports_the_schema(tmp_path, api):
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


def test_demo_runs_end_to_end(tmp_path, capsys):
    from syncd.demo import run_demo

    # In process with a fast sync loop; `syncd demo` itself paces each step at the 1s interval.
    assert run_demo(rows=60, directory=tmp_path / "demo", cycle_every_s=0.05) == 0
    out = capsys.readouterr().out
    assert "contacts in the datastore        : 60 of 60" in out
    assert "rows skipped as unchanged        : 4" in out
    assert "(1 resolved by the fix)" in out


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


# ---------------------------------------------------------------------------- status: the truth, exit codes


def test_status_from_another_directory_names_the_db_it_looked_for_and_creates_none(sqlite_url, api, tmp_path):
    Crm(sqlite_url).dispose()
    config = write_config(tmp_path / "syncd.toml", source_url=sqlite_url, api_url=api.url, state_url="unused")
    # The default state url: no [state] section at all.
    config.write_text(config.read_text().replace('[state]\nurl = "unused"\n', ""))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "STATE_DIRECTORY"}
    result = subprocess.run(
        [sys.executable, "-m", "syncd.cli", "status", "-c", str(config)],
        capture_output=True, text=True, timeout=120, cwd=elsewhere, env=env,
    )
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert f"no state database at {elsewhere / 'syncd-state.db'}" in line
    assert "STATE_DIRECTORY=/var/lib/syncd" in line
    assert list(elsewhere.iterdir()) == []


def test_status_of_a_db_never_migrated_is_exit_1(sqlite_url, tmp_path, syncd_config):
    Crm(sqlite_url).dispose()
    config = syncd_config(sqlite_url)
    (tmp_path / "state.db").touch()  # e.g. created by hand, or by an older status
    result = syncd("status", "-c", str(config))
    assert result.returncode == 1
    assert "never migrated" in result.stderr and "syncd migrate" in result.stderr
    assert "Traceback" not in result.stderr


def test_status_exits_3_while_a_sync_fails_and_fits_80_columns(sqlite_url, api, syncd_config):
    crm = Crm(sqlite_url)
    crm.insert([contact(i) for i in range(1, 4)])
    config = syncd_config(sqlite_url)
    api.set_tokens(["another-key"])  # ours is revoked
    assert once(config) == 1
    result = syncd("status", "-c", str(config))
    assert result.returncode == 3, result.stderr
    assert result.stdout.splitlines()[0] == "contacts: auth_error"
    assert "last error" in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    assert json.loads(syncd("status", "-c", str(config), "--json").stdout)["syncs"][0]["state"] == "auth_error"

    api.set_tokens([TOKEN])  # the key is back
    assert once(config) == 0
    assert syncd("status", "-c", str(config)).returncode == 0
    crm.dispose()


def test_version():
    result = syncd("--version")
    assert result.returncode == 0
    name, version = result.stdout.split()
    assert name == "syncd" and version[0].isdigit()


# ---------------------------------------------------------------------------- pushes


def test_pushes_lists_what_the_api_answered_newest_first(sqlite_url, api, state_url, tmp_path):
    crm = Crm(sqlite_url)
    crm.insert([contact(i) for i in range(1, 5)])
    crm.insert([contact(5, phone="+44 20 7946 0005")])
    config = write_config(  # one request at a time: the order sent is the order recorded
        tmp_path / "syncd.toml", source_url=sqlite_url, api_url=api.url, state_url=state_url, batch=2, in_flight=1
    )
    api.queue_faults({"status": 500})  # the first request fails once, then is retried
    assert once(config) == 0

    listed = json.loads(syncd("pushes", "-c", str(config), "--json").stdout)["pushes"]
    sent = [entry for entry in api.requests() if entry["status"] is not None]
    assert len(listed) == len(sent) == 4  # 2 + 2 + 1 records, the first batch twice
    acked = [p["trans_id"] for p in listed if p["outcome"] == "ack"]
    assert acked == [e["trans_id"] for e in reversed(sent) if e["status"] == 200]
    assert [p["sent_at"] for p in listed] == sorted((p["sent_at"] for p in listed), reverse=True)
    oldest = listed[-1]
    assert (oldest["outcome"], oldest["http_status"], oldest["api_code"], oldest["attempt"]) == ("retry", 500, 500, 1)
    assert set(oldest) >= {"sync", "sent_at", "records", "description", "trans_id", "correlation_id", "duration_ms"}

    failed = json.loads(syncd("pushes", "-c", str(config), "--failed", "--json").stdout)["pushes"]
    assert [p["http_status"] for p in failed] == [500]
    assert len(json.loads(syncd("pushes", "-c", str(config), "--since", "1h", "--json").stdout)["pushes"]) == 4
    future = syncd("pushes", "-c", str(config), "--since", "2999-01-01T00:00:00", "--json")
    assert json.loads(future.stdout)["pushes"] == []
    assert len(json.loads(syncd("pushes", "-c", str(config), "--limit", "1", "--json").stdout)["pushes"]) == 1

    text = syncd("pushes", "-c", str(config), "--sync", "contacts").stdout
    assert max(len(line) for line in text.splitlines()) <= 80
    assert listed[0]["trans_id"] in text and "HTTP 500" in text
    assert syncd("pushes", "-c", str(config), "--since", "yesterday").returncode == 2
    crm.dispose()


# ---------------------------------------------------------------------------- commands that destroy


def test_discard_without_ids_refuses_and_with_ids_names_them(sqlite_url, syncd_config):
    crm = Crm(sqlite_url)
    crm.insert([contact(1, phone="12"), contact(2, phone="34"), contact(3)])
    config = syncd_config(sqlite_url)
    assert once(config) == 0
    letters = json.loads(syncd("dead-letters", "-c", str(config), "list", "--json").stdout)["dead_letters"]
    assert sorted(letter["key"] for letter in letters) == ["1", "2"]

    refused = syncd("dead-letters", "-c", str(config), "discard")
    assert refused.returncode == 2 and "--all" in refused.stderr
    assert len(json.loads(syncd("dead-letters", "-c", str(config), "list", "--json").stdout)["dead_letters"]) == 2

    first = letters[0]
    named = syncd("dead-letters", "-c", str(config), "discard", str(first["id"]), "999")
    assert named.returncode == 1  # 999 is no open dead letter
    assert f"#{first['id']}" in named.stdout and f"key={first['key']}" in named.stdout and "#999" in named.stdout
    everything = syncd("dead-letters", "-c", str(config), "discard", "--all")
    assert everything.returncode == 0 and "discarded 1 open dead letter(s)" in everything.stdout
    assert json.loads(syncd("dead-letters", "-c", str(config), "list", "--json").stdout)["dead_letters"] == []
    crm.dispose()


def test_reset_refuses_while_another_syncd_holds_the_sync(sqlite_url, state_url, syncd_config):
    from syncd.state import StateStore

    crm = Crm(sqlite_url, watermark="int")
    crm.insert([contact(1)])
    config = syncd_config(sqlite_url)
    assert once(config) == 0
    daemon = StateStore(state_url)  # another live process's lease: this test process is alive
    assert daemon.acquire_lease("contacts", timedelta(minutes=5))
    try:
        refused = syncd("reset", "-c", str(config), "--sync", "contacts")
        assert refused.returncode == 1
        assert daemon.owner in refused.stderr and "UTC" in refused.stderr and "--force" in refused.stderr
        assert daemon.cursor("contacts") is not None  # nothing moved

        forced = syncd("reset", "-c", str(config), "--sync", "contacts", "--force")
        assert forced.returncode == 0, forced.stderr
        assert daemon.cursor("contacts") is None
    finally:
        daemon.close()
    crm.dispose()


def test_demo_refuses_a_directory_it_did_not_make(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    result = syncd("demo", "--rows", "10", "--dir", str(mine))
    assert result.returncode == 2
    assert "not made by `syncd demo`" in result.stderr
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]


def test_demo_reruns_remove_only_what_the_demo_wrote(tmp_path):
    from syncd.demo import DEMO_FILES, MARKER, _prepare

    directory = tmp_path / "demo"
    _prepare(directory)  # a new directory: made and marked
    for name in DEMO_FILES:
        (directory / name).write_text("old")
    (directory / "notes.txt").write_text("the user's")
    _prepare(directory)
    assert sorted(p.name for p in directory.iterdir()) == sorted([MARKER, "notes.txt"])
    assert (directory / "notes.txt").read_text() == "the user's"


# ---------------------------------------------------------------------------- secret files


def test_a_missing_password_or_token_file_is_one_line_naming_the_key(sqlite_url, api, tmp_path, syncd_config):
    Crm(sqlite_url).dispose()
    missing = tmp_path / "credentials" / "crm-password"
    config = syncd_config(sqlite_url)
    config.write_text(config.read_text().replace("[sources.crm]\n", f'[sources.crm]\npassword_file = "{missing}"\n'))
    assert syncd("migrate", "-c", str(config)).returncode == 0
    expected = f"sources.crm.password_file: {missing}: No such file or directory"
    for command in (
        ["once"], ["reconcile"], ["run"], ["reset", "--sync", "contacts"], ["dead-letters", "retry"],
        ["preview", "--sync", "contacts"], ["inspect", "--sync", "contacts", "1"],
    ):
        result = syncd(command[0], "-c", str(config), *command[1:])
        assert result.returncode == 1, (command, result.stderr)
        assert result.stderr == f"syncd: {expected}\n", command
    status = syncd("status", "-c", str(config))  # the state is readable: status still answers
    assert status.returncode == 0 and status.stdout.startswith("contacts: never_run")
    assert expected in status.stderr and "Traceback" not in status.stderr
    check = syncd("check", "-c", str(config))
    assert check.returncode == 1 and expected in check.stdout and "Traceback" not in check.stdout + check.stderr

    no_token = tmp_path / "api-token-gone"
    text = config.read_text().replace(f'password_file = "{missing}"\n', "")
    config.write_text(text.replace(str(tmp_path / "api-token"), str(no_token)))
    result = syncd("once", "-c", str(config))
    assert (result.returncode, result.stderr) == (1, f"syncd: api.token_file: {no_token}: No such file or directory\n")


# ---------------------------------------------------------------------------- progress in a terminal


def run_in_terminal(args: list[str], columns: int) -> str:
    """Run syncd with stdout and stderr on a pseudo-terminal `columns` wide; what the terminal got."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "syncd.cli", *args], stdin=slave, stdout=slave, stderr=slave, close_fds=True
    )
    os.close(slave)
    output = bytearray()
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(master)
    assert process.wait(120) == 0, output.decode(errors="replace")
    return output.decode()


def test_progress_bar_fits_the_terminal_and_log_lines_print_above_it(sqlite_url, syncd_config):
    import re

    crm = Crm(sqlite_url)
    crm.insert([contact(i) for i in range(1, 3001)])
    config = syncd_config(sqlite_url, batch=100)
    config.write_text(config.read_text().replace('level = "warning"', 'level = "info"'))

    screen = run_in_terminal(["once", "-c", str(config)], columns=60)
    pieces = [piece.strip() for piece in re.split(r"[\r\n]|\x1b\[[0-9;?]*[A-Za-z]", screen) if piece.strip()]
    bars = [piece for piece in pieces if "rows" in piece and not piece.startswith("{") and ":" in piece]
    assert any(piece.startswith("contacts:") and "3.00k/3.00k" in piece for piece in bars), pieces
    assert all(len(piece) <= 60 for piece in bars), [piece for piece in bars if len(piece) > 60]
    logs = [piece for piece in pieces if '"event"' in piece]
    assert any(json.loads(line)["event"] == "cycle" for line in logs)  # a log line written while the bar showed
    for line in logs:
        json.loads(line)  # whole: no bar drawn into it
    assert "contacts: ok: read 3000, sent 3000" in screen
    crm.dispose()


def test_readme_recipe_runs_as_written(tmp_path):
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index('answering "why did this contact not arrive?"') :]
    start = section.index("```sh\n") + len("```sh\n")
    recipe = section[start : section.index("```\n", start)]
    shim = tmp_path / "bin" / "syncd"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m syncd.cli "$@"\n')
    shim.chmod(0o755)
    assert recipe.startswith("syncd demo")
    result = subprocess.run(
        ["bash", "-e", "-c", recipe],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "PATH": f"{shim.parent}:{os.environ['PATH']}"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "unchanged since their last ACK (not sent): 2" in result.stdout
    assert "dead letter #1: delivered at" in result.stdout
    assert result.stdout.rstrip().endswith("exit 0")
    assert "Traceback" not in result.stderr
