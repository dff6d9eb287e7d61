"""worklist indexes

The worklist reads its matches in keyset pages ordered by (scheduled_start, id). A query on a date
range alone (the broad "this week" query, no station or modality) had no index to range-scan in that
order; with this one every page is an index range scan that stops after page_size rows, and the
undated phase (scheduled_start IS NULL, by id) uses it too.

On PostgreSQL the text columns a worklist query matches on get the "C" collation: a B-tree index
serves a prefix wildcard (LIKE 'DOE%') only under it, and a database created with a language
collation would otherwise scan the table for every wildcard query.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 09:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


# scheduled_steps text columns a query matches on, and their lengths (broker.store.tables.matching_text).
MATCHING_TEXT = {
    'sps_id': 16, 'sps_status': 16, 'scheduled_station_ae_title': 16, 'scheduled_station_name': 16,
    'sps_location': 16, 'modality': 16, 'performing_physician': 324, 'performing_physician_norm': 324,
    'patient_name': 324, 'patient_name_norm': 324, 'patient_id': 64, 'issuer_of_patient_id': 64,
    'patient_sex': 16, 'accession_number': 16, 'requested_procedure_id': 16, 'study_instance_uid': 64,
    'referring_physician': 324, 'requesting_physician': 324, 'admission_id': 64, 'placer_order_number': 64,
    'filler_order_number': 64,
}


def _collate(collation: str | None) -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    for column, length in MATCHING_TEXT.items():
        op.alter_column('scheduled_steps', column, type_=sa.String(length, collation=collation),
                        existing_type=sa.String(length))


def upgrade() -> None:
    with op.batch_alter_table('scheduled_steps', schema=None) as batch_op:
        batch_op.create_index('ix_steps_start', ['scheduled_start', 'id'], unique=False)
    _collate('C')


def downgrade() -> None:
    _collate('default')
    with op.batch_alter_table('scheduled_steps', schema=None) as batch_op:
        batch_op.drop_index('ix_steps_start')
