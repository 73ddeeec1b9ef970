"""The initial state schema: syncs, pushes, digests, dead letters.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")  # SQLite autoincrements INTEGER only


def upgrade() -> None:
    op.create_table(
        "syncs",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("watermark", sa.Text),
        sa.Column("watermark_key", sa.Text),
        sa.Column("last_run_at", sa.DateTime(timezone=True)),
        sa.Column("last_success_at", sa.DateTime(timezone=True)),
        sa.Column("last_error", sa.Text),
        sa.Column("records_sent", sa.BigInteger, nullable=False),
        sa.Column("backlog", sa.BigInteger),
        sa.Column("owner", sa.String(200)),
        sa.Column("lease_until", sa.DateTime(timezone=True)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "pushes",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("sync", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("record_count", sa.Integer, nullable=False),
        sa.Column("http_status", sa.Integer),
        sa.Column("api_code", sa.Integer),
        sa.Column("description", sa.Text),
        sa.Column("trans_id", sa.String(100)),
        sa.Column("correlation_id", sa.String(100)),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("duration_ms", sa.Float, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
    )
    op.create_index("ix_pushes_sync_sent_at", "pushes", ["sync", "sent_at"])
    op.create_table(
        "digests",
        sa.Column("sync", sa.String(64), primary_key=True),
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("digest", sa.LargeBinary(16), nullable=False),
        sqlite_with_rowid=False,  # the primary key is the table: one B-tree, not two
    )
    op.create_table(
        "dead_letters",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("sync", sa.String(64), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("payload", sa.Text),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("http_status", sa.Integer),
        sa.Column("api_code", sa.Integer),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True)),
        sa.Column("resolution", sa.String(16)),
    )
    op.create_index("ix_dead_letters_sync_key", "dead_letters", ["sync", "key"])


def downgrade() -> None:
    op.drop_table("dead_letters")
    op.drop_table("digests")
    op.drop_table("pushes")
    op.drop_table("syncs")
