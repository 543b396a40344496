-- The role services run as: it may add to the log and read it, never change or remove.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'd2d_service') THEN
        CREATE ROLE d2d_service NOLOGIN;
    END IF;
END
$$;

GRANT USAGE ON SCHEMA public TO d2d_service;
GRANT SELECT, INSERT ON events, contracts TO d2d_service;
GRANT SELECT, INSERT, UPDATE ON log_positions TO d2d_service;
GRANT SELECT, INSERT ON dead_letters TO d2d_service;
GRANT UPDATE (state, redriven_at, redriven_seq, code, reason, field) ON dead_letters TO d2d_service;
GRANT USAGE, SELECT ON SEQUENCE dead_letters_id_seq TO d2d_service;
