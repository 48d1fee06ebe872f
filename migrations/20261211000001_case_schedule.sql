-- Issue #18, part 2: the scheduler's own narrow row. A claim, a lease
-- renewal and a give-back write this row alone, never the wide case row
-- (its event, ~20 columns and their indexes). An open case has exactly one
-- row here; a closed case (released, escalated, merged) has none: the
-- statements that close a case delete it, a `cases retry` that reopens one
-- inserts it, and the pruner's delete of a case takes it along (cascade).
CREATE TABLE case_schedule (
    case_id          uuid        PRIMARY KEY REFERENCES cases (id) ON DELETE CASCADE,
    due_at           timestamptz NOT NULL DEFAULT now(),  -- next step; while leased, the lease's end
    lease_owner      text,                                -- `<worker uuid>#<claim>`
    lease_expires_at timestamptz
);
-- The claim's index: due rows in order of due time. A claim moves `due_at`
-- past the lease, so leased rows leave the front of the scan.
CREATE INDEX case_schedule_due ON case_schedule (due_at);

-- Existing deployments: every open case moves here with its due time and lease.
INSERT INTO case_schedule (case_id, due_at, lease_owner, lease_expires_at)
SELECT id, next_action_at, lease_owner, lease_expires_at
FROM cases
WHERE state NOT IN ('released', 'escalated', 'merged');

-- One source of truth: the case row no longer carries them.
DROP INDEX cases_due;
ALTER TABLE cases
    DROP COLUMN next_action_at,
    DROP COLUMN lease_owner,
    DROP COLUMN lease_expires_at;
