"""Least privilege per service: one group role each (NOLOGIN; `d2d up` makes each service's login a
member, d2d.dbroles), the log appended to only through `append_events`, and each projection or
checkpoint writable only by the service that writes it.

- `events`: SELECT for every service; no INSERT, UPDATE, DELETE or TRUNCATE for any. Appends go
  through `append_events`, now SECURITY DEFINER (it runs as its owner, the migrating role) with a
  fixed search_path, executable by the services that append and by no one else (not PUBLIC).
- Projections: INSERT/UPDATE only for the service whose transactions or consumer write them.
- `log_positions` and `feature_snapshots` are shared, keyed by name: each row belongs to the group
  of the service that created it (`owner_role`, default `d2d_service_group()`), and row-level
  security lets a service change (and, for snapshots, read) only its own rows, so serving cannot
  move the relay's position or plant a snapshot the features service would load. Existing rows
  are given to their service by name (`relay:*`, `registry*`, `serving*`; the rest to feedback
  and features).
- The old shared role `d2d_service` keeps nothing in this database.

The group roles are cluster-wide (created here if missing, without a password); their grants are
per database, so every migrated database gets them.

Revision ID: 0012_service_roles
"""

import sqlalchemy as sa
from alembic import op

revision = "0012_service_roles"
down_revision = "0011_promotion_policy"
branch_labels = None
depends_on = None

INGEST, RELAY, FEATURES, REGISTRY, SERVING, FEEDBACK, AUDIT = (
    "d2d_ingest", "d2d_relay", "d2d_features", "d2d_registry", "d2d_serving", "d2d_feedback", "d2d_audit"
)  # fmt: skip
GROUPS = (INGEST, RELAY, FEATURES, REGISTRY, SERVING, FEEDBACK, AUDIT)
APPENDERS = (INGEST, RELAY, FEATURES, REGISTRY, SERVING, FEEDBACK)
APPEND_EVENTS = "append_events(bigint, uuid[], text[], integer[], text[], text[], timestamptz[], text[], text[])"

# What every service reads (rows of log_positions and feature_snapshots further limited by policy).
READ_BY_ALL = (
    "events", "alembic_version", "contracts", "feature_views", "models", "model_versions", "model_aliases",
    "decision_outcomes", "outcome_rules", "log_positions",
)  # fmt: skip

GRANTS = (
    f"GRANT SELECT ON artifacts TO {REGISTRY}, {AUDIT}",
    f"GRANT SELECT ON feature_snapshots TO {FEATURES}, {SERVING}, {AUDIT}",
    # ingest: contracts (its ContractRegistry records them) and dead letters
    f"GRANT INSERT ON contracts TO {INGEST}",
    f"GRANT SELECT, INSERT ON dead_letters TO {INGEST}",
    f"GRANT UPDATE (state, redriven_at, redriven_seq, code, reason, field) ON dead_letters TO {INGEST}",
    f"GRANT USAGE ON SEQUENCE dead_letters_id_seq TO {INGEST}",
    # the relay, the registry's retrain loop, the feedback consumer: their positions
    f"GRANT INSERT, UPDATE (seq, updated_at) ON log_positions TO {RELAY}, {REGISTRY}, {FEEDBACK}",
    # features: view registrations; features and serving: their folded state
    f"GRANT INSERT ON feature_views TO {FEATURES}",
    f"GRANT INSERT, UPDATE (watermark, stream_seq, views, state, created_at) ON feature_snapshots"
    f" TO {FEATURES}, {SERVING}",
    # the registry: models, versions, artifacts, aliases
    f"GRANT INSERT ON models, model_versions, artifacts TO {REGISTRY}",
    f"GRANT UPDATE (description, deployment_policy, promotion_policy) ON models TO {REGISTRY}",
    f"GRANT INSERT, UPDATE (version, set_seq), DELETE ON model_aliases TO {REGISTRY}",
    # feedback: outcome rules and the decision/outcome join
    f"GRANT INSERT ON outcome_rules, decision_outcomes TO {FEEDBACK}",
    "GRANT UPDATE (withdrawn, outcome_id, label, reward, outcome_at, outcome_seq, outcome_source)"
    f" ON decision_outcomes TO {FEEDBACK}",
)


def upgrade() -> None:
    groups_array = "ARRAY[" + ", ".join(f"'{g}'" for g in GROUPS) + "]"
    op.execute(f"""
        DO $$
        DECLARE
            g text;
        BEGIN
            FOREACH g IN ARRAY {groups_array} LOOP
                IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = g) THEN
                    EXECUTE format('CREATE ROLE %I NOLOGIN', g);
                END IF;
            END LOOP;
        END
        $$
    """)
    # d2d_service had the union of what every service needed; nobody should have it now.
    for what in ("ALL TABLES", "ALL SEQUENCES", "ALL FUNCTIONS"):
        op.execute(f"REVOKE ALL ON {what} IN SCHEMA public FROM d2d_service")
    op.execute("REVOKE ALL ON SCHEMA public FROM d2d_service")

    op.execute(f"GRANT USAGE ON SCHEMA public TO {', '.join(GROUPS)}")
    op.execute(f"GRANT SELECT ON {', '.join(READ_BY_ALL)} TO {', '.join(GROUPS)}")
    for grant in GRANTS:
        op.execute(grant)

    # Appends only through the function, which runs as its owner: callers need no INSERT on events.
    op.execute(f"ALTER FUNCTION {APPEND_EVENTS} SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp")
    op.execute(f"REVOKE EXECUTE ON FUNCTION {APPEND_EVENTS} FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION {APPEND_EVENTS} TO {', '.join(APPENDERS)}")

    # The group of the service acting: the role itself when a group is acting (SET ROLE from the
    # owner, as tests and tools do), else the group the login is a member of, else the user.
    op.execute(f"""
CREATE FUNCTION d2d_service_group() RETURNS text LANGUAGE sql STABLE
SET search_path = pg_catalog AS $$
SELECT coalesce(
    (SELECT g.rolname::text FROM pg_roles g
     WHERE g.rolname = ANY ({groups_array})
       AND (g.rolname = current_user
            OR EXISTS (SELECT 1 FROM pg_auth_members m
                       WHERE m.roleid = g.oid
                         AND m.member = (SELECT u.oid FROM pg_roles u WHERE u.rolname = current_user)))
     ORDER BY g.rolname LIMIT 1),
    current_user::text)
$$
""")
    for table, rules in (
        ("log_positions", f"WHEN name LIKE 'relay:%' THEN '{RELAY}' WHEN name LIKE 'registry%' THEN '{REGISTRY}'"
                          f" ELSE '{FEEDBACK}'"),
        ("feature_snapshots", f"WHEN consumer LIKE 'serving%' THEN '{SERVING}' ELSE '{FEATURES}'"),
    ):  # fmt: skip
        op.add_column(table, sa.Column("owner_role", sa.Text, nullable=True))
        op.execute(f"UPDATE {table} SET owner_role = CASE {rules} END")
        op.alter_column(table, "owner_role", nullable=False, server_default=sa.text("d2d_service_group()"))
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"""
            CREATE POLICY {table}_own_rows ON {table}
                USING (pg_has_role(owner_role, 'USAGE')) WITH CHECK (pg_has_role(owner_role, 'USAGE'))
        """)
    # Ingest reports how far the relay got; audit's verify reads every consumer's checkpoint.
    op.execute(f"CREATE POLICY log_positions_read_all ON log_positions FOR SELECT TO {INGEST}, {AUDIT} USING (true)")
    op.execute(f"CREATE POLICY feature_snapshots_read_all ON feature_snapshots FOR SELECT TO {AUDIT} USING (true)")


def downgrade() -> None:
    raise NotImplementedError("the schema only moves forward: restore a backup to go back")
