"""audit trail

``audit_records``: the DICOM audit messages the broker records (IHE ATNA), kept for
``audit_retention_days`` and delivered from here to the Audit Record Repository (the table is their
outbox: ``delivered_at`` is NULL until sent; a partial index holds those rows). ``audit_record_patients``:
the patients each record names, so that a search by patient uses an index.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 19:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'audit_records',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('recorded_at', sa.DateTime(), nullable=False),
        sa.Column('event_id', sa.String(length=16), nullable=False),
        sa.Column('event_type', sa.String(length=16), nullable=False),
        sa.Column('action', sa.String(length=1), nullable=False),
        sa.Column('outcome', sa.Integer(), nullable=False),
        sa.Column('user_id', sa.String(length=200), nullable=False),
        sa.Column('host', sa.String(length=200), nullable=False),
        sa.Column('event', sa.JSON(), nullable=False),
        sa.Column('delivered_at', sa.DateTime(), nullable=True),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_audit_recorded_at', 'audit_records', ['recorded_at'], unique=False)
    op.create_index('ix_audit_user', 'audit_records', ['user_id', 'recorded_at'], unique=False)
    op.create_index('ix_audit_event', 'audit_records', ['event_id', 'recorded_at'], unique=False)
    op.create_index('ix_audit_undelivered', 'audit_records', ['id'], unique=False,
                    sqlite_where=sa.text("delivered_at IS NULL"), postgresql_where=sa.text("delivered_at IS NULL"))
    op.create_table(
        'audit_record_patients',
        sa.Column('patient_id', sa.String(length=200), nullable=False),
        sa.Column('record_id', sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(['record_id'], ['audit_records.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('patient_id', 'record_id'),
    )
    op.create_index(op.f('ix_audit_record_patients_record_id'), 'audit_record_patients', ['record_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_audit_record_patients_record_id'), table_name='audit_record_patients')
    op.drop_table('audit_record_patients')
    op.drop_index('ix_audit_undelivered', table_name='audit_records')
    op.drop_index('ix_audit_event', table_name='audit_records')
    op.drop_index('ix_audit_user', table_name='audit_records')
    op.drop_index('ix_audit_recorded_at', table_name='audit_records')
    op.drop_table('audit_records')
