-- The case engine: re-runs, the watch clock, and the relay's backoff.

-- Bumped by `holdclear cases retry`: a re-run gets new envelope ids and a new
-- Idempotency-Key (unless it resumes an assignment whose outcome is unknown).
ALTER TABLE cases ADD COLUMN generation integer NOT NULL DEFAULT 0;
-- When the current watch began (the accepted assignment, or the moment the
-- pending account was seen ACTIVE, or a retry): the HOLD_PERSISTS clock.
ALTER TABLE cases ADD COLUMN watching_since timestamptz;

-- A row that failed to publish waits until then before the next try.
ALTER TABLE outbox ADD COLUMN next_attempt_at timestamptz NOT NULL DEFAULT now();
