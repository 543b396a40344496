"""A model's promotion policy (`model.promotion_policy_set`), and the index the registry's canary
watch reads the decision/outcome join by (a model's decisions after the canary was set).

Revision ID: 0011_promotion_policy
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0011_promotion_policy"
down_revision = "0010_feedback"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("models", sa.Column("promotion_policy", postgresql.JSONB, nullable=True))
    op.execute("GRANT UPDATE (promotion_policy) ON models TO d2d_service")
    op.create_index("decision_outcomes_model_seq", "decision_outcomes", ["model", "decision_seq"])


def downgrade() -> None:
    raise NotImplementedError("the schema only moves forward: restore a backup to go back")
