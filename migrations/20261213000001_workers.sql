-- Workers' heartbeats: each `holdclear run` process writes its row at start
-- and then every few seconds, and marks it stopped on a graceful exit. The
-- console lists the workers up (a recent beat), the ones that stopped, and
-- the ones lost (no beat for a while, no stop: killed, or cut off from the
-- database). Rows of workers gone for a day are deleted by the beats of
-- the others.
CREATE TABLE workers (
    id          uuid PRIMARY KEY,
    host        text NOT NULL,
    pid         integer NOT NULL,
    version     text NOT NULL,
    started_at  timestamptz NOT NULL,
    last_beat   timestamptz NOT NULL DEFAULT now(),
    -- The worker's own readiness at its last beat (its broker can be down
    -- while it beats).
    ready       boolean NOT NULL DEFAULT false,
    stopped_at  timestamptz
);
