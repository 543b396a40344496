"""Data contracts (immutable versions) and dead letters (refused input, kept with its bytes).

Revision ID: 0002_contracts_dead_letters
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002_contracts_dead_letters"
down_revision = "0001_event_log"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "contracts",
        sa.Column("event_type", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("description", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("json_schema", postgresql.JSONB, nullable=False),
        sa.Column("pii_fields", postgresql.ARRAY(sa.Text), nullable=False, server_default=sa.text("'{}'")),
        sa.Column("compatibility", sa.Text, nullable=False),
        sa.Column("allowed_lateness_seconds", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("null_rate_limits", postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.Column("registered_seq", sa.BigInteger, sa.ForeignKey("events.seq"), nullable=False),
        sa.PrimaryKeyConstraint("event_type", "version"),
        sa.CheckConstraint("version > 0", name="contracts_version_check"),
    )
    op.execute("""
        CREATE TRIGGER contracts_no_update_delete BEFORE UPDATE OR DELETE ON contracts
            FOR EACH ROW EXECUTE FUNCTION events_reject_change()
    """)

    op.create_table(
        "dead_letters",
        sa.Column("id", sa.BigInteger, primary_key=True),  # bigserial
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.Column("source", sa.Text, nullable=False),  # 'grpc' or 'nats:<subject>'
        sa.Column("event_id", sa.Text),
        sa.Column("event_type", sa.Text),
        sa.Column("raw", sa.LargeBinary, nullable=False),  # exactly what was received
        sa.Column("code", sa.Text, nullable=False),  # gRPC status code name
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("field", sa.Text),  # the offending field, when one is known
        sa.Column("state", sa.Text, nullable=False, server_default=sa.text("'PENDING'")),
        sa.Column("redriven_at", sa.DateTime(timezone=True)),
        sa.Column("redriven_seq", sa.BigInteger),
        sa.CheckConstraint("state IN ('PENDING', 'REDRIVEN')", name="dead_letters_state_check"),
    )
    op.create_index(
        "dead_letters_pending", "dead_letters", ["event_type", "id"], postgresql_where=sa.text("state = 'PENDING'")
    )


def downgrade() -> None:
    raise NotImplementedError("the schema only moves forward: restore a backup to go back")
