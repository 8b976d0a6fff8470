"""chunk store

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22

The encrypted chunk store (issue 3): each file row gets the UUID its stored object is named
after and bound to (``files.uuid``), the format version of that object and the time its chunks
were removed from every location after a crypto-shredding delete (``files.purged_at``), and its
chunk boundaries when they are not the fixed grid (``files.chunk_map``);
``replica_faults`` records replicas that failed to deliver a chunk.
"""

from alembic import op
import sqlalchemy as sa
import labvault.datastore.models

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'replica_faults',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('file_id', sa.Integer(), nullable=False),
        sa.Column('location', sa.String(length=100), nullable=False),
        sa.Column('chunk_index', sa.BigInteger(), nullable=True),
        sa.Column('kind', sa.String(length=20), nullable=False),
        sa.Column('detail', sa.Text(), nullable=False),
        sa.Column('detected_by', sa.String(length=20), nullable=False),
        sa.Column('detected_at', labvault.datastore.models.UTCDateTime(), nullable=False),
        sa.Column('resolved_at', labvault.datastore.models.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(['file_id'], ['files.id'], name=op.f('fk_replica_faults_file_id_files')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_replica_faults')),
    )
    op.create_index('ix_replica_faults_file', 'replica_faults', ['file_id', 'resolved_at'], unique=False)

    # Plain ADD COLUMN / CREATE INDEX: SQLite needs no table copy for these.
    with op.batch_alter_table('files', schema=None) as batch_op:
        batch_op.add_column(sa.Column('uuid', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('format_version', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('chunk_map', sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column('purged_at', labvault.datastore.models.UTCDateTime(), nullable=True))
        batch_op.create_index('ux_files_uuid', ['uuid'], unique=True)


def downgrade() -> None:
    with op.batch_alter_table('files', schema=None) as batch_op:
        batch_op.drop_index('ux_files_uuid')
        batch_op.drop_column('purged_at')
        batch_op.drop_column('chunk_map')
        batch_op.drop_column('format_version')
        batch_op.drop_column('uuid')
    op.drop_index('ix_replica_faults_file', table_name='replica_faults')
    op.drop_table('replica_faults')
