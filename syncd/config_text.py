"""A config file's text from Python values: `syncd demo`, the tests and the bench write their
configs with `render_config`, so a renamed or added key changes in one place.

It writes the keys it is given and adds none of its own (no defaults here: those live in
config.py); `load_config` is what judges them, as it does for an operator's file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

Table = Mapping[str, Any]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def render_config(
    *,
    api: Table,
    sources: Mapping[str, Table],
    syncs: Sequence[Table],
    state: Table | None = None,
    log: Table | None = None,
    metrics: Table | None = None,
    comment: str = "",
) -> str:
    """The TOML text of a config. In a sync, a table value (`fields`, `removed`) becomes a
    `[syncs.NAME]` table and a list of tables (`changes`) becomes `[[syncs.NAME]]` tables;
    a table anywhere else (a field's `{ column = ..., transform = ... }`) is written inline."""
    lines = [f"# {line}".rstrip() for line in comment.splitlines()]
    for name, table in (("state", state), ("log", log), ("metrics", metrics), ("api", api)):
        if table is not None:
            lines += _table(f"[{name}]", table)
    for name, source in sources.items():
        lines += _table(f"[sources.{_key(name)}]", source)
    for sync in syncs:
        nested = {key: value for key, value in sync.items() if _is_table(value) or _is_tables(value)}
        lines += _table("[[syncs]]", {key: value for key, value in sync.items() if key not in nested})
        for key, value in nested.items():
            if _is_table(value):
                lines += _table(f"[syncs.{_key(key)}]", value)
            else:
                for table in value:
                    lines += _table(f"[[syncs.{_key(key)}]]", table)
    return "\n".join(lines).lstrip("\n") + "\n"


def _table(header: str, values: Table) -> list[str]:
    return ["", header, *(f"{_key(key)} = {_value(value)}" for key, value in values.items() if value is not None)]


def _is_table(value: Any) -> bool:
    return isinstance(value, Mapping)


def _is_tables(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str) and bool(value) and all(map(_is_table, value))


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        if "\n" in value and '"""' not in value and "\\" not in value:
            return f'"""\n{value}"""'  # a query stays readable; the first newline is not part of it
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if _is_table(value):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items() if v is not None) + " }"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    raise TypeError(f"a config value cannot be a {type(value).__name__}: {value!r}")
