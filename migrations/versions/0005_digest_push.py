"""Per-key ACK attribution: which push acknowledged the payload a digest stands for.

- `digests.push_id`: the `pushes.id` of the ACK that carried the key's last acknowledged
  record, written in the transaction that writes the digest (DESIGN.md §3), so `syncd inspect`
  can say when a key was acknowledged and under which `trans_id`. NULL for keys acknowledged
  before this revision: nothing recorded which push carried them.

No foreign key: PostgreSQL would check it for every row of the digest upsert (a backfill's hot
path) and SQLite could only add one by copying the whole table; the state only ever writes ids
it has just inserted, and pushes rows are never deleted.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable column without a default: an in-place ALTER on both databases, no table copy.
    op.add_column("digests", sa.Column("push_id", sa.BigInteger))


def downgrade() -> None:
    with op.batch_alter_table("digests") as batch:
        batch.drop_column("push_id")
