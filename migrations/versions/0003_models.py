"""Models: change-feed cursors, removals, and the attributes a removal record takes from the last ACK.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "feed_cursors",
        sa.Column("sync", sa.String(64), primary_key=True),
        sa.Column("feed", sa.String(255), primary_key=True),
        sa.Column("watermark", sa.Text, nullable=False),
        sa.Column("watermark_key", sa.Text, nullable=False),
    )
    op.create_table(
        "removals",
        sa.Column("sync", sa.String(64), primary_key=True),
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("removed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
    )
    op.add_column("digests", sa.Column("sent", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("digests") as batch:
        batch.drop_column("sent")
    op.drop_table("removals")
    op.drop_table("feed_cursors")
