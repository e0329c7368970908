"""tasks: the index next_task walks (project, gold, claims, id) replaces (project, claims)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04 02:30:00
"""
from alembic import op


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_index('ix_tasks_project_claims')
        batch_op.create_index('ix_tasks_next', ['project_id', 'is_gold', 'n_claims', 'id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_index('ix_tasks_next')
        batch_op.create_index('ix_tasks_project_claims', ['project_id', 'n_claims'], unique=False)
