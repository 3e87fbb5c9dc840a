"""results: one row per (job, model, version), a role (reporting or shadow) and a shadow's error

Two versions of one model in one job (a route's reporting model and its shadow) collided on the old
(job_id, model_name) key.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 05:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # batch mode: SQLite rebuilds the table to change its constraints; PostgreSQL alters it in place
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("role", sa.String(length=16), server_default="reporting", nullable=False)
        )
        batch_op.add_column(sa.Column("error", sa.Text(), nullable=True))
        batch_op.drop_constraint("uq_results_job_model", type_="unique")
        batch_op.create_unique_constraint(
            "uq_results_job_model_version", ["job_id", "model_name", "model_version"]
        )


def downgrade() -> None:
    # shadow rows cannot live under the old key (a shadow may share its model's name): they go
    op.execute(sa.text("DELETE FROM results WHERE role = 'shadow'"))
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_constraint("uq_results_job_model_version", type_="unique")
        batch_op.create_unique_constraint("uq_results_job_model", ["job_id", "model_name"])
        batch_op.drop_column("error")
        batch_op.drop_column("role")
