-- How serving routes and decides per model; changes are model.policy_set events.
ALTER TABLE models ADD COLUMN deployment_policy jsonb NOT NULL
    DEFAULT '{"canary_share": 0.0, "epsilon": 0.0, "threshold": 0.5, "actions": ["approve", "decline"]}'::jsonb;
GRANT UPDATE (description, deployment_policy) ON models TO d2d_service;
