-- Feature views (immutable versions, registered as feature_view.registered events) and the
-- features service's snapshots of its folded state with the watermark they reflect.

CREATE TABLE feature_views (
    name            text        NOT NULL,
    version         text        NOT NULL,
    definition      jsonb       NOT NULL,
    registered_seq  bigint      NOT NULL REFERENCES events (seq),
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);
CREATE TRIGGER feature_views_no_update_delete BEFORE UPDATE OR DELETE ON feature_views
    FOR EACH ROW EXECUTE FUNCTION events_reject_change();

-- One row per consumer, replaced on every snapshot.
CREATE TABLE feature_snapshots (
    consumer        text        PRIMARY KEY,
    watermark       bigint      NOT NULL,       -- every event with seq <= watermark is folded in
    stream_seq      bigint      NOT NULL,       -- the JetStream position of that event
    views           jsonb       NOT NULL,       -- {view name: version}
    state           bytea       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

GRANT SELECT, INSERT ON feature_views TO d2d_service;
GRANT SELECT, INSERT, UPDATE ON feature_snapshots TO d2d_service;
