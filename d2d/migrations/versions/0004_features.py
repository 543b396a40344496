"""Feature views (immutable versions, registered as feature_view.registered events) and the
features service's snapshots of its folded state with the watermark they reflect.

Revision ID: 0004_features
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004_features"
down_revision = "0003_service_role"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "feature_views",
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("version", sa.Text, nullable=False),
        sa.Column("definition", postgresql.JSONB, nullable=False),
        sa.Column("registered_seq", sa.BigInteger, sa.ForeignKey("events.seq"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.PrimaryKeyConstraint("name", "version"),
    )
    op.execute("""
        CREATE TRIGGER feature_views_no_update_delete BEFORE UPDATE OR DELETE ON feature_views
            FOR EACH ROW EXECUTE FUNCTION events_reject_change()
    """)

    # One row per consumer, replaced on every snapshot.
    op.create_table(
        "feature_snapshots",
        sa.Column("consumer", sa.Text, primary_key=True),
        sa.Column("watermark", sa.BigInteger, nullable=False),  # every event with seq <= watermark is folded in
        sa.Column("stream_seq", sa.BigInteger, nullable=False),  # the JetStream position of that event
        sa.Column("views", postgresql.JSONB, nullable=False),  # {view name: version}
        sa.Column("state", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
    )

    op.execute("GRANT SELECT, INSERT ON feature_views TO d2d_service")
    op.execute("GRANT SELECT, INSERT, UPDATE ON feature_snapshots TO d2d_service")


def downgrade() -> None:
    raise NotImplementedError("the schema only moves forward: restore a backup to go back")
