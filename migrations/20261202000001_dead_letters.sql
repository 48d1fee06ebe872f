-- Dead letters kept in PostgreSQL: every message of the dead-letter queue,
-- once (dedupe_key), with each time it was seen; operations on them
-- (replays) and their items.

CREATE TABLE dead_letters (
    id                 bigserial PRIMARY KEY,
    dedupe_key         bytea NOT NULL UNIQUE,
    message_id         text,
    body               bytea NOT NULL,
    properties         jsonb NOT NULL,
    headers            jsonb NOT NULL,
    raw_properties     jsonb NOT NULL,
    code               text NOT NULL,
    detail             text NOT NULL,
    signature          text NOT NULL,
    group_key          text NOT NULL,
    origin_exchange    text,
    origin_routing_key text,
    sales_order_number text,
    web_order_id       text,
    event_id           text,
    failed_at          timestamptz,
    first_seen         timestamptz NOT NULL DEFAULT now(),
    last_seen          timestamptz NOT NULL DEFAULT now(),
    seen_count         integer NOT NULL DEFAULT 1,
    archived_at        timestamptz,
    claimed_by         text,
    claimed_at         timestamptz,
    last_replayed_at   timestamptz
);
CREATE INDEX dead_letters_group ON dead_letters (group_key) WHERE archived_at IS NULL;
CREATE INDEX dead_letters_last_seen ON dead_letters (last_seen);
CREATE INDEX dead_letters_orders ON dead_letters (sales_order_number, web_order_id);

CREATE TABLE dead_letter_sightings (
    id             bigserial PRIMARY KEY,
    dead_letter_id bigint NOT NULL REFERENCES dead_letters (id) ON DELETE CASCADE,
    -- sha256 of the headers: a redelivery of the same sighting (stored,
    -- not yet acked) is not a new one.
    sighting_key   bytea NOT NULL,
    seen_at        timestamptz NOT NULL DEFAULT now(),
    code           text NOT NULL,
    detail         text NOT NULL,
    headers        jsonb NOT NULL,
    UNIQUE (dead_letter_id, sighting_key)
);
CREATE INDEX dead_letter_sightings_seen ON dead_letter_sightings (seen_at);

CREATE TABLE dead_letter_notes (
    id             bigserial PRIMARY KEY,
    dead_letter_id bigint NOT NULL REFERENCES dead_letters (id) ON DELETE CASCADE,
    written_at     timestamptz NOT NULL DEFAULT now(),
    operator       text NOT NULL,
    text           text NOT NULL,
    ticket         text
);

CREATE TABLE operations (
    id          uuid PRIMARY KEY,
    kind        text NOT NULL,
    operator    text NOT NULL,
    selection   jsonb NOT NULL,
    status      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);

CREATE TABLE operation_items (
    operation_id   uuid NOT NULL REFERENCES operations (id) ON DELETE CASCADE,
    dead_letter_id bigint NOT NULL REFERENCES dead_letters (id) ON DELETE CASCADE,
    position       integer NOT NULL,
    sent_at        timestamptz,
    error          text,
    PRIMARY KEY (operation_id, dead_letter_id)
);
