-- Escalated cases watched until a person releases the hold by hand
-- (HOLDCLEAR_ESCALATED_WATCH_INTERVAL; off by default). One row per case
-- (per generation) watched; `ended_at IS NULL` while it is still watched.
-- A release records the account the person chose, as the order shows it:
-- `holdclear rules suggest` learns rules from those rows.
CREATE TABLE hand_watches (
    case_id              uuid        PRIMARY KEY REFERENCES cases (id) ON DELETE CASCADE,
    generation           integer     NOT NULL,      -- the case's generation when the watch began
    escalated_at         timestamptz NOT NULL,      -- the case's closed_at: new escalations are found after the latest
    started_at           timestamptz NOT NULL DEFAULT now(),
    next_look_at         timestamptz NOT NULL,
    looks                integer     NOT NULL DEFAULT 0,
    ended_at             timestamptz,               -- NULL: still watched
    outcome              text,                      -- released, order_closed, unreadable, reopened, superseded, expired
    detail               text,
    released_at          timestamptz,               -- when the order says the hold was released
    smart_account_domain text,                      -- the person's choice
    virtual_account_name text,
    CONSTRAINT hand_watches_outcome_known CHECK (outcome IN
        ('released', 'order_closed', 'unreadable', 'reopened', 'superseded', 'expired'))
);
CREATE INDEX hand_watches_due ON hand_watches (next_look_at) WHERE ended_at IS NULL;
CREATE INDEX hand_watches_released ON hand_watches (released_at) WHERE outcome = 'released';
CREATE INDEX hand_watches_escalated ON hand_watches (escalated_at);
-- Finding the escalated cases to watch.
CREATE INDEX cases_escalated_closed ON cases (closed_at) WHERE state = 'escalated';
