"""A model's deployment policy comes from its `model.registered` event only.

The column's default named a domain's actions (approve, decline) in the platform's schema; every
`model.registered` event now carries its model's policy, so the projector writes it and the
column needs no default.

Revision ID: 0009_policy_in_event
"""

from alembic import op

revision = "0009_policy_in_event"
down_revision = "0008_limits"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.alter_column("models", "deployment_policy", server_default=None)


def downgrade() -> None:
    raise NotImplementedError("the schema only moves forward: restore a backup to go back")
