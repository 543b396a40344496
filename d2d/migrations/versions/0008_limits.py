"""Limits that hold end to end (no single input stops the platform).

Contracts bound event time: `occurred_at` at most `max_future_skew_seconds` ahead of and at most
`max_age_seconds` behind the time ingest receives the event; existing versions get the defaults.
Dead letters keep a bounded prefix of oversized input, with the whole input's size and sha256.

Revision ID: 0008_limits
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_limits"
down_revision = "0007_append_function"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "contracts", sa.Column("max_future_skew_seconds", sa.BigInteger, nullable=False, server_default=sa.text("3600"))
    )
    op.add_column(
        "contracts", sa.Column("max_age_seconds", sa.BigInteger, nullable=False, server_default=sa.text("315532800"))
    )
    op.create_check_constraint("contracts_max_future_skew_seconds_check", "contracts", "max_future_skew_seconds >= 0")
    op.create_check_constraint("contracts_max_age_seconds_check", "contracts", "max_age_seconds > 0")

    op.add_column("dead_letters", sa.Column("raw_size", sa.BigInteger))
    op.add_column("dead_letters", sa.Column("raw_sha256", sa.Text))
    op.execute("UPDATE dead_letters SET raw_size = length(raw), raw_sha256 = encode(sha256(raw), 'hex')")
    op.alter_column("dead_letters", "raw_size", nullable=False)
    op.alter_column("dead_letters", "raw_sha256", nullable=False)


def downgrade() -> None:
    raise NotImplementedError("the schema only moves forward: restore a backup to go back")
