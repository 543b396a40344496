"""Feedback: decisions joined with their outcomes, and the registered outcome rules.

Both are projections: `decision_outcomes` of decision.made, decision.withdrawn and outcome.recorded
(applied by the feedback service's log consumer, in one transaction with its position), and
`outcome_rules` of outcome_rule.registered.

Revision ID: 0010_feedback
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0010_feedback"
down_revision = "0009_policy_in_event"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "decision_outcomes",
        sa.Column("decision_id", postgresql.UUID(as_uuid=True), primary_key=True),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("model_version", sa.Integer, nullable=False),
        sa.Column("arm", sa.Text, nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("propensity", sa.Float, nullable=False),
        sa.Column("explored", sa.Boolean, nullable=False),
        sa.Column("unit_id", sa.Text, nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decision_seq", sa.BigInteger, sa.ForeignKey("events.seq"), nullable=False),
        sa.Column("withdrawn", sa.Boolean, nullable=False, server_default=sa.text("false")),
        sa.Column("outcome_id", sa.Text),
        sa.Column("label", sa.SmallInteger),
        sa.Column("reward", sa.Float),
        sa.Column("outcome_at", sa.DateTime(timezone=True)),
        sa.Column("outcome_seq", sa.BigInteger, sa.ForeignKey("events.seq")),
        sa.Column("outcome_source", sa.Text),
    )
    op.create_index("decision_outcomes_model_decided_at", "decision_outcomes", ["model", "decided_at"])
    op.create_table(
        "outcome_rules",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("event_type", sa.Text, nullable=False),
        sa.Column("terms", postgresql.JSONB, nullable=False),
        sa.Column("registered_seq", sa.BigInteger, sa.ForeignKey("events.seq"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
    )
    op.execute("""
        CREATE TRIGGER outcome_rules_no_update_delete BEFORE UPDATE OR DELETE ON outcome_rules
            FOR EACH ROW EXECUTE FUNCTION events_reject_change()
    """)
    op.execute("GRANT SELECT, INSERT ON decision_outcomes, outcome_rules TO d2d_service")
    op.execute(
        "GRANT UPDATE (withdrawn, outcome_id, label, reward, outcome_at, outcome_seq, outcome_source)"
        " ON decision_outcomes TO d2d_service"
    )


def downgrade() -> None:
    raise NotImplementedError("the schema only moves forward: restore a backup to go back")
