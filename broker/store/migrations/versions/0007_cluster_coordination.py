"""cluster coordination

``cluster_leases``: named leases (periodic jobs, the audit shipper, one association per UPS
subscriber) that one holder of the cluster keeps until it lets go or stops renewing them.
``cluster_nodes``: the registry of ``broker run`` nodes and their heartbeats.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 05:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'cluster_leases',
        sa.Column('name', sa.String(length=200), nullable=False),
        sa.Column('holder', sa.String(length=200), nullable=False),
        sa.Column('acquired_at', sa.DateTime(), nullable=False),
        sa.Column('expires_at', sa.DateTime(), nullable=False),
        sa.Column('wanted_by', sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint('name'),
    )
    op.create_table(
        'cluster_nodes',
        sa.Column('node_id', sa.String(length=200), nullable=False),
        sa.Column('host', sa.String(length=255), nullable=False),
        sa.Column('pid', sa.Integer(), nullable=False),
        sa.Column('ae_title', sa.String(length=16), nullable=False),
        sa.Column('started_at', sa.DateTime(), nullable=False),
        sa.Column('heartbeat_at', sa.DateTime(), nullable=False),
        sa.Column('stopped_at', sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint('node_id'),
    )


def downgrade() -> None:
    op.drop_table('cluster_nodes')
    op.drop_table('cluster_leases')
