"""accounts and notices

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22

Sign-in (issue 5): ``local_credentials`` (password hash, TOTP, lockout, e-mail confirmation
token of local accounts) and ``external_identities`` (identity-provider logins). Lifecycle
(issue 8): ``notices``, an outbox of e-mail notices recorded with the decision behind them.
"""

from alembic import op
import sqlalchemy as sa
import labvault.datastore.models


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('external_identities',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('idp', sa.String(length=255), nullable=False),
    sa.Column('subject', sa.String(length=255), nullable=False),
    sa.Column('claims', sa.JSON(), nullable=False),
    sa.Column('created_at', labvault.datastore.models.UTCDateTime(), nullable=False),
    sa.Column('last_seen_at', labvault.datastore.models.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_external_identities_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_external_identities')),
    sa.UniqueConstraint('idp', 'subject', name=op.f('uq_external_identities_idp'))
    )
    with op.batch_alter_table('external_identities', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_external_identities_user_id'), ['user_id'], unique=False)

    op.create_table('local_credentials',
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('password_hash', sa.String(length=200), nullable=False),
    sa.Column('totp_secret', sa.String(length=64), nullable=True),
    sa.Column('totp_confirmed_at', labvault.datastore.models.UTCDateTime(), nullable=True),
    sa.Column('failed_attempts', sa.Integer(), nullable=False),
    sa.Column('locked_until', labvault.datastore.models.UTCDateTime(), nullable=True),
    sa.Column('email_token_hash', sa.String(length=64), nullable=True),
    sa.Column('email_token_expires_at', labvault.datastore.models.UTCDateTime(), nullable=True),
    sa.Column('adult_confirmed_at', labvault.datastore.models.UTCDateTime(), nullable=True),
    sa.Column('signup_ip', sa.String(length=45), nullable=True),
    sa.Column('totp_last_counter', sa.BigInteger(), nullable=True),
    sa.Column('created_at', labvault.datastore.models.UTCDateTime(), nullable=False),
    sa.Column('updated_at', labvault.datastore.models.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_local_credentials_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('user_id', name=op.f('pk_local_credentials'))
    )
    with op.batch_alter_table('local_credentials', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_local_credentials_email_token_hash'), ['email_token_hash'], unique=False)

    op.create_table('notices',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.String(length=50), nullable=False),
    sa.Column('rule', sa.String(length=80), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=True),
    sa.Column('subject', sa.String(length=300), nullable=False),
    sa.Column('body', sa.Text(), nullable=False),
    sa.Column('created_at', labvault.datastore.models.UTCDateTime(), nullable=False),
    sa.Column('sent_at', labvault.datastore.models.UTCDateTime(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_notices_user_id_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_notices')),
    sa.UniqueConstraint('key', name=op.f('uq_notices_key'))
    )
    with op.batch_alter_table('notices', schema=None) as batch_op:
        batch_op.create_index('ix_notices_unsent', ['sent_at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('notices', schema=None) as batch_op:
        batch_op.drop_index('ix_notices_unsent')

    op.drop_table('notices')
    with op.batch_alter_table('local_credentials', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_local_credentials_email_token_hash'))

    op.drop_table('local_credentials')
    with op.batch_alter_table('external_identities', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_external_identities_user_id'))

    op.drop_table('external_identities')
