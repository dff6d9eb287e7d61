"""outbox open events index

The relay publishes the head of each ordering key: a due event with no earlier event of its key that
is not done. Asked per pending row (NOT EXISTS over ``ix_outbox_ordering``), that search walked every
pending row and the done rows of its key: with a few thousand pending UPS event reports it took
~140 ms per relay poll on PostgreSQL (measured), and the relay polls after every commit. This partial
index holds only the events that are not done, so the first open event of each key is found from it.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 19:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_outbox_open', 'outbox', ['ordering_key', 'id'], unique=False,
                    sqlite_where=sa.text("status != 'done'"), postgresql_where=sa.text("status != 'done'"))


def downgrade() -> None:
    op.drop_index('ix_outbox_open', table_name='outbox')
