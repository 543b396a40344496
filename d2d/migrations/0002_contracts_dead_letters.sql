-- Data contracts (immutable versions) and dead letters (refused input, kept with its bytes).

CREATE TABLE contracts (
    event_type               text        NOT NULL,
    version                  integer     NOT NULL CHECK (version > 0),
    owner                    text        NOT NULL,
    description              text        NOT NULL DEFAULT '',
    json_schema              jsonb       NOT NULL,
    pii_fields               text[]      NOT NULL DEFAULT '{}',
    compatibility            text        NOT NULL,
    allowed_lateness_seconds integer     NOT NULL DEFAULT 0,
    null_rate_limits         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at               timestamptz NOT NULL DEFAULT now(),
    registered_seq           bigint      NOT NULL REFERENCES events (seq),
    PRIMARY KEY (event_type, version)
);

CREATE TRIGGER contracts_no_update_delete BEFORE UPDATE OR DELETE ON contracts
    FOR EACH ROW EXECUTE FUNCTION events_reject_change();

CREATE TABLE dead_letters (
    id              bigserial   PRIMARY KEY,
    received_at     timestamptz NOT NULL DEFAULT now(),
    source          text        NOT NULL,              -- 'grpc' or 'nats:<subject>'
    event_id        text,
    event_type      text,
    raw             bytea       NOT NULL,              -- exactly what was received
    code            text        NOT NULL,              -- gRPC status code name
    reason          text        NOT NULL,
    field           text,                              -- the offending field, when one is known
    state           text        NOT NULL DEFAULT 'PENDING' CHECK (state IN ('PENDING', 'REDRIVEN')),
    redriven_at     timestamptz,
    redriven_seq    bigint
);
CREATE INDEX dead_letters_pending ON dead_letters (event_type, id) WHERE state = 'PENDING';
