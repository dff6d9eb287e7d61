"""worklist indexes

The worklist reads its matches in keyset pages ordered by (scheduled_start, id). A query on a date
range alone (the broad "this week" query, no station or modality) had no index to range-scan in that
order; with this one every page is an index range scan that stops after page_size rows, and the
undated phase (scheduled_start IS NULL, by id) uses it too.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 09:00:00.000000
"""

from __future__ import annotations

from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('scheduled_steps', schema=None) as batch_op:
        batch_op.create_index('ix_steps_start', ['scheduled_start', 'id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('scheduled_steps', schema=None) as batch_op:
        batch_op.drop_index('ix_steps_start')
