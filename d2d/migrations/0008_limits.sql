-- Limits that hold end to end (issue: no single input stops the platform).
--
-- Contracts bound event time: `occurred_at` at most `max_future_skew_seconds` ahead of and at most
-- `max_age_seconds` behind the time ingest receives the event. Existing versions get the defaults.
ALTER TABLE contracts
    ADD COLUMN max_future_skew_seconds bigint NOT NULL DEFAULT 3600 CHECK (max_future_skew_seconds >= 0),
    ADD COLUMN max_age_seconds         bigint NOT NULL DEFAULT 315532800 CHECK (max_age_seconds > 0);

-- Dead letters keep a bounded prefix of oversized input, with the whole input's size and sha256.
ALTER TABLE dead_letters
    ADD COLUMN raw_size   bigint,
    ADD COLUMN raw_sha256 text;
UPDATE dead_letters SET raw_size = length(raw), raw_sha256 = encode(sha256(raw), 'hex');
ALTER TABLE dead_letters
    ALTER COLUMN raw_size SET NOT NULL,
    ALTER COLUMN raw_sha256 SET NOT NULL;
