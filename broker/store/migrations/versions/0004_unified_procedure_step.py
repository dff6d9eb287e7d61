"""unified procedure step

Every scheduled step is also a UPS workitem (PS3.4 CC). ``scheduled_steps.ups_instance_uid``
names it; the steps stored before this revision get the UID the intake now derives for new ones
(a name-based UUID of Study Instance UID + SPS ID, see broker.domain.ups_identity: the formula is repeated
here so this revision keeps doing what it did). ``ups_workitems`` holds the UPS-only state of a step
(Transaction UID, performer, UPS attributes) once UPS touched it; ``ups_subscriptions`` the subscribers.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 16:00:00.000000
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

_NAMESPACE = uuid.UUID("5b0d43a4-7d1f-4f56-9a55-3c2f6c0a2b1e")  # = broker.domain.ups_identity.NAMESPACE


def _derived(study_instance_uid: str, sps_id: str) -> str:
    return "2.25." + str(uuid.uuid5(_NAMESPACE, f"{study_instance_uid}\\{sps_id}").int)


def upgrade() -> None:
    with op.batch_alter_table('scheduled_steps', schema=None) as batch_op:
        batch_op.add_column(sa.Column('ups_instance_uid', sa.String(length=64), nullable=True))
    bind = op.get_bind()
    steps = sa.table('scheduled_steps', sa.column('id', sa.Integer()), sa.column('study_instance_uid', sa.String()),
                     sa.column('sps_id', sa.String()), sa.column('ups_instance_uid', sa.String()))
    rows = bind.execute(sa.select(steps.c.id, steps.c.study_instance_uid, steps.c.sps_id)).all()
    if rows:
        bind.execute(sa.update(steps).where(steps.c.id == sa.bindparam('pk')).values(
            ups_instance_uid=sa.bindparam('uid')),
            [{'pk': r.id, 'uid': _derived(r.study_instance_uid, r.sps_id)} for r in rows])
    with op.batch_alter_table('scheduled_steps', schema=None) as batch_op:
        batch_op.create_index('ix_steps_ups_instance_uid', ['ups_instance_uid'], unique=False)

    op.create_table('ups_workitems',
    sa.Column('step_fk', sa.Integer(), nullable=False),
    sa.Column('transaction_uid', sa.String(length=64), nullable=False),
    sa.Column('performer_ae', sa.String(length=16), nullable=False),
    sa.Column('attributes', sa.JSON(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['step_fk'], ['scheduled_steps.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('step_fk')
    )
    op.create_table('ups_subscriptions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('subscriber_ae', sa.String(length=16), nullable=False),
    sa.Column('workitem_uid', sa.String(length=64), nullable=False),
    sa.Column('is_global', sa.Boolean(), nullable=False),
    sa.Column('matching_keys', sa.JSON(), nullable=True),
    sa.Column('deletion_lock', sa.Boolean(), nullable=False),
    sa.Column('suspended_at', sa.DateTime(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('subscriber_ae', 'workitem_uid', name='uq_ups_subscription')
    )
    with op.batch_alter_table('ups_subscriptions', schema=None) as batch_op:
        batch_op.create_index('ix_ups_subscriptions_workitem', ['workitem_uid'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('ups_subscriptions', schema=None) as batch_op:
        batch_op.drop_index('ix_ups_subscriptions_workitem')
    op.drop_table('ups_subscriptions')
    op.drop_table('ups_workitems')
    with op.batch_alter_table('scheduled_steps', schema=None) as batch_op:
        batch_op.drop_index('ix_steps_ups_instance_uid')
        batch_op.drop_column('ups_instance_uid')
