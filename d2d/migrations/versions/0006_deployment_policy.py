"""How serving routes and decides per model; changes are model.policy_set events.

Revision ID: 0006_deployment_policy
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006_deployment_policy"
down_revision = "0005_registry"
branch_labels = None
depends_on = None

DEFAULT_POLICY = (
    """'{"canary_share": 0.0, "epsilon": 0.0, "threshold": 0.5, "actions": ["approve", "decline"]}'::jsonb"""
)


def upgrade() -> None:
    op.add_column(
        "models",
        sa.Column("deployment_policy", postgresql.JSONB, nullable=False, server_default=sa.text(DEFAULT_POLICY)),
    )
    op.execute("GRANT UPDATE (description, deployment_policy) ON models TO d2d_service")


def downgrade() -> None:
    raise NotImplementedError("the schema only moves forward: restore a backup to go back")
