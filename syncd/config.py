"""The TOML config, validated once and turned into typed objects.

Everything downstream takes these objects, never raw dicts: a config that loads is a
config the rest of syncd can run. Every error names the file, the key and the problem,
so `load_config` raises `ConfigError` (exit code 2 in the CLI), never a traceback.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from syncd.errors import SyncdError
from syncd.fields import FieldSpec
from syncd.mapping import FieldError, compile_mapping

__all__ = [
    "ApiConfig",
    "Config",
    "ConfigError",
    "ChangeFeed",
    "FieldSpec",
    "RemovedField",
    "SecretFileError",
    "SourceConfig",
    "SyncConfig",
    "load_config",
    "read_secret_file",
    "safe_url",
]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_NAME = r"^[a-z0-9_-]+$"

# A daemon sends only while its lease outlasts the request by this much (DESIGN.md §9):
# the time from the check to the bytes on the wire, and clock-rate differences.
LEASE_MARGIN_S = 1.0

class ConfigError(SyncdError):
    """A config that cannot be used; the message is meant for the operator as-is."""


class SecretFileError(SyncdError):
    """A token_file or password_file that cannot be read now.

    A run-time failure (exit 1), not a config error: the config is valid, and the file
    usually exists where the service runs (systemd's /run/credentials) but not here.
    """

    def __init__(self, key: str, path: os.PathLike[str] | str, reason: str) -> None:
        super().__init__(f"{key}: {path}: {reason}")
        self.key, self.path, self.reason = key, path, reason

    def for_key(self, key: str) -> SecretFileError:
        """The same failure named by the full config key (`sources.crm.password_file`)."""
        return SecretFileError(key, self.path, self.reason)


def read_secret_file(path: os.PathLike[str] | str, key: str) -> str:
    """The secret in `path`, stripped; a failure names the config key and the path, never the content."""
    try:
        return Path(path).read_text().strip()
    except OSError as error:
        raise SecretFileError(key, path, error.strerror or type(error).__name__) from None
    except UnicodeDecodeError:
        raise SecretFileError(key, path, "not UTF-8 text") from None


def safe_url(url: str) -> str:
    """A database URL as syncd shows it anywhere (errors, status, check): password masked."""
    return sa.make_url(url).render_as_string(hide_password=True)


def _parse_duration(value: Any) -> Any:
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a duration; use e.g. '500ms', '30s', '5m', '1h'")
        return timedelta(seconds=float(match[1]) * _UNITS[match[2]])
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return timedelta(seconds=value)
    return value


Duration = Annotated[timedelta, BeforeValidator(_parse_duration)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StateConfig(_Strict):
    url: str = Field(default_factory=lambda: _default_state_url())
    lease: Duration = timedelta(seconds=60)  # scale-out: a sync's owner must renew within this

    def display_url(self) -> str:
        return safe_url(self.url)


def _default_state_url() -> str:
    directory = os.environ.get("STATE_DIRECTORY", "").split(":")[0] or "."
    return f"sqlite:///{Path(directory) / 'syncd-state.db'}"


class LogConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


class MetricsConfig(_Strict):
    listen: str | None = None


class ApiConfig(_Strict):
    url: str
    token_file: Path | None = None
    token: SecretStr | None = None
    timeout_s: float = Field(30.0, gt=0)
    requests_per_second: float = Field(10.0, ge=0)  # 0 = no client-side ceiling
    max_in_flight: int = Field(2, ge=1, le=64)
    max_batch_records: int = Field(500, ge=1, le=10_000)
    max_attempts: int = Field(6, ge=1)  # per batch within one cycle, for retryable failures
    backoff_base_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(60.0, gt=0)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value

    @model_validator(mode="after")
    def _one_token_source(self) -> ApiConfig:
        if self.token is None and self.token_file is None:
            raise ValueError("set token_file (preferred) or token")
        if self.token is not None and self.token_file is not None:
            raise ValueError("set token_file or token, not both")
        return self


class SourceConfig(_Strict):
    url: SecretStr  # may embed a password, so it is never printed whole
    password_file: Path | None = None
    # The frame naive timestamp columns are written in: "UTC" (what SuiteCRM, Odoo, EspoCRM,
    # Rails and Django write), "local" (the database session's zone) or an IANA name.
    timezone: str = "UTC"

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        if value != "local":
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"{value!r} is not a time zone; use \"UTC\", \"local\" or an IANA name like \"Europe/Berlin\"") from None
        return value

    @property
    def frame(self) -> ZoneInfo | None:
        """The zone of naive timestamps, or None for the database session's own zone."""
        return None if self.timezone == "local" else ZoneInfo(self.timezone)

    @field_validator("url")
    @classmethod
    def _sqlalchemy_url(cls, value: SecretStr) -> SecretStr:
        try:
            sa.make_url(value.get_secret_value())
        except sa.exc.ArgumentError:
            raise ValueError("is not a SQLAlchemy URL (e.g. postgresql+psycopg://user@host/db)") from None
        return value

    def engine_url(self, key: str = "password_file") -> sa.URL:
        """The URL with the password from `password_file` filled in, read now.

        `key` names the file in errors; callers that know the source's name pass
        `sources.NAME.password_file`.
        """
        url = sa.make_url(self.url.get_secret_value())
        if self.password_file is not None:
            url = url.set(password=read_secret_file(self.password_file, key))
        return url

    def display_url(self) -> str:
        return safe_url(self.url.get_secret_value())


def _field_spec(value: Any) -> Any:
    return {"column": value} if isinstance(value, str) else value


def _read_only_select(value: str | None) -> str | None:
    """A `query` must be one SELECT (or WITH ... SELECT) statement; a trailing `;` is dropped.

    syncd wraps it as a subquery and reads it in a read-only transaction; this check
    names what the config alone shows to be wrong, before any database is asked.
    """
    if value is None:
        return value
    import sqlparse

    # Without comments: a trailing `-- ...` would swallow the `)` that wraps the query.
    text = sqlparse.format(value, strip_comments=True)
    statements = [s for s in sqlparse.parse(text) if str(s).strip(" \t\r\n;")]
    if len(statements) != 1:
        raise ValueError(f"must be one SELECT statement, not {len(statements)}")
    kind = statements[0].get_type()
    if kind != "SELECT":
        raise ValueError(f"must be a read-only SELECT (or WITH ... SELECT), not {kind.lower()}")
    return str(statements[0]).strip().rstrip(";").strip()


def _some_sql(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise ValueError("is empty")
    return value


class _Model(_Strict):
    """What a sync or a change feed reads: a table (or view), or a read-only SELECT."""

    table: str | None = None  # may be schema-qualified; a table or a view
    query: str | None = None  # a read-only SELECT, read as `SELECT ... FROM (<query>) AS m`
    key: str
    watermark: str
    filter: str | None = None  # SQL condition over the model's columns, as the operator wrote it

    @field_validator("query")
    @classmethod
    def _select_only(cls, value: str | None) -> str | None:
        return _read_only_select(value)

    @field_validator("filter")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        return _some_sql(value)

    @model_validator(mode="after")
    def _table_or_query(self) -> Any:
        if (self.table is None) == (self.query is None):
            raise ValueError("give exactly one of table or query")
        return self

    @property
    def model_name(self) -> str:
        """How messages name the model: the table, or `query`."""
        return self.table if self.table is not None else "query"


class ChangeFeed(_Model):
    """`[[syncs.changes]]`: another table whose changes touch rows of the sync's model.

    `key` is its column holding the model's key, `watermark` its own, read with its own
    keyset cursor.
    """

    @property
    def feed_id(self) -> str:
        """Names the feed's cursor in the state: its table, or a digest of its query."""
        if self.table is not None:
            return self.table
        import hashlib

        return "query:" + hashlib.sha256(self.query.encode()).hexdigest()[:12]  # type: ignore[union-attr]


class RemovedField(_Strict):
    """An attribute of the record pushed when a key leaves the model."""

    sent: str | None = None  # an attribute of the record last acknowledged for that key
    value: str | int | float | bool | None = None  # a constant

    @model_validator(mode="after")
    def _one_origin(self) -> RemovedField:
        if (self.sent is None) == (self.value is None):
            raise ValueError("give exactly one of sent or value")
        return self


def _removed_field(value: Any) -> Any:
    return {"value": value} if isinstance(value, (str, int, float, bool)) else value


class SyncConfig(_Model):
    name: str = Field(pattern=_NAME)
    source: str
    interval: Duration | None = None
    cron: str | None = None
    settle: Duration = timedelta(seconds=2)
    reconcile: str = "daily"  # "off" | "hourly" | "daily" | a cron expression
    datastore_id: str
    feed_id: str
    paused: bool = False
    # A cycle that finds more than this many rows waiting hands reading and mapping to a
    # child process, so a backfill uses a second core; 0 keeps every cycle in one process.
    offload_after: int = Field(50_000, ge=0)
    fields: dict[str, Annotated[FieldSpec, BeforeValidator(_field_spec)]]
    changes: list[ChangeFeed] = Field(default_factory=list)
    removed: dict[str, Annotated[RemovedField, BeforeValidator(_removed_field)]] | None = None

    @field_validator("datastore_id", "feed_id", mode="before")
    @classmethod
    def _id_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("fields")
    @classmethod
    def _some_fields(cls, value: dict[str, FieldSpec]) -> dict[str, FieldSpec]:
        if not value:
            raise ValueError("map at least one datastore attribute")
        return value

    @field_validator("cron", "reconcile")
    @classmethod
    def _cron_expression(cls, value: str | None) -> str | None:
        if value is None or value in ("off", "hourly", "daily"):
            return value
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(value)
        except ValueError as error:
            raise ValueError(f"{value!r} is not a cron expression: {error}") from None
        return value

    @field_validator("removed")
    @classmethod
    def _some_removed(cls, value: dict[str, RemovedField] | None) -> dict[str, RemovedField] | None:
        if value is not None and not value:
            raise ValueError("give at least one attribute of the record to push, or leave the table out")
        return value

    @model_validator(mode="after")
    def _removed_reads_fields(self) -> SyncConfig:
        unknown = [f.sent for f in (self.removed or {}).values() if f.sent is not None and f.sent not in self.fields]
        if unknown:
            raise ValueError(
                f"removed: sent = {unknown[0]!r} is not an attribute in [syncs.fields] "
                f"({', '.join(self.fields)})"
            )
        return self

    @field_validator("changes")
    @classmethod
    def _one_cursor_per_feed(cls, value: list[ChangeFeed]) -> list[ChangeFeed]:
        ids = [feed.feed_id for feed in value]
        repeated = sorted({feed for feed in ids if ids.count(feed) > 1})
        if repeated:
            raise ValueError(
                f"{repeated[0]!r} is read by more than one feed; each feed keeps its own cursor: "
                "give it one feed (combine the filters with OR) or use a query"
            )
        return value

    @property
    def sent_attributes(self) -> tuple[str, ...]:
        """Attributes of each acknowledged record kept for `[syncs.removed]` (none without it)."""
        return tuple(dict.fromkeys(f.sent for f in (self.removed or {}).values() if f.sent is not None))

    @model_validator(mode="after")
    def _one_schedule(self) -> SyncConfig:
        if self.interval is not None and self.cron is not None:
            raise ValueError("set interval or cron, not both")
        if self.interval is None and self.cron is None:
            object.__setattr__(self, "interval", timedelta(seconds=30))
        if self.interval is not None and self.interval.total_seconds() <= 0:
            raise ValueError("interval must be positive")
        return self

    @property
    def columns(self) -> tuple[str, ...]:
        """Every source column the sync reads, key and watermark first, no repeats."""
        names = [self.key, self.watermark]
        for spec in self.fields.values():
            names.extend(spec.columns)
        return tuple(dict.fromkeys(names))


class Config(BaseSettings):
    """The whole config; `SYNCD_` environment variables override the file (`__` nests)."""

    model_config = SettingsConfigDict(
        env_prefix="SYNCD_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    state: StateConfig = Field(default_factory=StateConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    drain_timeout: Duration = timedelta(seconds=10)
    api: ApiConfig
    sources: dict[str, SourceConfig]
    syncs: list[SyncConfig]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file arrives as init kwargs; the environment must win over it.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        names = [sync.name for sync in self.syncs]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"sync names must be unique; repeated: {', '.join(duplicates)}")
        for sync in self.syncs:
            if sync.source not in self.sources:
                known = ", ".join(sorted(self.sources)) or "none"
                raise ValueError(
                    f"sync {sync.name!r} uses source {sync.source!r}, which is not defined "
                    f"(sources: {known})"
                )
        return self

    @model_validator(mode="after")
    def _lease_outlasts_a_request(self) -> Config:
        """With a PostgreSQL state database (scale-out), a lease must cover a whole request."""
        try:
            backend = sa.make_url(self.state.url).get_backend_name()
        except sa.exc.ArgumentError:
            return self  # reported when the state database is opened
        lease = self.state.lease.total_seconds()
        if backend == "postgresql" and lease <= self.api.timeout_s + LEASE_MARGIN_S:
            raise ValueError(
                f"state.lease ({lease:g}s) must be longer than api.timeout_s ({self.api.timeout_s:g}s) "
                f"plus {LEASE_MARGIN_S:g}s: a daemon sends a request only while its lease outlasts it"
            )
        return self

    def sync(self, name: str) -> SyncConfig:
        for sync in self.syncs:
            if sync.name == name:
                return sync
        raise ConfigError(f"no sync named {name!r} (syncs: {', '.join(s.name for s in self.syncs)})")


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate `path`; every failure is a `ConfigError` naming file and key."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config: {error.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: {error}") from None
    try:
        config = Config(**data)
    except ValidationError as error:
        raise ConfigError(_describe(path, error, data)) from None
    for index, sync in enumerate(config.syncs):
        try:
            compile_mapping(sync.fields, sync.columns)
        except FieldError as error:
            raise ConfigError(f"{path}: invalid config\n  syncs[{index}] ({sync.name}).{error}") from None
    return config


def config_warnings(path: str | os.PathLike[str], config: Config) -> list[str]:
    """Problems that do not stop syncd but that an operator should hear about."""
    warnings = []
    if config.api.token is not None:
        mode = Path(path).stat().st_mode
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            warnings.append(
                f"{path} holds api.token and is readable by group or others "
                f"(mode {stat.filemode(mode)}); use api.token_file or chmod 600"
            )
    return warnings


def _describe(path: Path, error: ValidationError, data: dict[str, Any]) -> str:
    lines = [f"{path}: invalid config"]
    for item in error.errors(include_url=False):
        key = _dotted(item["loc"], data)
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key" + _did_you_mean(item["loc"])
        elif item["type"] == "missing":
            message = "missing required key"
        message = message.removeprefix("Value error, ")
        lines.append(f"  {key}: {message}" if key else f"  {message}")
    return "\n".join(lines)


def _dotted(loc: tuple[Any, ...], data: dict[str, Any]) -> str:
    """`('syncs', 0, 'fields', 'msisdn', 'column')` → `syncs[0] (contacts).fields.msisdn.column`."""
    parts: list[str] = []
    node: Any = data
    for item in loc:
        if isinstance(item, int):
            parts[-1] += f"[{item}]"
            node = node[item] if isinstance(node, list) and item < len(node) else None
            if isinstance(node, dict) and isinstance(node.get("name"), str):
                parts[-1] += f" ({node['name']})"
        elif "function-" in str(item):
            continue  # pydantic's validator frames are not keys the operator wrote
        else:
            parts.append(str(item))
            node = node.get(item) if isinstance(node, dict) else None
    return ".".join(parts)


def _did_you_mean(loc: tuple[Any, ...]) -> str:
    """Suggest the known key closest to an unknown one, walking the models along `loc`."""
    annotation: Any = Config
    for item in loc[:-1]:
        model = _model_of(annotation)
        if isinstance(item, int) or model is None or str(item) not in model.model_fields:
            continue  # a list index, a dict key or a validator frame: stay on the same model
        annotation = model.model_fields[str(item)].annotation
    model = _model_of(annotation)
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields) if model else [], n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside `list[M]`, `dict[str, M]`, `M | None` or `Annotated[M, ...]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found:
            return found
    return _model_of(getattr(annotation, "__origin__", None)) if hasattr(annotation, "__metadata__") else None
