"""syncd.logs: every line JSON, secrets never written, stdlib loggers included."""

from __future__ import annotations

import io
import logging
import os
import uuid
from pathlib import Path

import orjson
import pytest
import structlog

from syncd.logs import configure_logging, get_logger, register_secret


def lines(stream: io.StringIO) -> list[dict]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def test_every_line_is_json_with_timestamp_level_event() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    log = get_logger("syncd.test")
    log.info("cycle finished", records=3)
    log.debug("not shown at info")
    log.warning("slow", seconds=1.5)

    first, second = lines(out)
    assert first["event"] == "cycle finished"
    assert first["level"] == "info"
    assert first["records"] == 3
    assert first["logger"] == "syncd.test"
    assert first["timestamp"].endswith("Z")  # UTC ISO 8601
    assert second["level"] == "warning"


def test_contextvars_appear_on_every_line() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    structlog.contextvars.bind_contextvars(sync="contacts")
    get_logger().info("one")
    logging.getLogger("sqlalchemy.engine").warning("two")

    assert [line["sync"] for line in lines(out)] == ["contacts", "contacts"]


def test_secrets_never_reach_the_log() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    secret = f"key-{uuid.uuid4().hex}"
    register_secret(secret + "\n")  # as read from a token file
    log = get_logger()

    log.info("loaded", token=secret, api_key="k1", headers={"Authorization": "Bearer x"})
    log.info(f"request with {secret} failed", token_file="/run/credentials/syncd/api-token")
    try:
        raise RuntimeError(f"401 for key {secret} at https://u:hunter2@db.internal/crm")
    except RuntimeError:
        log.exception("push failed")
    logging.getLogger("httpx").error("sent authorization: Bearer abc.def")

    text = out.getvalue()
    for leaked in (secret, "k1", "hunter2", "abc.def"):
        assert leaked not in text
    loaded, failed, crashed, foreign = lines(out)
    assert loaded["token"] == "***"
    assert loaded["api_key"] == "***"
    assert loaded["headers"] == {"Authorization": "***"}
    assert failed["event"] == "request with *** failed"
    assert failed["token_file"] == "/run/credentials/syncd/api-token"  # a path, kept
    exc_value = crashed["exception"][0]["exc_value"]
    assert exc_value == "401 for key *** at https://u:***@db.internal/crm"
    assert foreign["event"] == "sent authorization: Bearer ***"


def test_exceptions_are_structured_without_locals() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)

    def fail() -> None:
        password = "local-variable-value"  # noqa: F841 - must not be rendered
        raise ValueError("bad row")

    try:
        fail()
    except ValueError:
        get_logger().exception("cycle failed")

    (line,) = lines(out)
    assert "local-variable-value" not in out.getvalue()
    (exception,) = line["exception"]
    assert exception["exc_type"] == "ValueError"
    assert exception["exc_value"] == "bad row"
    assert exception["frames"][-1]["name"] == "fail"
    assert all("locals" not in frame or not frame["locals"] for frame in exception["frames"])
    assert line["level"] == "error"


def test_stdlib_loggers_come_out_as_json_at_their_own_levels() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    logging.getLogger("sqlalchemy.engine").warning("pool %s exhausted", "crm")
    logging.getLogger("httpx").info("HTTP Request: POST ... 200")  # noise at info
    logging.getLogger("apscheduler.scheduler").info("Added job")

    (line,) = lines(out)
    assert line["event"] == "pool crm exhausted"
    assert line["level"] == "warning"
    assert line["logger"] == "sqlalchemy.engine"
    assert "timestamp" in line


def test_debug_lets_library_info_through_but_not_library_debug() -> None:
    out = io.StringIO()
    configure_logging("debug", "json", out)
    logging.getLogger("httpx").info("HTTP Request")
    logging.getLogger("sqlalchemy.engine").debug("Row (1, 'alice@example.com')")
    get_logger().debug("ours")

    assert [line["event"] for line in lines(out)] == ["HTTP Request", "ours"]


def test_journald_priority_prefix_when_journal_stream_matches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal"
    with path.open("w") as out:
        stat = os.fstat(out.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")
        configure_logging("debug", "json", out)
        log = get_logger()
        log.error("e")
        log.warning("w")
        log.info("i")
        log.debug("d")

    prefixes = [line[:3] for line in path.read_text().splitlines()]
    assert prefixes == ["<3>", "<4>", "<6>", "<7>"]
    assert orjson.loads(path.read_text().splitlines()[0][3:])["event"] == "e"


def test_no_prefix_when_journal_stream_is_someone_elses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "1:1")
    path = tmp_path / "log"
    with path.open("w") as out:
        configure_logging("info", "json", out)
        get_logger().error("e")
    assert path.read_text().startswith("{")


def test_console_format_is_readable() -> None:
    out = io.StringIO()
    configure_logging("info", "console", out)
    get_logger().info("cycle finished", records=3, password="pw-123")
    try:
        raise KeyError("boom")
    except KeyError:
        get_logger().exception("failed")

    text = out.getvalue()
    assert "cycle finished" in text
    assert "records=3" in text
    assert "pw-123" not in text
    assert "\x1b[" not in text  # no colours into a non-terminal
    assert "Traceback (most recent call last)" in text
    assert "KeyError: 'boom'" in text


def test_reconfiguring_neither_duplicates_nor_keeps_the_old_stream() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", "json", first)
    configure_logging("info", "json", second)
    configure_logging("warning", "json", second)  # a reload that raises the level
    log = get_logger()
    log.info("hidden now")
    log.warning("once")

    assert first.getvalue() == ""
    assert [line["event"] for line in lines(second)] == ["once"]


def test_loggers_created_before_configuration_follow_it() -> None:
    early = get_logger("syncd.early")
    out = io.StringIO()
    configure_logging("info", "json", out)
    early.info("late line")
    assert lines(out)[0]["event"] == "late line"


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="log level"):
        configure_logging("verbose")
    with pytest.raises(ValueError, match="log format"):
        configure_logging("info", "xml")  # type: ignore[arg-type]


@pytest.mark.parametrize("source_url", ["sqlite"], indirect=True)
def test_the_cycle_line_names_trans_ids_and_dead_letters_and_idle_cycles_stay_at_debug(crm, api, tmp_path) -> None:
    from syncd.config import load_config
    from syncd.runtime import Runtime

    from .crm import contact, write_config

    crm.insert([contact(i) for i in range(1, 4)] + [contact(4, phone="12")])
    path = write_config(
        tmp_path / "syncd.toml",
        source_url=crm.url,
        api_url=api.url,
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
        batch=2,
    )
    out = io.StringIO()
    configure_logging("info", "json", out)
    with Runtime.open(load_config(path)) as runtime:
        runner = runtime.runners["contacts"]
        runner.run_cycle()  # 3 rows sent in 2 pushes, 1 dead letter
        runner.run_cycle()  # nothing changed: idle
        configure_logging("debug", "json", out)
        runner.run_cycle()
    acked = [entry["trans_id"] for entry in api.requests() if entry["status"] == 200]

    busy, idle = [line for line in lines(out) if line["event"] == "cycle"]
    # Two batches in flight together may reach the API in either order; the line lists read order.
    assert busy["sent"] == 3 and sorted(busy["trans_ids"]) == sorted(acked) and len(acked) == 2
    assert busy["dead_letters"] == [{"key": "4", "reason": busy["dead_letters"][0]["reason"]}]
    assert "msisdn" in busy["dead_letters"][0]["reason"]
    assert busy["level"] == "warning"  # a row needs someone's attention
    # The second cycle read nothing and wrote no info line; at debug the third one shows.
    assert idle["level"] == "debug" and idle["rows_read"] == 0 and "trans_ids" not in idle
