"""indexes the purge needs

Deleting an HL7 message or a patient makes the database check every foreign key that points to it;
without an index on the referring column each check reads the whole referring table (PostgreSQL and
SQLite alike). The retention purge deletes thousands of them a day: in bench/retention.py (60,000
orders on PostgreSQL) a pass took minutes without these indexes and under a second with them.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 08:50:00.000000
"""

from __future__ import annotations

from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

INDEXES = (
    ('ix_step_transitions_inbound_message_fk', 'step_transitions', 'inbound_message_fk'),
    ('ix_procedure_transitions_inbound_message_fk', 'procedure_transitions', 'inbound_message_fk'),
    ('ix_inbound_duplicate_of', 'inbound_messages', 'duplicate_of_id'),
    ('ix_patients_merged_into', 'patients', 'merged_into_id'),
)


def upgrade() -> None:
    for name, table, column in INDEXES:
        op.create_index(name, table, [column], unique=False)


def downgrade() -> None:
    for name, table, _ in INDEXES:
        op.drop_index(name, table_name=table)
