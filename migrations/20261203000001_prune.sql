-- Built-in retention (the pruner, src/prune.rs).

-- The pruner deletes closed cases oldest first: this index finds them
-- without reading the open ones (and it stays small when retention keeps
-- the table small).
CREATE INDEX cases_closed_at ON cases (closed_at)
    WHERE state IN ('released', 'escalated', 'merged');

-- When a pass of the pruner last finished without an error, whichever
-- worker ran it: `/metrics` reads it on every replica.
CREATE TABLE prune_passes (
    singleton    boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    finished_at  timestamptz NOT NULL,
    worker       text        NOT NULL,
    deleted      jsonb       NOT NULL DEFAULT '{}'
);

-- Published rows oldest first, without reading the unsent ones.
CREATE INDEX outbox_sent_at ON outbox (sent_at) WHERE sent_at IS NOT NULL;
-- A deleted case takes its outbox rows with it (ON DELETE CASCADE): found
-- by this index rather than by reading the whole outbox once per case.
CREATE INDEX outbox_case ON outbox (case_id);
