"""Scale-out: a fencing generation on each lease, the running cycle's progress, a shared rate limit.

- `syncs.lease_generation` grows by one at every takeover; commits are fenced by owner and
  generation, so a daemon that lost a sync and took it back later cannot commit under its old lease.
- `syncs.cycle_started_at` / `cycle_rows_read` / `cycle_sent`: the cycle running now and its
  progress, written with the commits a cycle does anyway (`status` shows it as running).
- `rate_limits`: the next free request slot per API endpoint, shared by every daemon on this
  state database, so `requests_per_second` holds for the deployment (a GCRA token bucket).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("syncs", sa.Column("lease_generation", sa.BigInteger, nullable=False, server_default="0"))
    op.add_column("syncs", sa.Column("cycle_started_at", sa.DateTime(timezone=True)))
    op.add_column("syncs", sa.Column("cycle_rows_read", sa.BigInteger))
    op.add_column("syncs", sa.Column("cycle_sent", sa.BigInteger))
    op.create_table(
        "rate_limits",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("next_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("rate_limits")
    with op.batch_alter_table("syncs") as batch:
        for column in ("cycle_sent", "cycle_rows_read", "cycle_started_at", "lease_generation"):
            batch.drop_column(column)
