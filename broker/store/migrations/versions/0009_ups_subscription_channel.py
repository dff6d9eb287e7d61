"""UPS subscriptions: the channel that carries a subscriber's event reports

``ups_subscriptions.channel``: ``dimse`` (N-EVENT-REPORT over an association to the subscriber AE,
the only channel so far, hence the default of the existing rows) or ``websocket`` (a subscription
made over UPS-RS: the reports wait in the outbox until the subscriber opens its WebSocket
channel, PS3.18 11.10 and 8.10.4).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 09:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('ups_subscriptions') as batch:
        batch.add_column(sa.Column('channel', sa.String(length=16), nullable=False, server_default='dimse'))


def downgrade() -> None:
    with op.batch_alter_table('ups_subscriptions') as batch:
        batch.drop_column('channel')
