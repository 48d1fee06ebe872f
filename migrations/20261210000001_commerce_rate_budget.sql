-- The commerce API's rate budget, shared by every worker of the deployment
-- (issue #18): one row, a token bucket refilled by the time elapsed since
-- it was last taken from. Workers take small grants with one
-- UPDATE ... RETURNING (`store/rate_budget.rs`) and spend them through
-- their own limiter, so a call costs no round trip of its own.
CREATE TABLE commerce_rate_budget (
    id smallint PRIMARY KEY CHECK (id = 1),
    tokens double precision NOT NULL,
    refilled_at timestamptz NOT NULL
);

INSERT INTO commerce_rate_budget (id, tokens, refilled_at)
VALUES (1, 0, clock_timestamp());
