"""`syncd check` against live schemas: what it finds, how it says it, and the exit code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import sqlalchemy as sa

from syncd.cli import main

from .crm import write_config


def check(capfd: pytest.CaptureFixture[str], config: Path) -> tuple[int, list[str], str]:
    code = main(["check", "-c", str(config)])
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    return code, out.splitlines(), err


def lines_with(lines: list[str], severity: str) -> list[str]:
    return [line for line in lines if line.startswith(severity)]


def config_for(api, tmp_path: Path, source_url: str, **kwargs) -> Path:
    return write_config(
        tmp_path / "syncd.toml",
        source_url=source_url,
        api_url=kwargs.pop("api_url", None) or api.url,
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
        **kwargs,
    )


def test_a_good_setup_passes(api, crm, tmp_path, capfd) -> None:
    code, lines, _ = check(capfd, config_for(api, tmp_path, crm.url))
    assert code == 0, lines
    assert not lines_with(lines, "error") and not lines_with(lines, "warning  sync")
    assert any("sync contacts" in line and "column(s) found" in line for line in lines)
    assert any("token_file" in line and "readable" in line for line in lines)


def test_missing_column_is_named(api, crm, tmp_path, capfd) -> None:
    fields = 'msisdn = { column = "phone", transform = "e164" }\nfirstname = "first_nme"\n'
    code, lines, _ = check(capfd, config_for(api, tmp_path, crm.url, fields=fields))
    assert code == 1
    (error,) = lines_with(lines, "error")
    assert "sync contacts" in error and "'first_nme'" in error and "not found" in error


def test_missing_table_is_named(api, crm, tmp_path, capfd) -> None:
    code, lines, _ = check(capfd, config_for(api, tmp_path, crm.url, table="contcts"))
    assert code == 1
    (error,) = lines_with(lines, "error")
    assert "'contcts'" in error and "not found" in error


def bare_table(url: str, *, unique_key: bool, nullable_watermark: bool, index: bool) -> sa.Engine:
    engine = sa.create_engine(url)
    metadata = sa.MetaData()
    table = sa.Table(
        "people",
        metadata,
        sa.Column("id", sa.Integer, nullable=False, unique=unique_key),
        sa.Column("phone", sa.String(40)),
        sa.Column("updated_at", sa.DateTime, nullable=nullable_watermark),
    )
    if index:
        sa.Index("ix_people_wm", table.c.updated_at, table.c.id)
    metadata.create_all(engine)
    return engine


def test_key_that_is_not_unique(api, source_url, tmp_path, capfd) -> None:
    engine = bare_table(source_url, unique_key=False, nullable_watermark=False, index=True)
    fields = 'msisdn = "phone"\n'
    code, lines, _ = check(capfd, config_for(api, tmp_path, source_url, table="people", fields=fields))
    engine.dispose()
    assert code == 1
    (error,) = lines_with(lines, "error")
    assert "key column 'id' is not unique" in error


def test_nullable_watermark_warns(api, source_url, tmp_path, capfd) -> None:
    engine = bare_table(source_url, unique_key=True, nullable_watermark=True, index=True)
    code, lines, _ = check(capfd, config_for(api, tmp_path, source_url, table="people", fields='msisdn = "phone"\n'))
    engine.dispose()
    assert code == 0  # a warning, not an error
    warnings = [line for line in lines_with(lines, "warning") if "sync contacts" in line]
    assert len(warnings) == 1
    assert "watermark column 'updated_at' is nullable" in warnings[0] and "NOT NULL" in warnings[0]


def test_missing_keyset_index_warns_with_the_statement_that_fixes_it(api, source_url, tmp_path, capfd) -> None:
    engine = bare_table(source_url, unique_key=True, nullable_watermark=False, index=False)
    config = config_for(api, tmp_path, source_url, table="people", fields='msisdn = "phone"\n')
    code, lines, _ = check(capfd, config)
    assert code == 0
    (warning,) = [line for line in lines_with(lines, "warning") if "sync contacts" in line]
    assert "no index on (updated_at, id)" in warning
    statement = re.search(r"CREATE INDEX .*$", warning)
    assert statement, warning

    with engine.begin() as conn:  # the operator pastes the fix
        conn.execute(sa.text(statement.group(0)))
    code, lines, _ = check(capfd, config)
    engine.dispose()
    assert code == 0
    assert not [line for line in lines_with(lines, "warning") if "sync contacts" in line]


def test_unreachable_source_is_an_error_without_the_password(api, tmp_path, capfd) -> None:
    url = "postgresql+psycopg://syncd:s3cret-pw@127.0.0.1:1/crm?connect_timeout=2"
    code, lines, err = check(capfd, config_for(api, tmp_path, url))
    assert code == 1
    (error,) = lines_with(lines, "error")
    assert error.split()[1:3] == ["source", "crm:"]
    assert "127.0.0.1:1" in error
    assert "s3cret-pw" not in "\n".join(lines) + err


def test_missing_token_file(api, crm, tmp_path, capfd) -> None:
    config = config_for(api, tmp_path, crm.url, token_file=tmp_path / "no-such-token")
    code, lines, _ = check(capfd, config)
    assert code == 1
    (error,) = lines_with(lines, "error")
    assert "token_file" in error and "no-such-token" in error and "No such file" in error


def test_empty_token_file(api, crm, tmp_path, capfd) -> None:
    token = tmp_path / "empty-token"
    token.write_text("\n")
    code, lines, _ = check(capfd, config_for(api, tmp_path, crm.url, token_file=token))
    assert code == 1
    (error,) = lines_with(lines, "error")
    assert "empty-token" in error and "is empty" in error


def test_unreadable_token_file(api, crm, tmp_path, capfd) -> None:
    token = tmp_path / "a-directory"
    token.mkdir()  # unreadable as a file, even for root
    code, lines, _ = check(capfd, config_for(api, tmp_path, crm.url, token_file=token))
    assert code == 1
    (error,) = lines_with(lines, "error")
    assert "a-directory" in error and "token_file" in error


# ---------------------------------------------------------------------------- the API probe


def api_line(lines: list[str]) -> str:
    (line,) = [line for line in lines if line.split()[1:2] == ["api:"] and "token" not in line]
    return line


def test_probe_finds_the_api_and_the_key_accepted_without_sending_a_record(api, crm, tmp_path, capfd) -> None:
    before = len(api.requests())
    code, lines, _ = check(capfd, config_for(api, tmp_path, crm.url))
    assert code == 0
    line = api_line(lines)
    assert line.startswith("ok") and "reachable, key accepted" in line
    (probe,) = api.requests()[before:]
    assert probe["records"] == 0 and probe["method"] == "POST"
    assert api.stats()["records_accepted"] == 0


def test_probe_reports_a_refused_key(api, crm, tmp_path, capfd) -> None:
    token = tmp_path / "revoked"
    token.write_text("a-revoked-key\n")
    code, lines, _ = check(capfd, config_for(api, tmp_path, crm.url, token_file=token))
    assert code == 1
    line = api_line(lines)
    assert line.startswith("error") and "refused the key" in line and "430" in line
    assert "a-revoked-key" not in "\n".join(lines)


def test_probe_reports_a_wrong_url(api, crm, tmp_path, capfd) -> None:
    wrong = api.url.rsplit("/", 1)[0] + "/not-the-endpoint"
    code, lines, _ = check(capfd, config_for(api, tmp_path, crm.url, api_url=wrong))
    assert code == 1
    line = api_line(lines)
    assert line.startswith("error") and "not the Add-contacts endpoint" in line and "404" in line


def test_probe_reports_an_unreachable_api(api, crm, tmp_path, capfd) -> None:
    import socket

    with socket.socket() as closed:  # a port that was free a moment ago: nothing listens on it
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    code, lines, _ = check(capfd, config_for(api, tmp_path, crm.url, api_url=f"http://127.0.0.1:{port}/add"))
    assert code == 1
    line = api_line(lines)
    assert line.startswith("error") and "unreachable" in line


def test_config_only_connects_to_nothing(api, tmp_path, capfd) -> None:
    before = len(api.requests())
    config = config_for(api, tmp_path, "postgresql+psycopg://nobody@127.0.0.1:1/none")
    assert main(["check", "-c", str(config), "--config-only"]) == 0
    assert "ok" in capfd.readouterr().out
    assert len(api.requests()) == before


def test_check_creates_no_state_database(api, crm, tmp_path, capfd) -> None:
    code, lines, _ = check(capfd, config_for(api, tmp_path, crm.url))
    assert code == 0
    (warning,) = [line for line in lines_with(lines, "warning") if "state:" in line]
    assert f"no state database at {tmp_path / 'state.db'} yet" in warning
    assert not (tmp_path / "state.db").exists()
