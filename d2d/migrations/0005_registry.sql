-- Models, immutable versions, content-addressed artifacts, and current aliases. The history of
-- aliases is the log itself (model.alias_set events); `model_aliases` is its latest state.

CREATE TABLE models (
    name            text        PRIMARY KEY,           -- the model id, e.g. 'fraud'
    description     text        NOT NULL DEFAULT '',
    registered_seq  bigint      NOT NULL REFERENCES events (seq),
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE artifacts (
    sha256          text        PRIMARY KEY,           -- hex digest of data
    data            bytea       NOT NULL,
    size_bytes      bigint      NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE model_versions (
    model           text        NOT NULL REFERENCES models (name),
    version         integer     NOT NULL CHECK (version > 0),
    sha256          text        NOT NULL REFERENCES artifacts (sha256),
    spec            jsonb       NOT NULL,
    evaluation      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    lineage         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    feature_names   text[]      NOT NULL,
    registered_seq  bigint      NOT NULL REFERENCES events (seq),
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, version)
);

CREATE TRIGGER model_versions_no_update_delete BEFORE UPDATE OR DELETE ON model_versions
    FOR EACH ROW EXECUTE FUNCTION events_reject_change();
CREATE TRIGGER artifacts_no_update_delete BEFORE UPDATE OR DELETE ON artifacts
    FOR EACH ROW EXECUTE FUNCTION events_reject_change();

CREATE TABLE model_aliases (
    model           text        NOT NULL REFERENCES models (name),
    alias           text        NOT NULL,
    version         integer     NOT NULL,
    set_seq         bigint      NOT NULL REFERENCES events (seq),
    PRIMARY KEY (model, alias),
    FOREIGN KEY (model, version) REFERENCES model_versions (model, version)
);

GRANT SELECT, INSERT ON models, artifacts, model_versions TO d2d_service;
GRANT SELECT, INSERT, UPDATE, DELETE ON model_aliases TO d2d_service;
