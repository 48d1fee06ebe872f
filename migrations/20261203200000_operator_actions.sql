-- Operators' actions on cases, audited like replays (issue #16, the console):
-- a case can be claimed, noted and closed as handled by hand; every action
-- is an operation (who, what, when); a running replay can be asked to stop.

-- Who took the case.
ALTER TABLE cases ADD COLUMN claimed_by text;
ALTER TABLE cases ADD COLUMN claimed_at timestamptz;
-- Closed as handled by hand: the escalation needs nobody any more. An
-- escalation after it (a retry that escalated again: a later `closed_at`)
-- is a new one.
ALTER TABLE cases ADD COLUMN handled_at timestamptz;
ALTER TABLE cases ADD COLUMN handled_by text;

CREATE TABLE case_notes (
    id         bigserial PRIMARY KEY,
    case_id    uuid NOT NULL REFERENCES cases (id) ON DELETE CASCADE,
    written_at timestamptz NOT NULL DEFAULT now(),
    operator   text NOT NULL,
    text       text NOT NULL,
    ticket     text
);
CREATE INDEX case_notes_case ON case_notes (case_id, id);

-- The case an operation acted on (case retry, close, claim, note).
ALTER TABLE operations ADD COLUMN case_id uuid REFERENCES cases (id) ON DELETE SET NULL;
CREATE INDEX operations_case ON operations (case_id) WHERE case_id IS NOT NULL;
-- Set by `cancel`: the process running the replay stops before its next message.
ALTER TABLE operations ADD COLUMN cancel_requested_at timestamptz;
CREATE INDEX operations_created ON operations (created_at DESC);
-- The console's escalation lists.
CREATE INDEX cases_escalated ON cases (escalation_reason) WHERE state = 'escalated';
CREATE INDEX cases_released_at ON cases (released_at) WHERE released_at IS NOT NULL;
