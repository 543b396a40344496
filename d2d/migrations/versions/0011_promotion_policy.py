"""A model's promotion policy (`model.promotion_policy_set`), and the decision/outcome join the
registry's canary watch reads.

`decision_outcomes` is the feedback service's projection (issue 12's plan); it is created here too
so the registry's closed loop can be built and tested before that revision lands: keep one.

Revision ID: 0011_promotion_policy
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0011_promotion_policy"
down_revision = "0009_policy_in_event"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("models", sa.Column("promotion_policy", postgresql.JSONB, nullable=True))
    op.execute("GRANT UPDATE (promotion_policy) ON models TO d2d_service")
    op.create_table(
        "decision_outcomes",
        sa.Column("decision_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("model_version", sa.Integer, nullable=False),
        sa.Column("arm", sa.Text, nullable=False),
        sa.Column("score", postgresql.DOUBLE_PRECISION, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("propensity", postgresql.DOUBLE_PRECISION, nullable=False),
        sa.Column("explored", sa.Boolean, nullable=False, server_default=sa.text("false")),
        sa.Column("unit_id", sa.Text),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decision_seq", sa.BigInteger, sa.ForeignKey("events.seq"), nullable=False),
        sa.Column("withdrawn", sa.Boolean, nullable=False, server_default=sa.text("false")),
        sa.Column("outcome_id", sa.Text),
        sa.Column("label", sa.SmallInteger),
        sa.Column("reward", postgresql.DOUBLE_PRECISION),
        sa.Column("outcome_at", sa.DateTime(timezone=True)),
        sa.Column("outcome_seq", sa.BigInteger, sa.ForeignKey("events.seq")),
        sa.Column("outcome_source", sa.Text),
        sa.PrimaryKeyConstraint("decision_id", name="decision_outcomes_pkey"),
    )
    op.create_index("decision_outcomes_model_seq", "decision_outcomes", ["model", "decision_seq"])
    op.execute("GRANT SELECT, INSERT, UPDATE ON decision_outcomes TO d2d_service")


def downgrade() -> None:
    raise NotImplementedError("the schema only moves forward: restore a backup to go back")
