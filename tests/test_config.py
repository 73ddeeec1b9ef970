"""Config mistakes as an operator meets them: `syncd check` / `syncd once` on a bad file.

Every mistake must exit 2 with one message naming the file, the key and the problem,
and never a traceback.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from syncd.cli import main
from syncd.config import ConfigError, load_config
from syncd.config_text import render_config


def base(directory: Path) -> str:
    """A valid config; each test edits its text into the mistake it is about."""
    return render_config(
        state={"url": f"sqlite:///{directory}/state.db"},
        log={"level": "warning"},
        api={
            "url": "http://127.0.0.1:9/v1/datastores/contacts",
            "token_file": f"{directory}/api-token",
            "timeout_s": 5,
            "max_in_flight": 2,
        },
        sources={"crm": {"url": f"sqlite:///{directory}/crm.db"}},
        syncs=[
            {
                "name": "contacts",
                "source": "crm",
                "table": "contacts",
                "key": "id",
                "watermark": "updated_at",
                "interval": "30s",
                "settle": "2s",
                "datastore_id": "1466",
                "feed_id": "1499",
                "fields": {"msisdn": {"column": "phone", "transform": "e164", "required": True}, "firstname": "first_name"},
            }
        ],
    )


@pytest.fixture
def write(tmp_path: Path) -> Callable[..., Path]:
    (tmp_path / "api-token").write_text("k-123\n")

    def write(edit: Callable[[str], str] = lambda text: text, name: str = "syncd.toml") -> Path:
        path = tmp_path / name
        path.write_text(edit(base(tmp_path)))
        path.chmod(0o600)
        return path

    return write


def run(capfd: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capfd.readouterr()
    return code, out, err


def assert_refused(capfd: pytest.CaptureFixture[str], path: Path, *expected: str) -> str:
    """`check` and `once` both exit 2 with a message naming the file and each `expected`."""
    messages = []
    for command in (["check", "-c", str(path)], ["once", "-c", str(path), "--no-progress"]):
        code, out, err = run(capfd, *command)
        assert code == 2, (command, out, err)
        assert "Traceback" not in out + err
        assert str(path) in err
        for text in expected:
            assert text in err, f"{text!r} not in {err!r}"
        messages.append(err)
    assert messages[0] == messages[1]
    return messages[0]


def test_a_good_config_loads(write: Callable[..., Path]) -> None:
    config = load_config(write())
    assert config.sync("contacts").settle.total_seconds() == 2
    assert config.sync("contacts").columns == ("id", "updated_at", "phone", "first_name")


def test_malformed_toml_gives_line_and_column(write, capfd) -> None:
    path = write(lambda t: t.replace('key = "id"', 'key = id"'))
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("key ="))
    err = assert_refused(capfd, path, "invalid TOML")
    assert f"line {line}" in err and "column" in err


def test_unknown_key_suggests_the_known_one(write, capfd) -> None:
    err = assert_refused(capfd, write(lambda t: t.replace("max_in_flight", "max_inflight")), "api.max_inflight", "unknown key")
    assert "did you mean 'max_in_flight'" in err


def test_unknown_key_inside_a_sync_and_a_field(write, capfd) -> None:
    path = write(lambda t: t.replace('settle = "2s"', 'setle = "2s"').replace("required = true", "requird = true"))
    err = assert_refused(capfd, path, "syncs[0] (contacts).setle", "syncs[0] (contacts).fields.msisdn.requird")
    assert "did you mean 'settle'" in err and "did you mean 'required'" in err


def test_missing_keys_are_named(write, capfd) -> None:
    path = write(lambda t: t.replace('key = "id"\n', "").replace('feed_id = "1499"\n', ""))
    assert_refused(capfd, path, "syncs[0] (contacts).key: missing", "syncs[0] (contacts).feed_id: missing")


def test_missing_api_section(write, capfd) -> None:
    path = write(lambda t: t[: t.index("[api]")] + t[t.index("[sources.crm]") :])
    assert_refused(capfd, path, "api: missing")


@pytest.mark.parametrize(("key", "bad"), [("interval", "30 seconds"), ("settle", "2"), ("settle", "-1s")])
def test_bad_durations(write, capfd, key: str, bad: str) -> None:
    path = write(lambda t: t.replace(f'{key} = "{"30s" if key == "interval" else "2s"}"', f'{key} = "{bad}"'))
    err = assert_refused(capfd, path, f"syncs[0] (contacts).{key}", repr(bad))
    assert "duration" in err


def test_bad_cron(write, capfd) -> None:
    path = write(lambda t: t.replace('interval = "30s"', 'cron = "*/5 * * *"'))
    assert_refused(capfd, path, "syncs[0] (contacts).cron", "'*/5 * * *' is not a cron expression")


def test_bad_reconcile_schedule(write, capfd) -> None:
    path = write(lambda t: t.replace('settle = "2s"', 'settle = "2s"\nreconcile = "weekly"'))
    assert_refused(capfd, path, "syncs[0] (contacts).reconcile", "'weekly'")


def test_interval_and_cron_together(write, capfd) -> None:
    path = write(lambda t: t.replace('interval = "30s"', 'interval = "30s"\ncron = "*/5 * * * *"'))
    assert_refused(capfd, path, "syncs[0] (contacts)", "interval or cron, not both")


def test_bad_transform(write, capfd) -> None:
    err = assert_refused(capfd, write(lambda t: t.replace('"e164"', '"e165"')), "syncs[0] (contacts).fields.msisdn.transform", "'e164'")
    assert "e165" in err or "should be" in err


def test_field_with_two_origins(write, capfd) -> None:
    path = write(lambda t: t.replace('firstname = "first_name"', 'firstname = { column = "first_name", value = "x" }'))
    assert_refused(capfd, path, "syncs[0] (contacts).fields.firstname", "exactly one of column, value or template")


def phone(options: str) -> Callable[[str], str]:
    """An edit giving the msisdn field `options` besides its column and e164 transform."""
    return lambda text: text.replace('transform = "e164", required = true', f'transform = "e164", {options}')


def test_region_from_a_country_column_is_read_by_the_sync(write) -> None:
    config = load_config(write(phone('region = "{primary_address_country}", default_region = "de", mobile_only = true')))
    sync = config.sync("contacts")
    assert sync.columns == ("id", "updated_at", "phone", "primary_address_country", "first_name")
    assert sync.fields["msisdn"].default_region == "DE"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ('region = "{country"', "'{country' is neither a region code nor one {column}"),
        ('region = "country}"', "'country}' is neither a region code nor one {column}"),
        ('region = "{a} or {b}"', "is neither a region code nor one {column}"),
        ('region = "Germany"', "'Germany' is not a region code"),
        ('region = "{country}", default_region = "XX"', "default_region: 'XX' is not a region code"),
    ],
)
def test_bad_regions_name_their_key(write, capfd, options: str, message: str) -> None:
    assert_refused(capfd, write(phone(options)), "syncs[0] (contacts).fields.msisdn.", message)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ('region = "GB", default_region = "DE"', 'default_region needs a per-row region (region = "{country_column}")'),
        ('region = "GB", mobile_only = false', ""),
    ],
)
def test_phone_options_that_do_not_fit(write, capfd, options: str, message: str) -> None:
    if not message:
        load_config(write(phone(options)))
        return
    assert_refused(capfd, write(phone(options)), "syncs[0] (contacts).fields.msisdn: ", message)


def test_phone_options_on_a_field_without_e164(write, capfd) -> None:
    path = write(lambda t: t.replace('firstname = "first_name"', 'firstname = { column = "first_name", region = "GB" }'))
    assert_refused(capfd, path, "syncs[0] (contacts).fields.firstname: ", "region only shape the e164 transform")


def test_a_default_its_transforms_refuse_names_the_key(write, capfd) -> None:
    path = write(phone('region = "{country}", default = "not a phone"'))
    assert_refused(capfd, path, "syncs[0] (contacts).fields.msisdn.default: 'not a phone' is not a valid phone number")


def test_email_and_name_transforms_load(write) -> None:
    def fields(text: str) -> str:
        return text.replace(
            'firstname = "first_name"',
            'firstname = { column = "name", transform = "first_name" }\n'
            'lastname = { column = "name", transform = "last_name" }\n'
            'emailid = { column = "email", transform = "email" }',
        )

    sync = load_config(write(fields)).sync("contacts")
    assert sync.columns == ("id", "updated_at", "phone", "name", "email")


def test_unknown_source(write, capfd) -> None:
    err = assert_refused(capfd, write(lambda t: t.replace('source = "crm"', 'source = "crn"')), "'crn'", "not defined")
    assert "contacts" in err and "sources: crm" in err


def test_duplicate_sync_names(write, capfd) -> None:
    def twice(text: str) -> str:
        sync = text[text.index("[[syncs]]") :]
        return text + "\n" + sync

    assert_refused(capfd, write(twice), "sync names must be unique", "contacts")


def test_bad_sync_name(write, capfd) -> None:
    path = write(lambda t: t.replace('name = "contacts"', 'name = "My Contacts"'))
    assert_refused(capfd, path, "syncs[0] (My Contacts).name", "pattern")


def test_both_token_and_token_file(write, capfd) -> None:
    path = write(lambda t: t.replace("[api]\n", '[api]\ntoken = "k-inline-987"\n'))
    _, _, err = run(capfd, "check", "-c", str(path))
    assert_refused(capfd, path, "api: set token_file or token, not both")
    assert "k-inline-987" not in err  # the refused token is not echoed back


def test_neither_token_nor_token_file(write, capfd) -> None:
    path = write(lambda t: "\n".join(line for line in t.splitlines() if not line.startswith("token_file")))
    assert_refused(capfd, path, "api: set token_file (preferred) or token")


def test_bad_values_name_their_key(write, capfd) -> None:
    path = write(lambda t: t.replace("max_in_flight = 2", "max_in_flight = 0").replace("http://127", "ftp://127"))
    assert_refused(capfd, path, "api.max_in_flight", "api.url", "not an http(s) URL")


def test_unreadable_config_file(tmp_path, capfd) -> None:
    code, _, err = run(capfd, "check", "-c", str(tmp_path / "missing.toml"))
    assert code == 2 and "missing.toml" in err and "cannot read config" in err and "Traceback" not in err


def test_environment_overrides_the_file_with_double_underscore_nesting(write, monkeypatch) -> None:
    path = write()
    monkeypatch.setenv("SYNCD_API__MAX_IN_FLIGHT", "7")
    monkeypatch.setenv("SYNCD_LOG__LEVEL", "debug")
    config = load_config(path)
    assert config.api.max_in_flight == 7
    assert config.log.level == "debug"
    assert config.api.timeout_s == 5  # the rest of [api] still comes from the file
    assert config.api.url.endswith("/v1/datastores/contacts")


def test_a_bad_environment_override_is_refused_with_its_key(write, capfd, monkeypatch) -> None:
    monkeypatch.setenv("SYNCD_API__MAX_IN_FLIGHT", "many")
    with pytest.raises(ConfigError, match="api.max_in_flight"):
        load_config(write())
    code, _, err = run(capfd, "check", "-c", str(write()))
    assert code == 2 and "api.max_in_flight" in err and "Traceback" not in err


def test_world_readable_config_holding_a_token_draws_a_warning(write, capfd) -> None:
    def inline(text: str) -> str:
        return text.replace("token_file =", 'token = "k-inline-987"\n# token_file =')

    path = write(inline)
    path.chmod(0o644)
    code, out, err = run(capfd, "check", "-c", str(path))
    assert "warning" in out and "holds api.token" in out and "readable by group or others" in out
    assert "k-inline-987" not in out + err

    path.chmod(0o600)
    _, out, _ = run(capfd, "check", "-c", str(path))
    assert "holds api.token" not in out


def test_world_readable_config_with_a_token_file_is_fine(write, capfd) -> None:
    path = write()
    path.chmod(0o644)
    _, out, _ = run(capfd, "check", "-c", str(path))
    assert "readable by group or others" not in out


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_config_permissions(write, capfd) -> None:
    path = write()
    path.chmod(0)
    code, _, err = run(capfd, "check", "-c", str(path))
    assert code == 2 and "Permission denied" in err


def test_render_config_writes_back_exactly_the_values_it_is_given():
    import tomllib

    sync = {
        "name": "contacts",
        "query": "SELECT id\n  FROM contacts WHERE name <> 'x'\n",
        "filter": 'note = "a\\b"\n',  # a quote, a backslash and a newline
        "interval": "1s",
        "fields": {"msisdn": {"column": "phone", "transform": ["strip", "e164"], "required": True}, "prénom": "first_name"},
        "changes": [{"table": "rel", "key": "bean_id"}, {"table": "addr", "key": "id"}],
        "removed": {"status": {"value": "gone"}},
    }
    text = render_config(
        comment="two\nlines",
        state={"url": "sqlite:///s.db", "lease": "3s"},
        api={"url": "http://x/y", "timeout_s": 1.5, "max_attempts": 2},
        sources={"crm": {"url": "sqlite://"}},
        syncs=[sync],
    )
    assert text.startswith("# two\n# lines\n")
    assert tomllib.loads(text) == {
        "state": {"url": "sqlite:///s.db", "lease": "3s"},
        "api": {"url": "http://x/y", "timeout_s": 1.5, "max_attempts": 2},
        "sources": {"crm": {"url": "sqlite://"}},
        "syncs": [sync],
    }
