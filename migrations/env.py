"""Alembic environment for the state database.

syncd runs migrations itself (`syncd migrate`, and at the start of `run` and `once`) and
hands Alembic an open connection, so there is no alembic.ini and no URL here: the same
code works from a checkout and from an installed wheel.
"""

from __future__ import annotations

from alembic import context

from syncd.state import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only reached by a bare `alembic` invocation
    raise SystemExit("run migrations with `syncd migrate -c FILE`")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
