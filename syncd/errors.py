"""The root of syncd's exceptions, at the bottom of the import graph (it imports nothing).

Each error lives beside the concept it belongs to; all of them derive from `SyncdError`,
so a caller that only needs "syncd failed, and here is why" catches one class:

    SyncdError                 raised on purpose; the message is meant for the operator
    ├── ConfigError            the config cannot be used (the CLI exits 2)       config.py
    ├── SecretFileError        a password_file or token_file cannot be read      config.py
    ├── SourceError            a source cannot be read as configured             source.py
    ├── StateError             the state database failed, said in one line       state.py
    ├── LeaseLost              another syncd runs this sync now                  state.py
    ├── ApiError               the API answered a failure (retry/auth/split...)  delivery.py
    ├── RowRejected            one row cannot become a record (a dead letter)    mapping.py
    ├── ExplainError           preview / inspect cannot answer                   explain.py
    └── CommandError           a command failed at run time (the CLI exits 1)    cli.py
"""

from __future__ import annotations

__all__ = ["SyncdError"]


class SyncdError(Exception):
    """Every error syncd raises on purpose."""
