"""Worklist folders: the state of each ``.wl`` file the broker read

``worklist_files``: one row per file of a watched folder (``broker.worklist_files``), so that a
restart does not re-import an unchanged file and a rewritten file updates its step.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 09:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'worklist_files',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('folder', sa.String(length=500), nullable=False),
        sa.Column('path', sa.String(length=500), nullable=False),
        sa.Column('size', sa.BigInteger(), nullable=False),
        sa.Column('mtime_ns', sa.BigInteger(), nullable=False),
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.Column('identity', sa.String(length=200), nullable=False),
        sa.Column('outcome', sa.String(length=16), nullable=False),
        sa.Column('error', sa.Text(), nullable=False),
        sa.Column('message_id', sa.Integer(), nullable=True),
        sa.Column('present', sa.Boolean(), nullable=False),
        sa.Column('read_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('folder', 'path', name='uq_worklist_files_path'),
    )
    op.create_index('ix_worklist_files_identity', 'worklist_files', ['identity'])


def downgrade() -> None:
    op.drop_index('ix_worklist_files_identity', table_name='worklist_files')
    op.drop_table('worklist_files')
