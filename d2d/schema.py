"""The database schema, declared once: every table, column, default, key, check and index.

Alembic revisions (d2d/migrations/versions/) build it; tests/test_schema.py fails when the two
disagree (`alembic check`). Functions, triggers and grants are not tables: they are SQL in the
revisions that create them. Read paths that compose filters may query these `Table`s with
SQLAlchemy Core; the hot paths (append, tailing, decisions) stay on asyncpg in d2d.eventlog.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

# Postgres's own default constraint names, so a constraint is called the same whether a revision
# named it or Postgres did (CHECK constraints are named explicitly below).
metadata = MetaData(
    naming_convention={
        "pk": "%(table_name)s_pkey",
        "uq": "%(table_name)s_%(column_0_N_name)s_key",
        "fk": "%(table_name)s_%(column_0_N_name)s_fkey",
    }
)

NOW = text("now()")
EMPTY_JSON = text("'{}'::jsonb")


def _timestamp(name: str, **kwargs: object) -> Column:
    return Column(name, DateTime(timezone=True), nullable=False, **kwargs)


def _seq_of(name: str) -> Column:
    """A position in the log: the event this row was derived from."""
    return Column(name, BigInteger, ForeignKey("events.seq"), nullable=False)


# The append-only log; append_events() (a SQL function) numbers `seq` max + 1 under the append lock.
events = Table(
    "events",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),  # global position, dense
    Column("event_id", UUID(as_uuid=True), nullable=False, unique=True),  # the producer's idempotency key
    Column("type", Text, nullable=False),
    Column("schema_version", Integer, nullable=False),
    Column("entity_type", Text, nullable=False),
    Column("entity_id", Text, nullable=False),
    _timestamp("occurred_at"),  # event time
    _timestamp("recorded_at", server_default=text("clock_timestamp()")),  # log time
    Column("payload", JSONB, nullable=False),
    Column("metadata", JSONB, nullable=False, server_default=EMPTY_JSON),
    Index("events_type_seq", "type", "seq"),
    Index("events_entity_seq", "entity_type", "entity_id", "seq"),
    Index("events_occurred_at", "occurred_at"),
)


def _owner_role() -> Column:
    """The group role of the service whose row it is: row-level security lets only that service
    change it (migration 0012)."""
    return Column("owner_role", Text, nullable=False, server_default=text("d2d_service_group()"))


# How far each publisher of the log (the outbox relay) got; updated in place.
log_positions = Table(
    "log_positions",
    metadata,
    Column("name", Text, primary_key=True),
    Column("seq", BigInteger, nullable=False),
    _timestamp("updated_at", server_default=NOW),
    _owner_role(),
)

contracts = Table(
    "contracts",
    metadata,
    Column("event_type", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("owner", Text, nullable=False),
    Column("description", Text, nullable=False, server_default=text("''::text")),
    Column("json_schema", JSONB, nullable=False),
    Column("pii_fields", ARRAY(Text), nullable=False, server_default=text("'{}'::text[]")),
    Column("compatibility", Text, nullable=False),
    Column("allowed_lateness_seconds", Integer, nullable=False, server_default=text("0")),
    Column("null_rate_limits", JSONB, nullable=False, server_default=EMPTY_JSON),
    _timestamp("created_at", server_default=NOW),
    _seq_of("registered_seq"),
    Column("max_future_skew_seconds", BigInteger, nullable=False, server_default=text("3600")),
    Column("max_age_seconds", BigInteger, nullable=False, server_default=text("315532800")),
    PrimaryKeyConstraint("event_type", "version"),
    CheckConstraint("version > 0", name="contracts_version_check"),
    CheckConstraint("max_future_skew_seconds >= 0", name="contracts_max_future_skew_seconds_check"),
    CheckConstraint("max_age_seconds > 0", name="contracts_max_age_seconds_check"),
)

# Refused input, kept with a bounded prefix of its bytes and the whole input's size and sha256.
dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", BigInteger, primary_key=True),  # bigserial: sequence dead_letters_id_seq
    _timestamp("received_at", server_default=NOW),
    Column("source", Text, nullable=False),  # 'grpc' or 'nats:<subject>'
    Column("event_id", Text),
    Column("event_type", Text),
    Column("raw", LargeBinary, nullable=False),
    Column("code", Text, nullable=False),  # gRPC status code name
    Column("reason", Text, nullable=False),
    Column("field", Text),  # the offending field, when one is known
    Column("state", Text, nullable=False, server_default=text("'PENDING'::text")),
    Column("redriven_at", DateTime(timezone=True)),
    Column("redriven_seq", BigInteger),
    Column("raw_size", BigInteger, nullable=False),
    Column("raw_sha256", Text, nullable=False),
    CheckConstraint("state IN ('PENDING', 'REDRIVEN')", name="dead_letters_state_check"),
    Index("dead_letters_pending", "event_type", "id", postgresql_where=text("state = 'PENDING'")),
)

feature_views = Table(
    "feature_views",
    metadata,
    Column("name", Text, nullable=False),
    Column("version", Text, nullable=False),
    Column("definition", JSONB, nullable=False),
    _seq_of("registered_seq"),
    _timestamp("created_at", server_default=NOW),
    PrimaryKeyConstraint("name", "version"),
)

# The features service's folded state, one row per consumer, replaced on every snapshot.
feature_snapshots = Table(
    "feature_snapshots",
    metadata,
    Column("consumer", Text, primary_key=True),
    Column("watermark", BigInteger, nullable=False),  # every event with seq <= watermark is folded in
    Column("stream_seq", BigInteger, nullable=False),  # the JetStream position of that event
    Column("views", JSONB, nullable=False),  # {view name: version}
    Column("state", LargeBinary, nullable=False),
    _timestamp("created_at", server_default=NOW),
    _owner_role(),
)

models = Table(
    "models",
    metadata,
    Column("name", Text, primary_key=True),  # the model id, e.g. 'fraud'
    Column("description", Text, nullable=False, server_default=text("''::text")),
    _seq_of("registered_seq"),
    _timestamp("created_at", server_default=NOW),
    Column("deployment_policy", JSONB, nullable=False),
    # How the registry promotes a retrained candidate through canary; NULL: the domain's default.
    Column("promotion_policy", JSONB),
)

# Model artifacts, content-addressed.
artifacts = Table(
    "artifacts",
    metadata,
    Column("sha256", Text, primary_key=True),  # hex digest of data
    Column("data", LargeBinary, nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    _timestamp("created_at", server_default=NOW),
)

model_versions = Table(
    "model_versions",
    metadata,
    Column("model", Text, ForeignKey("models.name"), nullable=False),
    Column("version", Integer, nullable=False),
    Column("sha256", Text, ForeignKey("artifacts.sha256"), nullable=False),
    Column("spec", JSONB, nullable=False),
    Column("evaluation", JSONB, nullable=False, server_default=EMPTY_JSON),
    Column("lineage", JSONB, nullable=False, server_default=EMPTY_JSON),
    Column("feature_names", ARRAY(Text), nullable=False),
    _seq_of("registered_seq"),
    _timestamp("created_at", server_default=NOW),
    PrimaryKeyConstraint("model", "version"),
    CheckConstraint("version > 0", name="model_versions_version_check"),
)

# Current aliases; their history is the log (model.alias_set events).
model_aliases = Table(
    "model_aliases",
    metadata,
    Column("model", Text, ForeignKey("models.name"), nullable=False),
    Column("alias", Text, nullable=False),
    Column("version", Integer, nullable=False),
    _seq_of("set_seq"),
    PrimaryKeyConstraint("model", "alias"),
    ForeignKeyConstraint(["model", "version"], ["model_versions.model", "model_versions.version"]),
)

# Decisions joined with their outcomes, one row per decision (applied by the feedback service's
# log consumer, see d2d.projections): the decision columns from decision.made, `withdrawn` from
# decision.withdrawn, the outcome columns from the decision's first outcome.recorded.
decision_outcomes = Table(
    "decision_outcomes",
    metadata,
    Column("decision_id", UUID(as_uuid=True), primary_key=True),
    Column("model", Text, nullable=False),
    Column("model_version", Integer, nullable=False),
    Column("arm", Text, nullable=False),
    Column("score", Float, nullable=False),
    Column("action", Text, nullable=False),
    Column("propensity", Float, nullable=False),
    Column("explored", Boolean, nullable=False),
    Column("unit_id", Text, nullable=False),
    _timestamp("decided_at"),  # the decision's event time: its request's occurred_at (as_of)
    _seq_of("decision_seq"),
    Column("withdrawn", Boolean, nullable=False, server_default=text("false")),
    Column("outcome_id", Text),
    Column("label", SmallInteger),
    Column("reward", Float),
    Column("outcome_at", DateTime(timezone=True)),  # the outcome's event time
    Column("outcome_seq", BigInteger, ForeignKey("events.seq")),
    Column("outcome_source", Text),  # 'api' or 'rule'
    Index("decision_outcomes_model_decided_at", "model", "decided_at"),
    Index("decision_outcomes_model_seq", "model", "decision_seq"),  # the registry's canary judge
)

# Registered outcome rules (d2d.outcomes.OutcomeRule), immutable once registered.
outcome_rules = Table(
    "outcome_rules",
    metadata,
    Column("name", Text, primary_key=True),
    Column("event_type", Text, nullable=False),
    Column("terms", JSONB, nullable=False),  # OutcomeRule.to_dict()
    _seq_of("registered_seq"),
    _timestamp("created_at", server_default=NOW),
)

# Personal data keys (d2d.personal): not a projection of the log, on purpose. A subject's key is
# destroyed to forget it, which an append-only log could never do; no event carries a key.
personal_keys = Table(
    "personal_keys",
    metadata,
    Column("subject", Text, primary_key=True),  # "<entity_type>/<entity_id>"
    Column("key_id", UUID(as_uuid=True), nullable=False, server_default=text("gen_random_uuid()")),
    Column("key", LargeBinary, nullable=False),  # 32 random bytes: AES-256-GCM
    _timestamp("created_at", server_default=NOW),
    CheckConstraint("length(key) = 32", name="personal_keys_key_check"),
)
