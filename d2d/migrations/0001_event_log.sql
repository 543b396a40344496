-- The append-only event log: one table, a global position, idempotency by event id.

CREATE TABLE events (
    seq             bigint      PRIMARY KEY,          -- global position: max + 1 under the append lock, dense
    event_id        uuid        NOT NULL UNIQUE,      -- producer's idempotency key
    type            text        NOT NULL,
    schema_version  integer     NOT NULL,
    entity_type     text        NOT NULL,
    entity_id       text        NOT NULL,
    occurred_at     timestamptz NOT NULL,             -- event time
    recorded_at     timestamptz NOT NULL DEFAULT clock_timestamp(),  -- log time
    payload         jsonb       NOT NULL,
    metadata        jsonb       NOT NULL DEFAULT '{}'::jsonb
);

CREATE INDEX events_type_seq ON events (type, seq);
CREATE INDEX events_entity_seq ON events (entity_type, entity_id, seq);
CREATE INDEX events_occurred_at ON events (occurred_at);

-- Append-only, enforced by the database: no UPDATE, DELETE or TRUNCATE, whoever asks.
CREATE FUNCTION events_reject_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the event log is append-only: % on events is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER events_no_update_delete BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_reject_change();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_reject_change();

-- Wake tailing readers (the outbox relay) when a transaction that appended commits.
CREATE FUNCTION events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('d2d_events', '');
    RETURN NULL;
END;
$$;
CREATE TRIGGER events_notify AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_notify();

-- How far each publisher of the log (the outbox relay) got; updated in place.
CREATE TABLE log_positions (
    name        text        PRIMARY KEY,
    seq         bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
