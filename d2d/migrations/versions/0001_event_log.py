"""The append-only event log: one table, a global position, idempotency by event id; triggers
that refuse changes and wake tailing readers; the publishers' positions.

Revision ID: 0001_event_log
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001_event_log"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),  # max + 1 under the append lock
        sa.Column("event_id", postgresql.UUID, nullable=False, unique=True),  # the producer's idempotency key
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("schema_version", sa.Integer, nullable=False),
        sa.Column("entity_type", sa.Text, nullable=False),
        sa.Column("entity_id", sa.Text, nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),  # event time
        sa.Column(
            "recorded_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("clock_timestamp()")
        ),  # log time
        sa.Column("payload", postgresql.JSONB, nullable=False),
        sa.Column("metadata", postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    )
    op.create_index("events_type_seq", "events", ["type", "seq"])
    op.create_index("events_entity_seq", "events", ["entity_type", "entity_id", "seq"])
    op.create_index("events_occurred_at", "events", ["occurred_at"])

    # Append-only, enforced by the database: no UPDATE, DELETE or TRUNCATE, whoever asks.
    # (Function bodies sit flush left: Postgres keeps their text byte for byte, and databases the
    # numbered SQL files built hold them so.)
    op.execute("""
CREATE FUNCTION events_reject_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the event log is append-only: % on events is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$
""")
    op.execute("""
        CREATE TRIGGER events_no_update_delete BEFORE UPDATE OR DELETE ON events
            FOR EACH ROW EXECUTE FUNCTION events_reject_change()
    """)
    op.execute("""
        CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
            FOR EACH STATEMENT EXECUTE FUNCTION events_reject_change()
    """)

    # Wake tailing readers (the outbox relay) when a transaction that appended commits.
    op.execute("""
CREATE FUNCTION events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('d2d_events', '');
    RETURN NULL;
END;
$$
""")
    op.execute("""
        CREATE TRIGGER events_notify AFTER INSERT ON events
            FOR EACH STATEMENT EXECUTE FUNCTION events_notify()
    """)

    # How far each publisher of the log (the outbox relay) got; updated in place.
    op.create_table(
        "log_positions",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
    )


def downgrade() -> None:
    raise NotImplementedError("the schema only moves forward: restore a backup to go back")
