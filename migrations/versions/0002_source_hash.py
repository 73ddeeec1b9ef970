"""Source fingerprints next to payload digests, and the mapping they were taken under.

Reconcile compares a fingerprint of each row's source columns with the stored one and maps
only the rows whose source changed, instead of mapping every row of the table.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("digests", sa.Column("source_hash", sa.LargeBinary(16)))
    op.add_column("syncs", sa.Column("mapping_hash", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("syncs") as batch:
        batch.drop_column("mapping_hash")
    with op.batch_alter_table("digests") as batch:
        batch.drop_column("source_hash")
