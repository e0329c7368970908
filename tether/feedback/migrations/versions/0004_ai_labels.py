"""AI pre-labels: the ai_labels table; projects.show_ai and projects.ai_threshold

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('ai_labels',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('project_id', sa.Integer(), nullable=False),
    sa.Column('task_id', sa.Integer(), nullable=False),
    sa.Column('agent', sa.String(length=160), nullable=False),
    sa.Column('choice', sa.String(length=8), nullable=False),
    sa.Column('confidence', sa.Float(), nullable=False),
    sa.Column('principle', sa.String(length=160), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('task_id', 'agent', name='uq_ai_labels_task_agent')
    )
    with op.batch_alter_table('ai_labels', schema=None) as batch_op:
        batch_op.create_index('ix_ai_labels_project', ['project_id'], unique=False)
    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.add_column(sa.Column('show_ai', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('ai_threshold', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.drop_column('ai_threshold')
        batch_op.drop_column('show_ai')
    with op.batch_alter_table('ai_labels', schema=None) as batch_op:
        batch_op.drop_index('ix_ai_labels_project')
    op.drop_table('ai_labels')
