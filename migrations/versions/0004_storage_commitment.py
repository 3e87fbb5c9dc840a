"""commitments table and outbox.commitment_id: Storage Commitment Push Model transactions

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 05:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import dicomnode.db

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COMMITMENT_STATES = ("requested", "committed", "failed", "refused", "request-failed", "timed-out")


def upgrade() -> None:
    op.create_table(
        "commitments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("transaction_uid", sa.String(length=64), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column(
            "state",
            sa.Enum(*_COMMITMENT_STATES, name="commitmentstate", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("objects", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("requested_at", dicomnode.db.UTCDateTime(), nullable=False),
        sa.Column("deadline_at", dicomnode.db.UTCDateTime(), nullable=False),
        sa.Column("answered_at", dicomnode.db.UTCDateTime(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_commitments")),
        sa.UniqueConstraint("transaction_uid", name=op.f("uq_commitments_transaction_uid")),
    )
    with op.batch_alter_table("commitments", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_commitments_deadline_at"), ["deadline_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_commitments_destination"), ["destination"], unique=False)
        batch_op.create_index(batch_op.f("ix_commitments_state"), ["state"], unique=False)
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("commitment_id", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_outbox_commitment_id"), ["commitment_id"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_outbox_commitment_id_commitments"), "commitments", ["commitment_id"], ["id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_outbox_commitment_id_commitments"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_outbox_commitment_id"))
        batch_op.drop_column("commitment_id")
    with op.batch_alter_table("commitments", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_commitments_state"))
        batch_op.drop_index(batch_op.f("ix_commitments_destination"))
        batch_op.drop_index(batch_op.f("ix_commitments_deadline_at"))
    op.drop_table("commitments")
