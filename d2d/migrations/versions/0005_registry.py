"""Models, immutable versions, content-addressed artifacts, and current aliases. The history of
aliases is the log itself (model.alias_set events); `model_aliases` is its latest state.

Revision ID: 0005_registry
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005_registry"
down_revision = "0004_features"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("name", sa.Text, primary_key=True),  # the model id, e.g. 'fraud'
        sa.Column("description", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("registered_seq", sa.BigInteger, sa.ForeignKey("events.seq"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
    )
    op.create_table(
        "artifacts",
        sa.Column("sha256", sa.Text, primary_key=True),  # hex digest of data
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
    )
    op.create_table(
        "model_versions",
        sa.Column("model", sa.Text, sa.ForeignKey("models.name"), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("sha256", sa.Text, sa.ForeignKey("artifacts.sha256"), nullable=False),
        sa.Column("spec", postgresql.JSONB, nullable=False),
        sa.Column("evaluation", postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("lineage", postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("feature_names", postgresql.ARRAY(sa.Text), nullable=False),
        sa.Column("registered_seq", sa.BigInteger, sa.ForeignKey("events.seq"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.PrimaryKeyConstraint("model", "version"),
        sa.CheckConstraint("version > 0", name="model_versions_version_check"),
    )
    op.execute("""
        CREATE TRIGGER model_versions_no_update_delete BEFORE UPDATE OR DELETE ON model_versions
            FOR EACH ROW EXECUTE FUNCTION events_reject_change()
    """)
    op.execute("""
        CREATE TRIGGER artifacts_no_update_delete BEFORE UPDATE OR DELETE ON artifacts
            FOR EACH ROW EXECUTE FUNCTION events_reject_change()
    """)
    op.create_table(
        "model_aliases",
        sa.Column("model", sa.Text, sa.ForeignKey("models.name"), nullable=False),
        sa.Column("alias", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("set_seq", sa.BigInteger, sa.ForeignKey("events.seq"), nullable=False),
        sa.PrimaryKeyConstraint("model", "alias"),
        sa.ForeignKeyConstraint(["model", "version"], ["model_versions.model", "model_versions.version"]),
    )

    op.execute("GRANT SELECT, INSERT ON models, artifacts, model_versions TO d2d_service")
    op.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON model_aliases TO d2d_service")


def downgrade() -> None:
    raise NotImplementedError("the schema only moves forward: restore a backup to go back")
