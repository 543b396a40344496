"""The role services run as: it may add to the log and read it, never change or remove.

Revision ID: 0003_service_role
"""

from alembic import op

revision = "0003_service_role"
down_revision = "0002_contracts_dead_letters"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Roles belong to the cluster, not the database: a second database finds it already there.
    op.execute("""
        DO $$
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'd2d_service') THEN
                CREATE ROLE d2d_service NOLOGIN;
            END IF;
        END
        $$
    """)
    op.execute("GRANT USAGE ON SCHEMA public TO d2d_service")
    op.execute("GRANT SELECT, INSERT ON events, contracts TO d2d_service")
    op.execute("GRANT SELECT, INSERT, UPDATE ON log_positions TO d2d_service")
    op.execute("GRANT SELECT, INSERT ON dead_letters TO d2d_service")
    op.execute("GRANT UPDATE (state, redriven_at, redriven_seq, code, reason, field) ON dead_letters TO d2d_service")
    op.execute("GRANT USAGE, SELECT ON SEQUENCE dead_letters_id_seq TO d2d_service")


def downgrade() -> None:
    raise NotImplementedError("the schema only moves forward: restore a backup to go back")
