"""One round trip per append: the lock, the idempotency check, the numbering and the insert run in
the database. Called in autocommit it is its own transaction; inside an open transaction it takes
the (re-entrant) append lock there, which is then held until that transaction ends.

Input: the append lock's key, then parallel arrays, one element per event, in order. Output: one
row per input element, in order: the event's position and whether it was already stored (a repeat
of a stored event id, or a second copy of an id earlier in the same call, stores nothing and gets
the first position).

Revision ID: 0007_append_function
"""

from alembic import op

revision = "0007_append_function"
down_revision = "0006_deployment_policy"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
CREATE FUNCTION append_events(
    p_lock_key bigint, p_event_ids uuid[], p_types text[], p_schema_versions integer[], p_entity_types text[],
    p_entity_ids text[], p_occurred_at timestamptz[], p_payloads text[], p_metadata text[]
) RETURNS TABLE (appended_seq bigint, duplicate boolean)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    base bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock_key);  -- d2d.eventlog.APPEND_LOCK_KEY, the one every appender takes
    -- A fresh snapshot after the lock: every append that committed before this one is seen.
    SELECT coalesce(max(e.seq), 0) INTO base FROM events e;
    RETURN QUERY
    WITH input AS (
        SELECT i.*
        FROM unnest(p_event_ids, p_types, p_schema_versions, p_entity_types, p_entity_ids, p_occurred_at,
                    p_payloads, p_metadata)
             WITH ORDINALITY AS i(event_id, type, schema_version, entity_type, entity_id, occurred_at,
                                  payload, metadata, ord)
    ),
    stored AS (
        SELECT e.event_id, e.seq FROM events e WHERE e.event_id = ANY (p_event_ids)
    ),
    fresh AS (
        SELECT DISTINCT ON (i.event_id) i.*
        FROM input i
        WHERE NOT EXISTS (SELECT 1 FROM stored s WHERE s.event_id = i.event_id)
        ORDER BY i.event_id, i.ord
    ),
    numbered AS (
        SELECT f.*, base + row_number() OVER (ORDER BY f.ord) AS seq FROM fresh f
    ),
    inserted AS (
        INSERT INTO events (seq, event_id, type, schema_version, entity_type, entity_id, occurred_at,
                            payload, metadata)
        SELECT n.seq, n.event_id, n.type, n.schema_version, n.entity_type, n.entity_id, n.occurred_at,
               n.payload::jsonb, n.metadata::jsonb
        FROM numbered n ORDER BY n.seq
        RETURNING 1
    )
    SELECT coalesce(s.seq, n.seq)::bigint, (s.seq IS NOT NULL OR n.ord <> i.ord)
    FROM input i
    LEFT JOIN stored s ON s.event_id = i.event_id
    LEFT JOIN numbered n ON n.event_id = i.event_id
    ORDER BY i.ord;
END;
$$
""")
    op.execute("""
        GRANT EXECUTE ON FUNCTION
            append_events(bigint, uuid[], text[], integer[], text[], text[], timestamptz[], text[], text[])
            TO d2d_service
    """)


def downgrade() -> None:
    raise NotImplementedError("the schema only moves forward: restore a backup to go back")
