-- Intake and the case engine: inbox, cases, history, outbox.

-- One row per accepted event id: the same id delivered twice is one event.
CREATE TABLE inbox (
    event_id    text        PRIMARY KEY,
    case_id     uuid        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX inbox_received_at ON inbox (received_at);

-- One row per held order being (or having been) worked.
CREATE TABLE cases (
    id                  uuid        PRIMARY KEY,
    order_key           text        NOT NULL,             -- sales order number, or 'web:<webOrderId>'
    sales_order_number  text,
    web_order_id        text,
    state               text        NOT NULL,             -- see domain::CaseState
    event_id            text        NOT NULL,             -- the event that opened the case
    event               jsonb       NOT NULL,             -- that event, validated (domain::HeldOrderEvent)
    hold_reason         text        NOT NULL,
    held_at             timestamptz NOT NULL,
    rule_name           text,
    rules_hash          text,
    decision            jsonb,                            -- rules::Decision
    target              jsonb,                            -- the resolved account, type and virtual account
    idempotency_key     text,
    assignment_id       text,
    assigned_at         timestamptz,
    attempt             integer     NOT NULL DEFAULT 0,   -- transient failures of the current step
    retry_since         timestamptz,                      -- first transient failure of the current streak
    polls               integer     NOT NULL DEFAULT 0,   -- looks at the order since the assignment
    escalation_reason   text,
    escalation_level    smallint    NOT NULL DEFAULT 0,   -- HOLD_PERSISTS thresholds already emitted
    next_action_at      timestamptz NOT NULL DEFAULT now(),
    lease_owner         text,
    lease_expires_at    timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    released_at         timestamptz,
    closed_at           timestamptz,
    CONSTRAINT cases_state_known CHECK (state IN ('deciding', 'resolving', 'assigning', 'watching', 'released', 'escalated'))
);
-- At most one open case per order.
CREATE UNIQUE INDEX cases_one_open_per_order ON cases (order_key) WHERE state NOT IN ('released', 'escalated');
-- The scheduler's claim: due open cases in order of due time.
CREATE INDEX cases_due ON cases (next_action_at) WHERE state NOT IN ('released', 'escalated');
CREATE INDEX cases_order_key ON cases (order_key, created_at DESC);
CREATE INDEX cases_state ON cases (state);

-- Everything that happened to a case, in order.
CREATE TABLE case_history (
    id       bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    case_id  uuid        NOT NULL REFERENCES cases (id) ON DELETE CASCADE,
    at       timestamptz NOT NULL DEFAULT now(),
    kind     text        NOT NULL,        -- opened, held_again, decided, call, assigned, escalated, released, retry, ...
    state    text        NOT NULL,        -- the case's state after this entry
    detail   jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX case_history_case ON case_history (case_id, id);

-- Events to publish, written in the same transaction as the state change.
CREATE TABLE outbox (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    envelope_id  uuid        NOT NULL UNIQUE,   -- stable per transition: duplicates are recognisable
    case_id      uuid        NOT NULL REFERENCES cases (id) ON DELETE CASCADE,
    routing_key  text        NOT NULL,
    body         jsonb       NOT NULL,          -- the CloudEvents envelope
    created_at   timestamptz NOT NULL DEFAULT now(),
    sent_at      timestamptz,
    attempts     integer     NOT NULL DEFAULT 0,
    last_error   text
);
CREATE INDEX outbox_unsent ON outbox (id) WHERE sent_at IS NULL;
