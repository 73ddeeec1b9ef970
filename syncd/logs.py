"""Structured logging: one JSON object per line, secrets scrubbed, journald-aware.

Everything, our own structlog loggers and the stdlib loggers of SQLAlchemy,
APScheduler, Alembic, httpx and aiohttp alike, goes through one stdlib handler whose
``structlog.stdlib.ProcessorFormatter`` runs one chain:

    merge_contextvars → add_log_level → add_logger_name → TimeStamper(utc, "timestamp")
    → StackInfoRenderer → exceptions (structured dicts, no locals) → redact keys
    → render (orjson JSON, or ConsoleRenderer) → scrub secrets → journald priority

One output path means one lock and lines that never interleave, and a third-party
line carries the same fields (including the bound contextvars) as ours.

Logs go to **stderr**. Under systemd both streams reach the journal, but stdout is
the command output of the CLI (``syncd status --json | jq`` must stay parseable), and
stderr is line-buffered even when it is not a terminal, so nothing waits in a buffer
when the service is killed.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any, Literal, TextIO

import orjson
import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = ["configure_logging", "get_logger", "register_secret", "scrub"]

LEVELS = ("debug", "info", "warning", "error", "critical")

# Libraries that log through the stdlib. Their INFO lines are noise (httpx logs every
# request), so they stay at WARNING unless we run at debug. Even then they are capped
# at INFO: their DEBUG output dumps result rows (CRM personal data) and wire traffic.
THIRD_PARTY = ("sqlalchemy", "apscheduler", "alembic", "httpx", "httpcore", "aiohttp")

REDACTED = "***"

# Keys whose values are secrets, wherever they occur in an event (nested too).
# Keys naming where a secret lives (token_file, password_file) stay readable: an
# operator needs the path to fix a permissions problem.
_SECRET_KEY = re.compile(r"token|passw|secret|authorization|api_?key|credential|cookie", re.I)
_LOCATION_KEY = re.compile(r"_(file|path|dir)$", re.I)

# Secrets that need no registration: a bearer token in a header dump, a password in
# a URL's userinfo (a SQLAlchemy URL rendered with str() by a driver error).
_PATTERNS = (
    (re.compile(r"(?i)\b(bearer\s+)[^\s\"',;\\]+"), rf"\g<1>{REDACTED}"),
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@\"]*:)[^/\s@\"]+@"), rf"\g<1>{REDACTED}@"),
)

# journald reads a "<N>" prefix as the line's syslog priority (SyslogLevelPrefix=,
# on by default), which is what makes `journalctl -p err` work for a JSON stream.
# syncd.service sets SyslogLevel=err for what has no prefix: output that bypasses
# this module (faulthandler's stack dump on a watchdog SIGABRT, `syncd check`'s
# reason for refusing a reload) is exactly what an operator looks for at err.
_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}

_secrets: re.Pattern[str] | None = None
_secret_values: set[str] = set()
_handler: logging.StreamHandler[TextIO] | None = None


def register_secret(value: str) -> None:
    """Never let ``value`` reach the log: every occurrence becomes ``***``.

    Call it for every token and password as soon as it is read (and again after a
    token file is re-read). This is what catches a key that sneaks into an exception
    message or a repr, where no key name gives it away.
    """
    global _secrets
    value = value.strip()  # a secret file's trailing newline is not part of it
    if not value or value in _secret_values:
        return
    # Match the JSON-escaped spelling too, in case the secret holds '"' or '\'.
    escaped = orjson.dumps(value).decode()[1:-1]
    _secret_values.update({value, escaped})
    # Longest first, so a secret that contains another is replaced whole.
    alternatives = sorted(_secret_values, key=len, reverse=True)
    _secrets = re.compile("|".join(map(re.escape, alternatives)))


def configure_logging(
    level: str = "info",
    fmt: Literal["json", "console"] = "json",
    stream: TextIO | None = None,
) -> None:
    """Route all logging to ``stream`` (default: stderr) at ``level``.

    Safe to call again on a config reload: the one handler is updated in place, so
    lines are neither duplicated nor lost while switching.
    """
    level = level.lower()
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    if fmt not in ("json", "console"):
        raise ValueError(f"log format must be 'json' or 'console', not {fmt!r}")
    stream = sys.stderr if stream is None else stream

    shared = _shared_processors()
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.StackInfoRenderer(),
            _exception_processor(fmt),
            _redact_keys,
            _Finish(_renderer(fmt, stream), journald=_is_journal_stream(stream)),
        ],
    )

    global _handler
    if _handler is None:
        _handler = logging.StreamHandler(stream)
    # Swap stream and formatter under the handler's lock (emit holds it while it
    # formats and writes), so no line mixes old and new. Not setStream(): it flushes
    # the old stream, which may be closed by now; emit flushed every line already.
    _handler.acquire()
    try:
        _handler.stream = stream
        _handler.setFormatter(formatter)
    finally:
        _handler.release()

    root = logging.getLogger()
    if _handler not in root.handlers:
        root.addHandler(_handler)
    numeric = logging.getLevelName(level.upper())
    root.setLevel(numeric)
    third_party = logging.INFO if numeric <= logging.DEBUG else max(numeric, logging.WARNING)
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(third_party)
    # SQLAlchemy's engine logs statements *with their parameters* at INFO: CRM contact data.
    logging.getLogger("sqlalchemy.engine").setLevel(max(third_party, logging.WARNING))
    logging.captureWarnings(True)  # a DeprecationWarning would otherwise be a non-JSON line

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,  # the stdlib level decides, so reloads apply
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a logger first used before configure_logging() (at import, say)
        # would otherwise keep structlog's default stdout setup forever. Resolving the
        # config per call costs microseconds; this daemon logs a few lines a second.
        cache_logger_on_first_use=False,
    )


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    """A structlog logger; ``name`` defaults to the calling module's."""
    return structlog.stdlib.get_logger(name)


def _shared_processors() -> list[Processor]:
    """What every line gets, whether it came from structlog or the stdlib."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
    ]


def _exception_processor(fmt: str) -> Processor:
    if fmt == "console":
        # A plain traceback string, which ConsoleRenderer prints as-is. Formatting it
        # here (rather than in the renderer) keeps rich's locals-showing tracebacks out.
        return structlog.processors.format_exc_info
    # Frames as dicts. Locals are off: they are where tokens and DSNs live. Frames
    # are capped so a deep traceback stays under journald's line limit (LineMax=48K).
    transformer = ExceptionDictTransformer(show_locals=False, max_frames=20)
    return structlog.processors.ExceptionRenderer(transformer)


def _renderer(fmt: str, stream: TextIO) -> Processor:
    if fmt == "console":
        return structlog.dev.ConsoleRenderer(colors=_isatty(stream))
    return structlog.processors.JSONRenderer(serializer=_dumps)


def _dumps(obj: Any, **kwargs: Any) -> str:
    # Non-string keys would make orjson raise, and a log call must not fail.
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS, **kwargs).decode()


def _redact_keys(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Replace the values of secret-named keys, at any depth, with ``***``."""
    redacted: EventDict = _redact(event_dict)
    return redacted


def _redact(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {
            key: REDACTED if _is_secret_key(key) else _redact(item) for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact(item) for item in value]
    return value


def _is_secret_key(key: object) -> bool:
    return (
        isinstance(key, str)
        and _SECRET_KEY.search(key) is not None
        and _LOCATION_KEY.search(key) is None
    )


class _Finish:
    """Render, scrub secret strings out of the rendered line, add the priority prefix.

    Scrubbing the finished line rather than the event's values also covers what only
    exists once rendered: a repr() fallback, a dataclass, an exception message.
    """

    def __init__(self, render: Processor, *, journald: bool) -> None:
        self._render = render
        self._journald = journald

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> str:
        level = event_dict.get("level", "info")
        line = scrub(str(self._render(logger, name, event_dict)))
        if self._journald:
            return f"<{_PRIORITY.get(level, 6)}>{line}"
        return line


def scrub(text: str) -> str:
    """``text`` with every registered secret, bearer token and URL password replaced."""
    secrets = _secrets
    if secrets is not None:
        text = secrets.sub(REDACTED, text)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _is_journal_stream(stream: TextIO) -> bool:
    """Whether ``stream`` is the journald stream systemd connected us to.

    systemd sets ``JOURNAL_STREAM=<device>:<inode>`` of that stream; comparing it with
    our stream's fstat tells a real journald connection from an inherited variable
    (a shell started from a service, output redirected to a file).
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        stat = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):  # unset, malformed, or no real fd
        return False
    return (stat.st_dev, stat.st_ino) == (device, inode)


def _isatty(stream: TextIO) -> bool:
    isatty: Callable[[], bool] | None = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
