"""Each service's login appends only the event types that are its own.

Migration 0012 let every appending service call `append_events` with any type: serving's login
could append `api_key.created` (an admin key of its making) or `model.alias_set`. Now, after every
INSERT into `events`, a statement trigger looks at who logged in (`session_user`, which a SECURITY
DEFINER function does not change) and refuses (insufficient_privilege, naming the group and the
type) an event type its service may not append:

- a platform type: only the services its contract names (`appended_by` in
  d2d/contracts/platform/*.json), none meaning only the database's owner;
- any other (a producer's domain type): only ingest.

The rights are the code's: `d2d_append_rights()` lists (group, type) pairs, '' as the group of a
type only the owner appends. This migration makes it empty (which refuses nothing); every
migration then replaces it with the rights of the running version's contracts
(`d2d.db.upgrade_to_head`, `d2d.dbroles.append_rights_sql`), so a new platform type needs its JSON
file only. The log's owner (audit, say, in the scratch databases it rebuilds state in), and a role
that is no service's login (a shared server's single role), append anything, as before.

Revision ID: 0014_append_rights
"""

from alembic import op

revision = "0014_append_rights"
down_revision = "0013_personal_keys"
branch_labels = None
depends_on = None

GROUPS = ("d2d_ingest", "d2d_relay", "d2d_features", "d2d_registry", "d2d_serving", "d2d_feedback", "d2d_audit")


def upgrade() -> None:
    op.execute("""
CREATE FUNCTION d2d_append_rights() RETURNS TABLE (grp text, type text) LANGUAGE sql IMMUTABLE
AS $$ SELECT NULL::text, NULL::text WHERE false $$
""")
    groups = "ARRAY[" + ", ".join(f"'{g}'" for g in GROUPS) + "]"
    # pg_has_role reads the session's cached memberships (joining pg_roles and pg_auth_members cost
    # twice as much); the whole check adds about 35 us to an append statement (one per group commit).
    op.execute(f"""
CREATE FUNCTION d2d_check_appender() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    caller text;
    own text[];
    platform text[];
    refused text;
BEGIN
    IF pg_has_role(session_user, (SELECT relowner FROM pg_class WHERE oid = 'events'::regclass), 'MEMBER') THEN
        RETURN NULL;  -- the log's owner (audit too, in the scratch databases it owns)
    END IF;
    SELECT g INTO caller FROM unnest({groups}) g WHERE pg_has_role(session_user, g, 'MEMBER') LIMIT 1;
    IF caller IS NULL THEN
        RETURN NULL;  -- a role that is no service's login
    END IF;
    SELECT coalesce(array_agg(r.type) FILTER (WHERE r.grp = caller), '{{}}'), array_agg(r.type)
      INTO own, platform FROM d2d_append_rights() r;
    IF platform IS NULL THEN
        RETURN NULL;  -- no rights set yet
    END IF;
    SELECT a.type INTO refused FROM appended a
     WHERE NOT (a.type = ANY (own)) AND (caller <> 'd2d_ingest' OR a.type = ANY (platform))
     LIMIT 1;
    IF refused IS NOT NULL THEN
        RAISE EXCEPTION '% may not append % events', caller, refused
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'a platform type is appended only by the services its contract names in appended_by';
    END IF;
    RETURN NULL;
END
$$
""")
    op.execute("""
CREATE TRIGGER events_appended_by_their_service AFTER INSERT ON events
    REFERENCING NEW TABLE AS appended FOR EACH STATEMENT EXECUTE FUNCTION d2d_check_appender()
""")


def downgrade() -> None:
    raise NotImplementedError("the schema only moves forward: restore a backup to go back")
