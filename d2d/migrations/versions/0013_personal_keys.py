"""Personal data keys: one random AES-256 key per data subject (d2d.personal), in a table of its own.

This is the one table that is not a projection of the log, on purpose: personal fields are stored
in the log encrypted under their subject's key, and forgetting a subject (`d2d forget`) destroys
that key, which erases every copy of those fields at once (the log, the stream, every projection
and backup of them). A key kept in an append-only log could never be destroyed, so keys live here
and only here, and no event ever carries one (`subject.forgotten` records that a key was
destroyed, never the key or the data).

- ingest (d2d_ingest) creates a subject's key the first time one of its events carries personal
  fields, and reads it to encrypt: INSERT and SELECT;
- audit (d2d_audit) reads keys to show personal fields to those entitled (explain): SELECT;
- nobody but the owner (the role `d2d forget` connects as) may DELETE; no service may UPDATE, so a
  key is never replaced under the ciphertexts made with it.

Revision ID: 0013_personal_keys
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0013_personal_keys"
down_revision = "0012_service_roles"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "personal_keys",
        sa.Column("subject", sa.Text, primary_key=True),
        sa.Column("key_id", postgresql.UUID(as_uuid=True), nullable=False, server_default=sa.text("gen_random_uuid()")),
        sa.Column("key", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.CheckConstraint("length(key) = 32", name="personal_keys_key_check"),
    )
    op.execute("REVOKE ALL ON personal_keys FROM PUBLIC")
    op.execute("GRANT SELECT, INSERT ON personal_keys TO d2d_ingest")
    op.execute("GRANT SELECT ON personal_keys TO d2d_audit")


def downgrade() -> None:
    raise NotImplementedError("the schema only moves forward: restore a backup to go back")
